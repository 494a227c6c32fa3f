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


def test_bench_logprob_writes_csv_and_plot(results, capsys):
    rows = bench_logprob.main(["--sizes", "64,32,512", "--providers", "fastrlhf-torch,torch-eager",
                               "--reps", "1"])
    out = capsys.readouterr().out
    assert "x torch-eager" in out and "linear_logprob" in out
    csvs = list(results.glob("*.csv"))
    assert len(csvs) == 1
    written = _rows(csvs[0])
    assert len(written) == len(rows) == 2 * 2 * 3  # ops x providers x modes
    assert {r["size"] for r in written} == {"N=64,H=32,V=512", "N=64,V=512"}
    assert all(float(r["median_ms"]) > 0 and r["device"].startswith("cpu") for r in written)
    assert {p.name.rsplit("-", 1)[-1] for p in results.glob("*.png")} == {"linear_logprob.png",
                                                                         "logprob_from_logits.png"}


def test_bench_losses_runs_every_op(results):
    rows = bench_losses.main(["--tokens", "2048", "--providers", "torch-eager", "--reps", "1",
                              "--no-save"])
    assert {r["op"] for r in rows} == set(bench_losses.OPS) - {"grpo_from_logits"}  # CUDA only
    assert not list(results.glob("*.csv"))


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
