"""The offline trainers on the built-in task: pinned numbers, exact resume, bad input."""

import json
import math
import random
import shutil

import pytest
import torch

from fastrlhf import cli, config, models, optim
from fastrlhf.algos import dpo, sft
from fastrlhf.tasks import arithmetic as ar

# the built-in task's sizes (as examples/*.yaml set them): the defaults are for 0.5-8B models
TOY = ["--max_len", "64", "--tokens_per_micro_batch", "4096"]

TINY_SFT = ["--task_examples", "300", "--task_model_size", "tiny", "--tokens_per_step", "64", "--warmup_steps", "2",
            "--lr", "2e-3",
            "--task_eval_prompts", "8", "--device", "cpu", *TOY]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_first_loss_is_uniform_then_falls_and_resume_is_exact(tmp_path):
    a = tmp_path / "a"
    cli.train("sft", TINY_SFT + ["--output_dir", str(a), "--max_steps", "6", "--save_every", "3",
                         "--eval_every", "3"])
    rows = _metrics(a)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # at init the model is close to uniform over the 16-token vocabulary: loss ~ ln 16
    assert rows[0]["loss/sft"] == pytest.approx(math.log(len(ar.VOCAB)), abs=0.25)
    assert rows[-1]["loss/sft"] < rows[0]["loss/sft"] - 0.3
    assert "eval/loss" in rows[2] and "eval/accuracy" in rows[5]
    assert (a / "final" / "model.safetensors").exists() and (a / "final" / "tokenizer.json").exists()

    # resume: a fresh run directory holding only the step-3 checkpoint continues exactly
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step-3", b / "checkpoints" / "step-3")
    # a crash while saving step 5 left its temp dir behind: it is not a checkpoint
    shutil.copytree(a / "checkpoints" / "step-3", b / "checkpoints" / "step-5.tmp")
    cli.train("sft", TINY_SFT + ["--output_dir", str(b), "--max_steps", "6", "--save_every", "3",
                         "--eval_every", "3"])
    resumed = _metrics(b)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for x, y in zip(rows[3:], resumed):
        assert y["loss/sft"] == pytest.approx(x["loss/sft"], abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_sft_epochs_of_different_step_counts_each_train_on_every_example(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")  # SFT's kernels run interpreted in the test above
    # packing by a token budget after a fresh shuffle gives each epoch its own number of steps;
    # the schedule counts them all (it once took epoch 0's count for every epoch: an epoch with
    # fewer steps crashed, one with more lost its tail)
    rng = random.Random(0)
    rows = [{"prompt": f"{i}+1=", "response": str(rng.randrange(10 ** rng.randint(0, 7)))} for i in range(60)]
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    ar.write_jsonl(rows, train)
    ar.write_jsonl(rows[:4], held)
    args = ["--data", str(train), "--eval_data", str(held), "--task_model_size", "tiny", "--tokens_per_step", "20",
            "--epochs", "3", "--warmup_steps", "1", "--eval_every", "1000", "--save_every", "0",
            "--device", "cpu", *TOY]
    cfg = config.load_config(sft.SFTConfig, args)
    seqs = sft.tokenize(ar.build_tokenizer(), rows, cfg.max_len)
    counts = [len(sft.epoch_split(seqs, cfg, e)) for e in range(3)]
    assert len(set(counts)) > 1, counts  # the case under test: epochs of different lengths
    out = tmp_path / "o"
    cli.train("sft", args + ["--output_dir", str(out)])
    logged = _metrics(out)
    assert len(logged) == sum(counts)
    per_epoch = [sum(r["tokens"] for r in logged if r["epoch"] == e) for e in range(3)]
    # every response token (its characters and the end token) once per epoch
    assert per_epoch == [sum(len(r["response"]) + 1 for r in rows)] * 3


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    real = models.token_logprobs
    calls = {"n": 0}

    def sometimes_nan(model, batch, **kw):
        calls["n"] += 1
        out = real(model, batch, **kw)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(models, "token_logprobs", sometimes_nan)
    out = tmp_path / "nan"
    summary = cli.train("sft", TINY_SFT + ["--output_dir", str(out), "--max_steps", "3", "--eval_every", "100",
                                   "--task_eval_prompts", "0"])
    assert summary["skipped_nonfinite"] == 1
    final = models.load_causal_lm(out / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())


@pytest.mark.parametrize("head_lr", [0.0, 1e-2])
def test_head_lr_gives_the_output_layer_its_own_step_size(head_lr):
    """Adam's first step moves every weight by lr * g / (|g| + eps), i.e. by exactly lr where the
    gradient is not tiny; the warm-up schedule scales each group (factor 1/4 at step 0 of 4).
    With head_lr the output layer moves by head_lr / 4 and the body by lr / 4; without it the
    optimiser keeps its two groups (decayed matrices, the rest) and everything moves by lr / 4."""
    model = ar.build_model(**ar.MODEL_SIZES["tiny"])
    head = list(model.get_output_embeddings().parameters())
    opt = optim.make_optimizer(model.parameters(), 1e-3, 0.0, head=head if head_lr else (), head_lr=head_lr)
    sched = optim.make_schedule(opt, 4, 10, "constant")
    assert len(opt.param_groups) == (3 if head_lr else 2)
    assert optim.lr_metrics(opt) == pytest.approx({"lr": 2.5e-4, **({"lr/head": 2.5e-3} if head_lr else {})})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p).sign() * (0.5 + torch.rand_like(p))  # |g| in [0.5, 1.5]
    opt.step()
    sched.step()
    for n, p in model.named_parameters():
        lr = (head_lr or 1e-3) if n == "lm_head.weight" else 1e-3
        assert (p.detach() - before[n]).abs() == pytest.approx(torch.full_like(p, lr / 4),
                                                               rel=1e-3), n  # float32 rounding of p + step
    assert optim.lr_metrics(opt)["lr"] == pytest.approx(5e-4)


@pytest.mark.slow
def test_cli_bad_data_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "1+2="\n')
    code = cli.main(["sft", "--data", str(bad), "--output-dir", str(tmp_path / "o"), "--device", "cpu", *TOY])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:2: invalid JSON" in err and "Traceback" not in err


def test_config_file_overrides_and_unknown_keys(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.01\nepochs: 2\n")
    cfg = config.load_config(sft.SFTConfig, ["--config", str(cfg_file), "--epochs", "5"])
    assert (cfg.lr, cfg.epochs) == (0.01, 5)  # file overrides defaults, flags override the file
    cfg_file.write_text("learning_rate: 0.01\n")
    with pytest.raises(SystemExit, match="unknown config field 'learning_rate'"):
        config.load_config(sft.SFTConfig, ["--config", str(cfg_file)])
    with pytest.raises(SystemExit, match="lr must be float, got 'fast'"):
        config.load_config(sft.SFTConfig, ["--lr", "fast"])
    with pytest.raises(SystemExit, match="loss_type must be one of"):
        config.load_config(dpo.DPOConfig, ["--loss_type", "kto"])


TINY_PAIRS = ["--task_pairs", "256", "--task_eval_pairs", "64", "--pairs_per_step", "32",
              "--warmup_steps", "1", "--device", "cpu", *TOY]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return str(ar.save_base_model(tmp_path_factory.mktemp("tiny") / "base", **ar.MODEL_SIZES["tiny"]))


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,first_loss,precompute,impl", [
    ("sigmoid", math.log(2), "true", "triton"),  # policy == reference at step 1: m = 0, -log sigmoid(0) = ln 2
    ("sigmoid", math.log(2), "false", "torch"),  # same, with reference log-probs computed every step
    ("ipo", 25.0, "true", "torch"),              # (0 - 1 / (2 * 0.1))^2
])
def test_dpo_starts_at_the_hand_derived_loss(tmp_path, tiny_base, loss_type, first_loss, precompute, impl,
                                             monkeypatch):
    """The first param runs DPO's kernels interpreted (Triton: 15 s), the others on their torch path
    (0.5 s): the kernels' loss types and options meet float64 in tests/kernels."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", impl)
    out = tmp_path / "dpo"
    summary = cli.train("dpo", TINY_PAIRS + ["--model", tiny_base, "--output_dir", str(out), "--max_steps", "3",
                                     "--loss_type", loss_type, "--precompute_ref", precompute,
                                     "--eval_every", "3", "--task_eval_prompts", "8", "--lr", "1e-3"])
    rows = _metrics(out)
    assert rows[0]["loss/dpo"] == pytest.approx(first_loss, rel=1e-5)
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss/dpo"] < first_loss  # it learns the training pairs
    assert {"eval/reward_accuracy", "eval/accuracy", "eval/sample_accuracy", "start/sample_accuracy"} <= set(summary)


@pytest.mark.slow
def test_reward_model_learns_a_learnable_preference(tmp_path, tiny_base):
    """Through --data/--eval_data files: chosen = the sum, rejected = the sum with a spurious
    trailing 0. A working Bradley-Terry trainer (pair alignment, last-token reward) separates
    held-out pairs; a broken one stays at chance."""
    task = ar.ArithmeticTask()
    for name, split, n in (("train", "train", 512), ("eval", "test", 64)):
        ar.write_jsonl([{"prompt": task.prompt(a, b), "chosen": str(a + b), "rejected": f"{a + b}0"}
                        for a, b in task.split(n, split)], tmp_path / f"{name}.jsonl")
    out = tmp_path / "rm"
    summary = cli.train("rm", ["--model", tiny_base, "--output_dir", str(out), "--data", str(tmp_path / "train.jsonl"),
                           "--eval_data", str(tmp_path / "eval.jsonl"), "--pairs_per_step", "32",
                           "--epochs", "2", "--lr", "3e-3", "--warmup_steps", "1", "--eval_every", "100",
                           "--device", "cpu", *TOY])
    rows = _metrics(out)
    assert rows[0] == {"step": 0, "start/loss": pytest.approx(math.log(2), abs=1e-6), "start/accuracy": 0.5}
    assert rows[1]["loss/rm"] == pytest.approx(math.log(2), abs=1e-6)  # fresh head: r = 0 for all
    assert summary["eval/accuracy"] > 0.9
    rm = models.load_value_model(out / "final")  # a reward-model directory transformers can load
    assert rm.config.architectures == ["LlamaForSequenceClassification"]


def test_rerun_resumes_from_the_checkpoint_without_duplicate_rows_or_a_lost_summary(tmp_path, tiny_base):
    """Rerunning a run in its own directory resumes from its last checkpoint (step 3 of 5): the
    metrics log keeps steps 0-3 and gets 4-5 again once (not twice), and the summary still holds
    the start/* scores measured at step 0, which the resumed run cannot measure again."""
    out = tmp_path / "rm"
    args = ["--model", tiny_base, "--output_dir", str(out), "--max_steps", "5", "--save_every", "3",
            "--eval_every", "2"] + TINY_PAIRS
    first = cli.train("rm", args)
    rows = _metrics(out)
    second = cli.train("rm", args)
    again = _metrics(out)
    assert [r["step"] for r in again] == [0, 1, 2, 3, 4, 5]
    assert again[:4] == rows[:4]  # kept as written
    for x, y in zip(rows[4:], again[4:]):  # logged again by an exact resume
        assert y["loss/rm"] == pytest.approx(x["loss/rm"], abs=1e-6)
    assert "start/accuracy" in first and second == pytest.approx(first)
    assert json.loads((out / "summary.json").read_text()) == pytest.approx(first)


@pytest.mark.slow
def test_logprob_reward_model_scores_by_likelihood_and_learns(tmp_path, tiny_base, monkeypatch):
    """head=logprob: r = beta * log p(response | prompt). The held-out loss before training equals
    the Bradley-Terry loss of beta * (log p(chosen) - log p(rejected)) from the base model's
    materialised float64 logits; training turns the ranking round (chosen is the longer answer,
    which an untrained likelihood ranks below); the saved directory is a causal LM that PPO/GRPO
    load as a log-prob reward model."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    task = ar.ArithmeticTask()
    for name, split, n in (("train", "train", 256), ("eval", "test", 32)):
        ar.write_jsonl([{"prompt": task.prompt(a, b), "chosen": f"{a + b}0", "rejected": str(a + b)}
                        for a, b in task.split(n, split)], tmp_path / f"{name}.jsonl")
    beta = 0.5
    base, tok = models.load_causal_lm(tiny_base).double(), models.load_tokenizer(tiny_base)

    def loglik(prompt, response):  # independent of the packed path: one padded sequence, float64
        ids = tok(prompt + response)["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(prompt)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(base(input_ids=torch.tensor([ids])).logits[0], -1)  # (T, V)
        return sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))

    evals = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    margins = torch.tensor([beta * (loglik(e["prompt"], e["chosen"]) - loglik(e["prompt"], e["rejected"]))
                            for e in evals], dtype=torch.float64)
    out = tmp_path / "rm"
    summary = cli.train("rm", ["--model", tiny_base, "--output_dir", str(out), "--head", "logprob", "--beta", str(beta),
                           "--data", str(tmp_path / "train.jsonl"), "--eval_data", str(tmp_path / "eval.jsonl"),
                           "--pairs_per_step", "32", "--epochs", "4", "--lr", "3e-3", "--warmup_steps", "1",
                           "--eval_every", "100", "--device", "cpu", *TOY])
    assert summary["start/loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(), rel=1e-4)
    assert summary["start/accuracy"] == pytest.approx((margins > 0).double().mean().item())
    assert summary["start/accuracy"] < 0.5 and summary["eval/accuracy"] > 0.9
    assert models.reward_head(out / "final") == "logprob"
    rm = models.load_reward_model(out / "final")
    assert rm.config.architectures == ["LlamaForCausalLM"] and rm.config.reward_beta == beta


@pytest.mark.slow
def test_simpo_trains_without_a_reference(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")  # DPO's kernels run interpreted above
    loaded = []
    real = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loaded.append(a) or real(*a, **k))
    out = tmp_path / "simpo"
    cli.train("dpo", TINY_PAIRS + ["--task_pairs", "32", "--model", tiny_base, "--output_dir", str(out),
                                   "--max_steps", "3",
                           "--loss_type", "simpo", "--beta", "2.0", "--gamma", "0.5", "--lr", "1e-3",
                           "--eval_every", "100", "--task_eval_prompts", "0"])
    rows = _metrics(out)
    assert len(loaded) == 1  # the policy only: SimPO has no reference model
    # one step is all 32 pairs: every step sees the same batch, so a working update lowers its loss
    assert rows[2]["loss/dpo"] < rows[1]["loss/dpo"] < rows[0]["loss/dpo"]
