"""GRPO and PPO end to end on the tiny built-in model: the reward rises, resume reproduces the
trajectory, the vLLM engine's log-probs match the trainer's after every weight push, reward
failures are counted and skipped, bad settings fail with one clear line."""

import json
import shutil

import pytest
import torch

from fastrlhf import cli, models
from fastrlhf.algos import grpo, ppo, update
from fastrlhf.algos.batch import RolloutBatch
from fastrlhf.tasks import arithmetic as ar

# the built-in task's sizes (as examples/*.yaml set them): the defaults are for 0.5-8B models
TOY = ["--max_len", "64", "--tokens_per_micro_batch", "4096"]

REWARD = "tests.trainer.rewards_for_tests:sevens"


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(ar.save_base_model(tmp_path_factory.mktemp("tiny") / "base", **ar.MODEL_SIZES["tiny"]))


def _grpo_args(tiny, out, *extra):
    return ["--model", tiny, "--output_dir", str(out), "--reward_fn", REWARD, "--engine", "hf",
            "--prompts_per_step", "8", "--group_size", "4", "--max_new_tokens", "4", "--lr", "3e-3",
            "--task_prompts", "200", "--task_eval_prompts", "8", "--device", "cpu", *TOY, *extra]


@pytest.mark.slow
def test_grpo_reward_rises_and_resume_is_exact(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")  # the interpreted kernels: the tests below
    a = tmp_path / "a"
    cli.train("grpo", _grpo_args(tiny, a, "--steps", "12", "--save_every", "6", "--eval_every", "6"))
    rows = _metrics(a)[1:]  # row 0: the evaluation before training
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = (sum(r["reward/mean"] for r in rows[i:i + 4]) / 4 for i in (0, 8))
    assert last > first + 0.1, (first, last)
    assert all(r["rollout/logprob_diff_max"] < 1e-4 and r["rollout/engine"] == "hf" for r in rows)
    assert {"entropy", "clipfrac", "loss/policy", "time/generate_s", "time/weight_sync_s",
            "time/train_s", "tokens_per_s"} <= set(rows[0])
    assert "kl" not in rows[0]  # no reference, no KL term: not logged as a 0
    # a fresh directory holding only the step-6 checkpoint continues exactly
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step-6", b / "checkpoints" / "step-6")
    cli.train("grpo", _grpo_args(tiny, b, "--steps", "12", "--save_every", "6", "--eval_every", "6"))
    resumed = _metrics(b)
    assert [r["step"] for r in resumed] == list(range(7, 13))
    for x, y in zip(rows[6:], resumed):
        assert y["reward/mean"] == x["reward/mean"]
        assert y["loss/policy"] == pytest.approx(x["loss/policy"], abs=1e-6)


@pytest.mark.slow
def test_grpo_reward_failures_are_counted_and_multi_epoch_ratios_move(tiny, tmp_path):
    out = tmp_path / "f"
    summary = cli.train("grpo", _grpo_args(tiny, out, "--steps", "2",
                                           "--reward_fn", "tests.trainer.rewards_for_tests:flaky",
                                   "--ppo_epochs", "2", "--minibatches", "2", "--advantage", "rloo",
                                   "--kl_coef", "0.1", "--eval_every", "100"))
    rows = _metrics(out)[1:]
    assert summary["reward_failures"] == rows[-1]["reward_failures"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)
    # 2 epochs x 2 minibatches: later updates see ratios != 1 and a nonzero KL to the reference
    assert rows[0]["approx_kl"] > 0 and rows[0]["kl"] > 0


@pytest.mark.slow
def test_grpo_on_policy_with_failed_rewards_reports_the_trained_samples(tiny, tmp_path, monkeypatch):
    """One epoch, one minibatch: the trainer's log-probs come from the training pass, which skips
    failed samples; the log-prob check covers the others (it used to crash on the skipped ones)."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    out = tmp_path / "p"
    cli.train("grpo", _grpo_args(tiny, out, "--steps", "2", "--reward_fn", "tests.trainer.rewards_for_tests:flaky",
                         "--eval_every", "100"))
    rows = _metrics(out)[1:]
    assert rows[-1]["reward_failures"] > 0
    assert all(0 <= r["rollout/logprob_diff_max"] < 1e-4 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["--surrogate", "cispo", "--clip_low", "1.0", "--clip_high", "4.0"],
                                     ["--ratio_level", "sequence"],
                                     ["--surrogate", "sapo", "--sapo_tau_neg", "2.0"],
                                     ["--is_mode", "mask", "--is_level", "sequence", "--is_cap", "3.0"]],
                         ids=["cispo", "gspo", "sapo", "sequence-mis"])
def test_grpo_cispo_and_gspo_learn(variant, tiny, tmp_path, monkeypatch):
    """The policy-loss variants through the trainer, 2 epochs over each batch (ratios away from 1):
    the reward rises as with the clipped token-level surrogate; the variant is in config.json."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    out = tmp_path / "v"
    cli.train("grpo", _grpo_args(tiny, out, "--steps", "12", "--eval_every", "12", "--ppo_epochs", "2", *variant))
    rows = _metrics(out)[1:]
    first, last = (sum(r["reward/mean"] for r in rows[i:i + 4]) / 4 for i in (0, 8))
    assert last > first + 0.1, (first, last)
    assert any(r["ratio_mean"] != 1.0 for r in rows)
    # the sampler is the trainer here (engine hf): every raw IS ratio is 1 to float noise, none dropped
    assert all(abs(r["rollout/is_ratio_mean"] - 1) < 1e-4 and r["rollout/is_masked_frac"] == 0 for r in rows)
    assert all(abs(r["rollout/is_ratio_max"] - 1) < 1e-4 for r in rows)  # logged (it was not, at first)
    saved = json.loads((out / "config.json").read_text())
    assert saved[variant[0][2:]] == variant[1]


@pytest.mark.slow
def test_grpo_gspo_cispo_on_a_real_architecture(tmp_path, monkeypatch):
    """A random-weight Qwen3 (q/k norms) with its BPE tokenizer and chat template, chat prompts,
    TRL's batched reward: GSPO's sequence ratio with CISPO's weight, 2 epochs per batch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests import archs
    from tests.trainer.test_real_models import CHAT, data_file

    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    model = archs.save_arch("qwen3", tmp_path / "qwen3")
    prompts = data_file(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in CHAT if "prompt" in r])
    out = tmp_path / "run"
    cli.train("grpo", ["--model", str(model), "--data", str(prompts), "--eval_data", str(prompts), "--engine", "hf",
                       "--reward_fn", "tests.trainer.rewards_for_tests:spaces", "--max_len", "96",
                       "--max_new_tokens", "12", "--prompts_per_step", "4", "--group_size", "4", "--steps", "2",
                       "--ppo_epochs", "2", "--lr", "1e-3", "--eval_every", "2", "--device", "cpu", "--output_dir",
                       str(out), "--surrogate", "cispo", "--clip_low", "1.0", "--clip_high", "4.0",
                       "--ratio_level", "sequence"])
    rows = _metrics(out)[1:]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)
    assert all(r["rollout/logprob_diff_max"] <= 1e-3 for r in rows)
    assert rows[-1]["ratio_mean"] != 1.0  # the second epoch saw moved ratios


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_on_vllm_logprobs_match_after_every_push(tiny, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "v"
    cli.train("grpo", _grpo_args(tiny, out, "--engine", "vllm", "--enforce_eager", "true", "--steps", "3",
                         "--eval_every", "3", "--gpu_memory_utilization", "0.05"))
    rows = _metrics(out)
    assert all(r["rollout/engine"] == "vllm" for r in rows)
    assert all(r["rollout/logprob_diff_max"] <= 1e-3 for r in rows[1:])
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]


@pytest.mark.slow
def test_ppo_with_reward_model_runs_saves_critic_and_resumes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    rm_dir = tmp_path / "rm"
    rm = models.load_value_model(tiny)
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a reward model with opinions
    models.save_pretrained_atomic(rm, models.load_tokenizer(tiny), rm_dir)
    args = lambda out: ["--model", tiny, "--reward_model", str(rm_dir), "--output_dir", str(out),  # noqa: E731
                        "--engine", "hf", "--prompts_per_step", "16", "--max_new_tokens", "4", "--steps", "4",
                        "--save_every", "2", "--eval_every", "2", "--lr", "1e-3", "--task_prompts", "200",
                        "--task_eval_prompts", "8", "--device", "cpu", *TOY]
    a = tmp_path / "a"
    cli.train("ppo", args(a))
    rows = _metrics(a)[1:]
    assert {"loss/value", "value/clipfrac", "kl", "kl_coef", "reward/kl_penalty"} <= set(rows[0])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert rows[1]["kl"] != 0.0
    assert models.load_value_model(a / "critic") is not None
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step-2", b / "checkpoints" / "step-2")
    cli.train("ppo", args(b))
    for x, y in zip(rows[2:], _metrics(b)):
        assert y["reward/mean"] == pytest.approx(x["reward/mean"], abs=1e-6)
        assert y["loss/value"] == pytest.approx(x["loss/value"], abs=1e-5)


@pytest.mark.slow
def test_ppo_on_policy_skips_the_old_logprob_pass_with_the_same_updates(tiny, tmp_path, monkeypatch):
    """One epoch, one minibatch: the KL reward takes the sampler's log-probs and the ratio the
    training forward's, instead of a separate pass recomputing them. The runs agree with the
    recomputing path to the sampler-vs-trainer mismatch (< 1e-4 with the HF engine), the
    separate pass is skipped, and the log-prob check still pairs each sample with its own row."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    args = lambda out: ["--model", tiny, "--reward_fn", REWARD, "--output_dir", str(out), "--engine", "hf",  # noqa: E731
                        "--prompts_per_step", "16", "--max_new_tokens", "4", "--steps", "3", "--ppo_epochs", "1",
                        "--minibatches", "1", "--eval_every", "100", "--save_every", "0", "--lr", "1e-3",
                        "--task_prompts", "200", "--task_eval_prompts", "8", "--device", "cpu", *TOY]
    passes = []
    real = RolloutBatch.logprobs
    monkeypatch.setattr(RolloutBatch, "logprobs", lambda self, m, *a: passes.append(m) or real(self, m, *a))
    cli.train("ppo", args(tmp_path / "on"))
    assert len(passes) == 3  # the reference's only, once per step
    for module in (ppo, update):
        monkeypatch.setattr(module, "on_policy", lambda cfg: False)
    cli.train("ppo", args(tmp_path / "recompute"))
    assert len(passes) == 3 + 6
    on, rec = _metrics(tmp_path / "on")[1:], _metrics(tmp_path / "recompute")[1:]
    assert abs(on[2]["kl"]) > 1e-3  # the policy has moved: the KL term is live
    for x, y in zip(on, rec):
        assert 0 <= x["rollout/logprob_diff_max"] < 1e-4
        for key in ("reward/mean", "kl", "loss/value", "loss/policy", "grad_norm", "entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-4), key
        assert x["clipfrac"] == 0 and x["ratio_mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_ppo_critic_warmup_holds_the_policy_and_trains_the_critic(tiny, tmp_path, monkeypatch):
    """critic_warmup=2: steps 1-2 update only the critic, so step 3 samples from the unchanged
    policy (its KL to the reference, the same weights, is exactly 0) while the critic has moved;
    from step 3 on the policy learns (step 4's KL is not 0)."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    out = tmp_path / "w"
    cli.train("ppo", ["--model", tiny, "--reward_fn", REWARD, "--output_dir", str(out), "--engine", "hf",
              "--prompts_per_step", "16", "--max_new_tokens", "4", "--steps", "4", "--critic_warmup", "2",
              "--eval_every", "100", "--save_every", "0", "--lr", "1e-3", "--task_prompts", "200",
              "--task_eval_prompts", "8", "--device", "cpu", *TOY])
    rows = _metrics(out)[1:]
    assert [r["kl"] for r in rows[:3]] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert "grad_norm" not in rows[0] and "grad_norm" not in rows[1] and "grad_norm" in rows[2]
    assert abs(rows[3]["kl"]) > 1e-4
    assert rows[2]["value/mean"] != rows[0]["value/mean"]
    # the fresh zero head predicts 0 everywhere: it explains none of the returns' variance
    assert rows[0]["value/explained_var"] == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["value/explained_var"] != pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_ppo_head_lr_steps_the_output_layer_at_its_own_rate(tiny, tmp_path, monkeypatch):
    """--head_lr reaches the policy's optimiser: after one update (Adam's first step moves a weight
    by its lr wherever the gradient is not tiny) the largest change of an lm_head weight is
    head_lr and of any other weight lr; both are logged."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    out = tmp_path / "h"
    cli.train("ppo", ["--model", tiny, "--reward_fn", REWARD, "--output_dir", str(out), "--engine", "hf",
              "--prompts_per_step", "16", "--max_new_tokens", "4", "--steps", "1", "--lr", "1e-4",
              "--head_lr", "1e-2", "--ppo_epochs", "1", "--minibatches", "1", "--eval_every", "100",
              "--save_every", "0", "--task_prompts", "200", "--task_eval_prompts", "8", "--device", "cpu", *TOY])
    before = dict(models.load_causal_lm(tiny).named_parameters())
    after = models.load_causal_lm(out / "final").named_parameters()
    moved = {n: (p - before[n]).abs().max().item() for n, p in after}
    assert moved.pop("lm_head.weight") == pytest.approx(1e-2, rel=1e-3)
    assert max(moved.values()) == pytest.approx(1e-4, rel=1e-2)
    assert _metrics(out)[1]["lr/head"] == pytest.approx(1e-2) and _metrics(out)[1]["lr"] == pytest.approx(1e-4)


@pytest.mark.slow
def test_ppo_token_rewards_from_a_logprob_reward_model(tiny, tmp_path, monkeypatch):
    """A logprob reward model scores a sample beta * log p_rm(completion). token_rewards spreads
    that sum over the completion's tokens: the same samples get the same reward/mean, but the
    critic's returns (and so its loss) change, the policy's credit differs, and the runs part
    after the first update. A value-head reward model refuses token_rewards by name."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    lm, tok = models.load_causal_lm(tiny), models.load_tokenizer(tiny)
    torch.manual_seed(0)
    for p in lm.parameters():
        p.data += 0.05 * torch.randn_like(p)
    lm.config.reward_head, lm.config.reward_beta = "logprob", 2.0
    rm_dir = models.save_pretrained_atomic(lm, tok, tmp_path / "rm")
    args = lambda out, *x: ["--model", tiny, "--reward_model", str(rm_dir), "--output_dir", str(out),  # noqa: E731
                            "--engine", "hf", "--prompts_per_step", "16", "--max_new_tokens", "4", "--steps", "2",
                            "--eval_every", "100", "--save_every", "0", "--lr", "1e-3", "--task_prompts", "200",
                            "--task_eval_prompts", "8", "--device", "cpu", *TOY, *x]
    cli.train("ppo", args(tmp_path / "seq"))
    cli.train("ppo", args(tmp_path / "tok", "--token_rewards", "true"))
    seq, tok_rows = _metrics(tmp_path / "seq")[1:], _metrics(tmp_path / "tok")[1:]
    assert tok_rows[0]["reward/mean"] == pytest.approx(seq[0]["reward/mean"], abs=1e-5)
    assert seq[0]["reward/mean"] < -1.0  # 2 * log p of a few tokens under an opinionated model
    assert tok_rows[0]["loss/value"] != pytest.approx(seq[0]["loss/value"], abs=1e-4)
    assert tok_rows[1]["reward/mean"] != pytest.approx(seq[1]["reward/mean"], abs=1e-6)
    vm = models.load_value_model(tiny)
    models.save_pretrained_atomic(vm, tok, tmp_path / "vrm")
    with pytest.raises(ValueError, match="token_rewards needs a logprob reward model"):
        cli.train("ppo", args(tmp_path / "v", "--token_rewards", "true", "--reward_model", str(tmp_path / "vrm")))


def test_cli_bad_reward_function_is_one_clear_line(tiny, tmp_path, capsys):
    code = cli.main(["grpo", "--model", tiny, "--reward_fn", "no_such_module:f", "--engine", "hf",
                     "--max_new_tokens", "8", "--output-dir", str(tmp_path / "o"), "--device", "cpu", *TOY])
    err = capsys.readouterr().err
    assert code == 2 and "reward function 'no_such_module:f'" in err and "Traceback" not in err


def test_cli_bad_settings_are_one_clear_line(tiny, tmp_path, capsys):
    code = cli.main(["rm", "--model", tiny, "--head", "pairwise", "--output-dir", str(tmp_path / "r"),
                     "--device", "cpu", *TOY])
    err = capsys.readouterr().err
    assert code == 2 and "head 'pairwise': expected one of ('value', 'logprob')" in err and "Traceback" not in err
    code = cli.main(["ppo", "--model", tiny, "--token_rewards", "true", "--engine", "hf", "--max_new_tokens", "8",
                     "--output-dir", str(tmp_path / "p"), "--device", "cpu", *TOY])
    err = capsys.readouterr().err
    assert code == 2 and "token_rewards needs a logprob reward model" in err and "Traceback" not in err
    code = cli.main(["grpo", "--model", tiny, "--head_lr=-1e-3", "--engine", "hf", "--max_new_tokens", "8",
                     "--output-dir", str(tmp_path / "g"), "--device", "cpu", *TOY])
    err = capsys.readouterr().err
    assert code == 2 and "head_lr=-0.001: expected >= 0" in err and "Traceback" not in err
    code = cli.main(["grpo", "--model", tiny, "--engine", "hf", "--max_new_tokens", "64",
                     "--output-dir", str(tmp_path / "g2"), "--device", "cpu", *TOY])
    err = capsys.readouterr().err
    assert code == 2 and "max_new_tokens=64: expected 0 < max_new_tokens < max_len=64" in err


def test_unknown_advantage_and_engine():
    with pytest.raises(ValueError, match="advantage 'ppo'"):
        grpo.check(grpo.GRPOConfig(advantage="ppo"))
    from fastrlhf.rollout import make_engine
    with pytest.raises(ValueError, match="rollout engine 'sglang'"):
        make_engine("sglang", model_dir="", policy=None, tokenizer=None, max_model_len=8, seed=0)
