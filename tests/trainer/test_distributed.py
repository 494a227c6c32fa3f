"""Several processes: `torchrun --nproc_per_node 2 -m fastrlhf sft ...` (gloo on the CPU) trains
the same global batch as one process, sharded with FSDP2: the same loss and gradient-norm
trajectory, held-out loss and final weights; the main process alone writes (the ranks their own
checkpoint shards); a checkpoint written by two ranks resumes on two and in one process (and the
reverse) exactly; what cannot run sharded says so."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf import models

pytestmark = pytest.mark.distributed

SFT = ["sft", "--task_model_size", "tiny", "--task_examples", "96", "--tokens_per_step", "96", "--epochs", "1",
       "--max_len", "64", "--tokens_per_micro_batch", "48", "--eval_every", "3", "--task_eval_prompts", "8",
       "--log_samples", "1", "--lr", "1e-3", "--warmup_steps", "1", "--device", "cpu"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTRLHF_KERNEL_IMPL": "torch", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    launch = [sys.executable, "-m", "fastrlhf"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                  "127.0.0.1", "--master_port", str(_port()), "-m", "fastrlhf"]
    return subprocess.run(launch + args, capture_output=True, text=True, timeout=timeout, env=env)


def _here(args: list[str]) -> int:
    """`fastrlhf ARGS` in one process, this one (the suite's worker has torch and transformers
    imported already: a process start saved), as each rank computes: the kernels' torch path,
    one thread (the same reduction order as OMP_NUM_THREADS=1). Its exit status."""
    from fastrlhf import cli

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTRLHF_KERNEL_IMPL", "torch")
        # (a vLLM engine leaves the thread count as it finds it only when it does not bind its threads)
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        torch.set_num_threads(1)
        try:
            return cli.main(args)
        finally:
            torch.set_num_threads(threads)


def _train(args: list[str], nproc: int) -> None:
    """`fastrlhf ARGS` on nproc processes, which must succeed: one process here (_here), more under torchrun."""
    if nproc == 1:
        assert _here(args) == 0
    else:
        proc = _run(args, nproc=nproc, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]


# several runs, one after another, in the same two torchrun processes: one start-up for them all
MANY = """
import json, os, sys
from fastrlhf import cli
for args in json.load(open(sys.argv[1])):
    code = cli.main(args)
    if code:
        break
