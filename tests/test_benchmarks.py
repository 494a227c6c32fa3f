"""The benchmarks run, print, write the shared CSV schema and draw a plot (tiny sizes)."""

import csv

import pytest

from benchmarks import bench_logprob, bench_losses, common
from fastrlhf import cli


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def _rows(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.FIELDS
        return list(reader)


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory):
    """The GPU session's one command, run once as CI can (`gpu_suite.sh --dry-run`): every part but
    the sm_90 compile (tested on its own), on the CPU with tiny shapes. Its logprob and losses parts
    are the kernel benchmarks' own runs (the tests below read them): one start-up each, not two."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("gpu")
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(out),
                           "--parts", "install,tests,logprob,losses,train,grpo,lora"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def _part_output(out, part: str) -> str:
    """What one part of the GPU suite printed (its section of log.txt)."""
    return (out / "log.txt").read_text().split(f"==== {part}: ", 1)[1].split("\n==== ", 1)[0]


def _csv_rows(out, ops) -> list[dict]:
    return [r for r in _rows(next(out.glob("*.csv"))) if r["op"] in ops]


@pytest.mark.slow
def test_bench_logprob_writes_csv_and_plot(gpu_dry_run):
    """bench_logprob as the suite's dry run calls it (sizes 64,32,512; fastrlhf-torch and torch-eager)."""
    out = _part_output(gpu_dry_run, "logprob")
    assert "bench_logprob --sizes 64,32,512" in out.splitlines()[0]
    assert "x torch-eager" in out and "linear_logprob" in out
    written = _csv_rows(gpu_dry_run, {"linear_logprob", "logprob_from_logits"})
    assert len(written) == 2 * 2 * 3  # ops x providers x modes
    assert {r["size"] for r in written} == {"N=64,H=32,V=512", "N=64,V=512"}
    assert {r["provider"] for r in written} == {"fastrlhf-torch", "torch-eager"}
    assert all(float(r["median_ms"]) > 0 and r["device"].startswith("cpu") for r in written)
    assert {p.name.rsplit("-", 1)[-1] for p in gpu_dry_run.glob("*.png")} >= {"linear_logprob.png",
                                                                              "logprob_from_logits.png"}


@pytest.mark.slow
def test_bench_losses_runs_every_op(gpu_dry_run):
    """bench_losses as the suite's dry run calls it: every op (but the CUDA-only one) measured and
    written; the parts run with --no-save (grpo, lora) wrote nothing."""
    assert "bench_losses --tokens 2048" in _part_output(gpu_dry_run, "losses").splitlines()[0]
    ops = {r["op"] for r in _rows(next(gpu_dry_run.glob("*.csv")))}
    assert ops - {"linear_logprob", "logprob_from_logits", "train_step"} == \
        set(bench_losses.OPS) - {"grpo_from_logits"}  # CUDA only
    assert not ops & {"grpo_step", "lora_step"}


def test_cli_bench_selects_a_suite(results, monkeypatch):
    called = []
    monkeypatch.setattr(bench_logprob, "main", lambda a: called.append(("logprob", a)))
    monkeypatch.setattr(bench_losses, "main", lambda a: called.append(("losses", a)))
    assert cli.main(["bench", "losses", "--reps", "1"]) == 0
    assert called == [("losses", ["--reps", "1"])]
    called.clear()
    assert cli.main(["bench"]) == 0
    assert [c[0] for c in called] == ["logprob", "losses"]