sys.stdout.flush(), sys.stderr.flush()
os._exit(code)  # as python -m fastrlhf leaves a torchrun rank (fastrlhf/__main__.py)
"""


def _run_many(tmp_path, runs: list[list[str]], timeout: int = 600) -> subprocess.CompletedProcess:
    """Each argument list of runs as `torchrun --nproc_per_node 2 -m fastrlhf ARGS`, in order, in one launch."""
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    return _run_script(tmp_path / "many.py", MANY, [str(tmp_path / "runs.json")], timeout)


def _run_script(path, text: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """The Python script `text`, written to path, on 2 torchrun processes with args."""
    path.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTRLHF_KERNEL_IMPL": "torch", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_port()), str(path), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    done = {}
    for n in (1, 2):
        out = root / f"n{n}"
        _train(SFT + ["--output_dir", str(out), "--save_every", "2"], n)
        done[n] = out
    return done


@pytest.mark.slow
def test_sft_on_two_ranks_trains_the_one_process_batch(one_and_two):
    one, two = (_rows(one_and_two[n]) for n in (1, 2))
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 4
    for a, b in zip(one, two):
        for key in ("loss/sft", "grad_norm", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
        if "eval/loss" in a:
            assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-4)
            assert b["eval/accuracy"] == a["eval/accuracy"]
    w1 = models.load_causal_lm(one_and_two[1] / "final").state_dict()
    w2 = models.load_causal_lm(one_and_two[2] / "final").state_dict()
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5, msg=k)
    summary = json.loads((one_and_two[2] / "summary.json").read_text())
    assert summary["steps"] == one[-1]["step"] and summary["world_size"] == 2


@pytest.mark.slow
def test_fsdp_cpu_offload_trains_as_without_it_and_is_refused_on_one_process(one_and_two, tmp_path, capfd):
    """--fsdp_offload (FSDP2's CPUOffloadPolicy: shards, gradients and AdamW's state in host
    memory, the step on the CPU): the two-rank run's losses, gradient norms and final weights are
    those without it (on a CPU the arithmetic is the same; what it saves is GPU memory); with
    --sharded_checkpoints false its checkpoint is gathered into one HF directory (the one-process
    run's weights); alone, the setting is refused before anything runs."""
    out = tmp_path / "offload"
    proc = _run(SFT + ["--output_dir", str(out), "--save_every", "2", "--fsdp_offload", "true",
                       "--sharded_checkpoints", "false"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-2" / "model.safetensors").exists()  # gathered to rank 0 and written whole
    gathered = models.load_causal_lm(out / "checkpoints" / "step-2").state_dict()
    for k, v in models.load_causal_lm(one_and_two[1] / "checkpoints" / "step-2").state_dict().items():
        torch.testing.assert_close(gathered[k], v, rtol=1e-4, atol=1e-5, msg=k)
    plain, offloaded = _rows(one_and_two[2]), _rows(out)
    assert len(plain) == len(offloaded)
    for a, b in zip(plain, offloaded):
        for key in ("loss/sft", "grad_norm", "eval/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    w1 = models.load_causal_lm(one_and_two[2] / "final").state_dict()
    w2 = models.load_causal_lm(out / "final").state_dict()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    assert _here(SFT + ["--output_dir", str(tmp_path / "alone"), "--fsdp_offload", "true"]) == 2
    assert "fsdp_offload: offloads FSDP2's shards" in capfd.readouterr().err
    assert not (tmp_path / "alone" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_checkpoints_resume_across_rank_counts(one_and_two, tmp_path, capfd):
    """The two-rank run's step-2 checkpoint is DCP shards (a file per rank, nothing gathered); it
    continues on two ranks and in one process exactly as the runs that wrote it did, and the
    one-process checkpoint (an HF directory) continues on two ranks; `fastrlhf export` makes an HF
    directory of the shards holding the one-process run's step-2 weights; a cut-short shard is
    named by the damage check."""
    import shutil

    from fastrlhf import checkpoints

    sharded = one_and_two[2] / "checkpoints" / "step-2"
    assert checkpoints.is_sharded(sharded) and not (sharded / "model.safetensors").exists()
    assert sorted(p.name for p in (sharded / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not checkpoints.is_sharded(one_and_two[1] / "checkpoints" / "step-2")
    for written, resumed_on in ((2, 1), (1, 2), (2, 2)):
        out = tmp_path / f"from{written}on{resumed_on}"
        shutil.copytree(one_and_two[written] / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
        shutil.copy(one_and_two[written] / "config.json", out / "config.json")
        _train(SFT + ["--output_dir", str(out), "--save_every", "2"], resumed_on)
        ref = {r["step"]: r for r in _rows(one_and_two[resumed_on])}
        rows = _rows(out)
        assert rows[0]["step"] == 3 and len(rows) == len(ref) - 2
        for r in rows:
            for key in ("loss/sft", "grad_norm"):
                assert r[key] == pytest.approx(ref[r["step"]][key], rel=1e-5), (written, resumed_on, r["step"], key)

    assert _here(["export", str(sharded), str(tmp_path / "exported")]) == 0
    got = models.load_causal_lm(tmp_path / "exported").state_dict()
    want = models.load_causal_lm(one_and_two[1] / "checkpoints" / "step-2").state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    capfd.readouterr()
    assert _here(["export", str(tmp_path / "exported"), str(tmp_path / "again")]) == 2
    assert "an HF directory already" in capfd.readouterr().err

    cut = tmp_path / "cut"
    shutil.copytree(sharded, cut)
    with open(cut / "shards" / "__1_0.distcp", "r+b") as f:
        f.truncate(1000)
    assert checkpoints.damaged(cut).startswith("shards/__1_0.distcp is cut short (1000 of")
    (cut / "shards" / ".metadata").write_bytes(b"\x80")
    assert "shards/.metadata is missing or unreadable" in checkpoints.damaged(cut)


@pytest.mark.slow
def test_lora_on_two_ranks_trains_the_one_process_batch_and_resumes_on_one(tmp_path):
    """LoRA adapters and a trained output layer sharded with the frozen base: the same trajectory
    as one process (the adapters' random init drawn from the seed alone, so every rank and rank
    count holds the same A), the same merged final/, and the two-rank adapter checkpoint
    (gathered to rank 0) resumes in one process exactly."""
    import shutil

    args = SFT + ["--lr", "1e-2", "--lora_r", "8", "--lora_train_head", "true", "--save_every", "2"]
    for n in (1, 2):
        _train(args + ["--output_dir", str(tmp_path / f"n{n}")], n)
    one, two = _rows(tmp_path / "n1"), _rows(tmp_path / "n2")
    assert len(one) == len(two) >= 4
    for a, b in zip(one, two):
        for key in ("loss/sft", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    w1, w2 = (models.load_causal_lm(tmp_path / f"n{n}" / "final").state_dict() for n in (1, 2))
    # two ranks reduce the gradients in another order than one process (last-bit differences) and
    # Adam at lr 1e-2 carries them on: 1.5e-5 at most in a merged weight with torch's fused AdamW
    # (2.8e-6 with the multi-tensor one), against Adam steps of up to 1e-2 an element
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=5e-5, msg=k)
    ckpt = tmp_path / "n2" / "checkpoints" / "step-2"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    out = tmp_path / "resumed"
    shutil.copytree(ckpt, out / "checkpoints" / "step-2")
    shutil.copy(tmp_path / "n2" / "config.json", out / "config.json")
    assert _here(args + ["--output_dir", str(out)]) == 0
    ref = {r["step"]: r for r in one}
    rows = _rows(out)
    assert rows[0]["step"] == 3
    for r in rows:
        assert r["loss/sft"] == pytest.approx(ref[r["step"]]["loss/sft"], rel=1e-4), r["step"]


PAIRS = ["--task_pairs", "45", "--task_eval_pairs", "13", "--pairs_per_step", "15",
         "--epochs", "1", "--max_len", "64", "--tokens_per_micro_batch", "64", "--eval_every", "2", "--lr", "1e-3",
         "--warmup_steps", "1", "--save_every", "0", "--device", "cpu"]


PAIR_RUNS = {"rm-value": ["rm", "--head", "value"], "rm-logprob": ["rm", "--head", "logprob"],
             "dpo": ["dpo", "--task_eval_prompts", "4", "--log_samples", "1"],
             "dpo-ipo-live-ref": ["dpo", "--precompute_ref", "false", "--loss_type", "ipo", "--task_eval_prompts", "0"],
             "dpo-lora-adapters-off-ref": ["dpo", "--precompute_ref", "false", "--lora_r", "8",
                                           "--task_eval_prompts", "0"],
             "rm-lora": ["rm", "--head", "value", "--lora_r", "8"]}


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory):
    """Every pair-trainer setting, in one process (here) and on two ranks (one torchrun launch for all)."""
    root = tmp_path_factory.mktemp("pairs")
    for name, args in PAIR_RUNS.items():
        assert _here(args + PAIRS + ["--output_dir", str(root / name / "n1")]) == 0, name
    proc = _run_many(root, [args + PAIRS + ["--output_dir", str(root / name / "n2")]
                            for name, args in PAIR_RUNS.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAIR_RUNS))
def test_pair_trainers_on_two_ranks_train_the_one_process_batch(name, pair_runs):
    """15 pairs a step over 2 ranks (8 and 7, packed into different numbers of micro-batches):
    each rank scores its share, the scores are gathered, and the loss, the pairwise metrics and
    the gradient norm are the one-process run's (with LoRA: the reference is the sharded policy
    with its adapters off, computed every step)."""
    rows = {n: _rows(pair_runs / name / f"n{n}") for n in (1, 2)}
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[2]] and len(rows[1]) >= 3
    for a, b in zip(rows[1], rows[2]):
        for key, value in a.items():
            if isinstance(value, float) and not key.endswith("_per_s"):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)


FAILING_RANK = """
import os, sys
from fastrlhf import cli, models
real, calls = models.token_logprobs, []
def failing(model, batch, **kw):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("rank 1 broke on purpose")
    return real(model, batch, **kw)
models.token_logprobs = failing
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_its_error(tmp_path):
    """Rank 1 raises in its third forward while rank 0 waits in a collective for it: the run ends
    (no hang) with rank 1's error, and nothing is written as final."""
    proc = _run_script(tmp_path / "failing_rank.py", FAILING_RANK, [*SFT, "--output_dir", str(tmp_path / "out")], 180)
    assert proc.returncode != 0
    assert "rank 1 broke on purpose" in proc.stderr
    assert not (tmp_path / "out" / "final").exists()


FROZEN = """
import json, sys
import torch
from fastrlhf import data, dist, models
from fastrlhf.algos.batch import sequences
from fastrlhf.algos.online import score_with_model
from fastrlhf.rollout import Sample

ref_dir, rm_dir, out_dir = sys.argv[1:4]
dist.setup(torch.device("cpu"))
rank, out = dist.rank(), {}
ref, rm = models.load_frozen(ref_dir, device="cpu", dtype=torch.float32), models.load_reward_model(rm_dir)
for name, m in (("ref", ref), ("rm", rm)):
    params = list(m.parameters())
    out[name] = dict(local=sum(p.to_local().numel() for p in params), total=sum(p.numel() for p in params),
                     frozen=not m.training and not any(p.requires_grad for p in params))
plain_ref, plain_rm = models.load_causal_lm(ref_dir, verify=False).eval(), models.load_value_model(rm_dir).eval()
g = torch.Generator().manual_seed(rank)
def sample(vocab, n):
    return Sample(0, torch.randint(1, vocab, (6,), generator=g).tolist(),
                  torch.randint(1, vocab, (n,), generator=g).tolist(), [0.0] * n, "stop")
# uneven shares: rank 0 five samples (three micro-batches of 24 tokens), rank 1 one (one micro-batch)
samples = [sample(plain_rm.config.vocab_size, 10) for _ in range(5 if rank == 0 else 1)]
with torch.no_grad():
    score_with_model(rm, samples, 40, torch.device("cpu"))
    want = [models.sequence_rewards(plain_rm, data.pack(sequences([s]), 64)[0]).item() for s in samples]
    mb = data.pack(sequences([sample(plain_ref.config.vocab_size, 5 + 3 * rank)]), 64)[0]
    lp, lp_plain = models.token_logprobs(ref, mb), models.token_logprobs(plain_ref, mb)
out.update(rewards=[s.reward for s in samples], want=want, logprob_err=(lp - lp_plain).abs().max().item(),
           logprob_sum=lp.sum().item())
open(f"{out_dir}/rank{rank}.json", "w").write(json.dumps(out))
"""


@pytest.mark.slow
def test_frozen_models_are_sharded_and_score_uneven_shares(tmp_path):
    """Under torchrun the frozen reference (Gemma 2: tied output layer, softcap) and a reward model
    hold half their parameters per rank, and score as the whole models do: the reward model with
    five samples on one rank and one on the other (as many forwards on both: no hang), the
    reference's log-probs to 1e-6."""
    from fastrlhf.tasks import arithmetic as ar
    from tests import archs

    ref_dir = archs.save_arch("gemma2", tmp_path / "ref")
    base = ar.save_base_model(tmp_path / "base", **ar.MODEL_SIZES["tiny"])
    rm = models.load_value_model(base)
    torch.nn.init.normal_(rm.score.weight, generator=torch.Generator().manual_seed(0))  # rewards that differ
    rm.save_pretrained(tmp_path / "rm")
    models.load_tokenizer(base).save_pretrained(tmp_path / "rm")
    proc = _run_script(tmp_path / "frozen.py", FROZEN, [str(ref_dir), str(tmp_path / "rm"), str(tmp_path)], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        for name in ("ref", "rm"):
            assert r[name]["frozen"] and r[name]["local"] <= r[name]["total"] // 2 + 64, (name, r[name])
        assert r["rewards"] == pytest.approx(r["want"], abs=1e-5) and len(set(r["rewards"])) == len(r["rewards"])
        assert r["logprob_err"] <= 1e-6 and r["logprob_sum"] < 0
    assert [len(r["rewards"]) for r in results] == [5, 1]
    assert sum(r["ref"]["local"] for r in results) == results[0]["ref"]["total"]


GRPO = ["grpo", "--task_prompts", "64", "--task_eval_prompts", "7", "--prompts_per_step", "5", "--group_size", "4",
        "--max_new_tokens", "4", "--max_len", "32", "--steps", "3", "--eval_every", "3", "--engine", "vllm",
        "--enforce_eager", "true", "--gpu_memory_utilization", "0.05", "--tokens_per_micro_batch", "48",
        "--lr", "1e-3", "--device", "cpu", "--save_every", "0", "--reward_fn", "tests.trainer.rewards_for_tests:sevens"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--advantage", "grpo"], ["--advantage", "reinforce_pp"],
                                   ["--advantage", "grpo", "--lora_r", "8", "--lora_train_head", "true",
                                    "--kl_coef", "0.1", "--ppo_epochs", "2", "--lr", "1e-2"]],
                         ids=["grpo", "reinforce_pp", "grpo-lora-kl"])
@pytest.mark.vllm
def test_grpo_on_two_ranks_with_an_engine_each_trains_the_one_process_batch(extra, tmp_path):
    """5 prompts x 4 samples a step over 2 ranks (3 and 2 prompts, whole groups), each rank with
    its own in-process vLLM engine fed the gathered weights after every step and sampling its
    prompts with their global seeds: the samples, rewards, losses, gradient norms and held-out
    scores are the one-process run's (REINFORCE++ whitens over both ranks' tokens; with LoRA each
    rank's engine gets the merged weights, gathered one parameter at a time, and the KL is to the
    adapters-off reference), and the engines' log-probs match the trainer's after every push.
    Plain GRPO also runs with --rollout_tp 2: one vLLM engine sharded over both ranks, which
    generates their prompts together and hands each rank its own: the same run again."""
    pytest.importorskip("vllm")
    runs = {1: (1, []), 2: (2, [])}
    if extra == ["--advantage", "grpo"]:
        runs["tp2"] = (2, ["--rollout_tp", "2"])
    # vLLM's CPU TP segments carry the same names in every run: a previous run's must not stop this one
    # (vLLM refuses to start on them, errno 17), and this one leaves none behind
    shm = Path("/dev/shm")
    stale = shm / "-tp:0-[0-1]-cpushm_0"
    if "tp2" in runs and shm.is_dir():
        stale.write_bytes(b"\0" * 4096)
    rows = {}
    for name, (n, more) in runs.items():
        _train(GRPO + extra + more + ["--output_dir", str(tmp_path / f"n{name}")], n)
        rows[name] = _rows(tmp_path / f"n{name}")
    if "tp2" in runs and shm.is_dir():
        assert not list(shm.glob("*cpushm*"))
    assert len(rows[1]) == 4
    assert any(r.get("grad_norm", 0) > 0 for r in rows[1])  # the reward moves the policy
    for name in runs:
        assert len(rows[name]) == 4, name
        for a, b in zip(rows[1], rows[name]):
            for key, value in a.items():
                if isinstance(value, float) and key.split("/")[0] in ("reward", "loss", "grad_norm", "entropy",
                                                                     "eval", "clipfrac", "ratio_mean", "rollout", "kl"):
                    assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, a["step"], key)
            assert b.get("rollout/logprob_diff_max", 0.0) <= 1e-3


@pytest.mark.vllm
@pytest.mark.slow
def test_ppo_on_two_ranks_with_an_engine_each_trains_the_one_process_batch(tmp_path):
    """PPO with its critic (sharded too, initialised from the policy) and the KL-penalised rewards,
    GAE whitened over both ranks' tokens, the critic warmed up for a step, then a second run
    resumes from the two-rank checkpoint: every logged number is the one-process run's."""
    pytest.importorskip("vllm")
    args = [a if a != "grpo" else "ppo" for a in GRPO] + ["--group_size", "1", "--ppo_epochs", "1",
                                                          "--minibatches", "1", "--critic_warmup", "1",
                                                          "--critic_lr", "1e-3", "--kl_coef", "0.1",
                                                          "--save_every", "2"]
    rows = {}
    for n in (1, 2):
        _train(args + ["--output_dir", str(tmp_path / f"n{n}")], n)
        rows[n] = _rows(tmp_path / f"n{n}")
        assert (tmp_path / f"n{n}" / "critic" / "model.safetensors").exists()
    assert len(rows[1]) == len(rows[2]) == 4
    for a, b in zip(rows[1], rows[2]):
        for key, value in a.items():
            if isinstance(value, float) and key.split("/")[0] in ("reward", "loss", "grad_norm", "entropy", "eval",
                                                                 "kl", "value", "rollout", "kl_coef"):
                # explained variance is 1 - a ratio of variances: near 0 (a fresh critic) its equality is
                # that ratio's, to 1e-5 (the log keeps 6 decimals: -0.005508 against -0.005509 seen)
                near = 1e-5 if key == "value/explained_var" else 1e-6
                assert b[key] == pytest.approx(value, rel=1e-4, abs=near), (a["step"], key)
        assert b.get("rollout/logprob_diff_max", 0.0) <= 1e-3
    c1 = models.load_value_model(tmp_path / "n1" / "critic").state_dict()
    c2 = models.load_value_model(tmp_path / "n2" / "critic").state_dict()
    for k in c1:
        torch.testing.assert_close(c2[k], c1[k], rtol=1e-3, atol=1e-5, msg=k)
    # the two-rank checkpoint (policy and critic, weights and AdamW state, as shards) resumes on two ranks
    import shutil

    ckpt = tmp_path / "n2" / "checkpoints" / "step-2"
    assert (ckpt / "shards" / ".metadata").exists() and (ckpt / "critic" / "config.json").exists()
    out = tmp_path / "resumed"
    shutil.copytree(ckpt, out / "checkpoints" / "step-2")
    shutil.copy(tmp_path / "n2" / "config.json", out / "config.json")
    _train(args + ["--output_dir", str(out)], 2)
    resumed = _rows(out)
    later = [r for r in rows[2] if r["step"] > 2]
    assert [r["step"] for r in resumed] == [r["step"] for r in later] and later
    for a, b in zip(later, resumed):
        for key, value in a.items():
            if isinstance(value, float) and key.split("/")[0] in ("reward", "loss", "grad_norm", "entropy", "eval",
                                                                 "kl", "value", "kl_coef"):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.vllm
@pytest.mark.slow
def test_online_trainers_refuse_what_cannot_run_sharded():
    proc = _run(["grpo", "--device", "cpu", "--engine", "hf"], nproc=2, timeout=120)
    assert proc.returncode != 0 and "engine=vllm" in proc.stderr  # (torchrun exits 1 when a worker exits 2)
    proc = _run(["ppo", "--device", "cpu", "--prompts_per_step", "1"], nproc=2, timeout=120)
    assert proc.returncode != 0 and "fewer prompts than the 2 ranks" in proc.stderr
    proc = _run(["grpo", "--device", "cpu", "--engine", "vllm", "--rollout_tp", "3"], nproc=2, timeout=120)
    assert proc.returncode != 0 and "rollout_tp=3: the 2 ranks do not split into groups of 3" in proc.stderr
    proc = _run(["grpo", "--device", "cpu", "--engine", "vllm", "--rollout_tp", "2"], timeout=120)
    assert proc.returncode == 2 and "rollout_tp=2: one process has no ranks to group" in proc.stderr