def test_console_script_finds_the_benchmarks_from_anywhere(tmp_path):
    """The installed `fastrlhf` script has neither the checkout nor the working directory on
    sys.path; `fastrlhf bench` must still find benchmarks/ (it used to print 'not importable')."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("fastrlhf")
    proc = subprocess.run([str(script), "bench", "train", "--sequences", "2", "--reps", "1", "--no-save",
                           "--vocab", "256", "--model-size", "tiny"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train_step" in proc.stdout


def test_shard_memory_model_by_hand():
    from benchmarks import bench_shard

    rows = {(r["model"], r["ranks"]): r for r in bench_shard.table()}
    # 7B on 8 GPUs: 16 bytes x 7.62e9 / 8 = 15.24 GB of state, two bf16 layers of 7.62e9 / 28 in flight
    # = 4 x 7.62e9 / 28 = 1.089 GB; a colocated vLLM adds the bf16 model, 15.24 GB
    assert rows["7B", 8]["train_gb"] == pytest.approx(15.24 + 1.0886, abs=1e-3)
    assert rows["7B", 8]["with_vllm_gb"] == pytest.approx(15.24 + 1.0886 + 15.24, abs=1e-3)
    # --rollout_tp 8: the engine's bf16 weights split 8 ways, 1.905 GB a rank
    assert rows["7B", 8]["with_vllm_tp_gb"] == pytest.approx(15.24 + 1.0886 + 1.905, abs=1e-3)


@pytest.mark.slow
@pytest.mark.distributed
def test_shard_benchmark_halves_the_state_on_two_ranks():
    from benchmarks import bench_shard

    rows = bench_shard.measure(bench_shard.argparse_namespace(model_size="tiny", ranks="1,2"))
    one = [r for r in rows if r["ranks"] == 1][0]
    two = [r for r in rows if r["ranks"] == 2]
    assert len(two) == 2
    for key in ("params_mb", "grads_mb", "adam_mb"):
        assert sum(r[key] for r in two) == pytest.approx(one[key], rel=0.02), key  # shards may pad a little
        assert two[0][key] == pytest.approx(one[key] / 2, rel=0.05), key


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_its_summary_within_the_file_limits(gpu_dry_run):
    """Each part's status in summary.md, the environment, at most 8 files, the headline plot kept first."""
    out = gpu_dry_run
    summary = (out / "summary.md").read_text()
    for part in ("install", "tests", "logprob", "losses", "train", "grpo", "lora"):
        assert f"| {part} | ok |" in summary, part
    assert "torch 2" in summary and "triton" in summary  # the environment
    files = [p for p in out.iterdir()]
    assert all(p.is_file() for p in files) and len(files) <= 8
    assert any(p.name.endswith("linear_logprob.png") for p in files)  # the headline plot is kept first
    rows = _rows(next(out.glob("*.csv")))
    assert {r["op"] for r in rows} >= {"linear_logprob", "policy_loss"}


def test_bench_step_phases_time_the_outermost_call_and_split_each_step():
    """bench_step's phase timer: a wrapped call nested in another wrapped one counts once (to the
    outer phase), "other" is each step's remainder, the warm-up step is left out, and the FLOP
    rate is 6 per matmul parameter per token with a backward, 2 without."""
    import types

    from benchmarks import bench_step

    ns = types.SimpleNamespace(inner=lambda: None)
    ns.outer = lambda: ns.inner()
    ph = bench_step.Phases()
    ph.wrap(ns, "inner", "forward", tokens=lambda: 10)
    ph.wrap(ns, "outer", "backward")
    for seconds in (9.0, 1.0, 2.0, 3.0):
        ns.inner()
        ns.outer()  # its inner call is inside the backward phase
        ph.steps.append({**ph.now, "forward": 0.1, "backward": 0.2, "step": seconds})
        ph.now = {}
    s = ph.summary()
    assert s["step_s"] == 2.0 and s["other_s"] == pytest.approx(2.0 - 0.3)
    assert s["tokens_grad"] == 10  # one inner call a step counted, not the nested one
    r = {"matmul_params": 1000, "tokens_grad": 10, "tokens_nograd": 5, "forward_s": 0.5, "backward_s": 0.5}
    assert bench_step.train_gflops(r) == pytest.approx(1000 * (60 + 10) / 1.0 / 1e9)
