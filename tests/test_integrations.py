"""fastrlhf.integrations.trl: TRL's own GRPOTrainer and DPOTrainer with our fused log-probs train
exactly as TRL's do (GRPO: loss, KL, entropy, reward and gradient norm; DPO: loss, gradient norm,
rewards, log-probs, mean logits, token accuracy, entropy; to 1e-5), on the built-in model and on
a real architecture with an output bias (Phi) and a softcapped one (Gemma 2); the fused head
returns every field TRL's own does, equal to it."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import archs  # noqa: E402


def _run(trainer_cls, model_dir, out, tok=None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    prompts = [f"{a}+{b}=" for a, b in zip(range(12), range(30, 42))]
    ds = Dataset.from_list([{"prompt": p} for p in prompts])

    def reward(prompts, completions, **_):
        return [c.count("7") / max(1, len(c)) + 0.1 * len(c) for c in completions]

    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                     steps_per_generation=1, gradient_accumulation_steps=1, max_steps=3, learning_rate=1e-2,
                     beta=0.05, loss_type="dapo", temperature=0.9, use_vllm=False, use_cpu=True, logging_steps=1,
                     report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                     num_iterations=2, bf16=False)  # TRL turns bf16 autocast on by default, on a CPU too
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trainer_cls(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=tok or AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from fastrlhf.tasks import arithmetic as ar

    root = tmp_path_factory.mktemp("trl")
    out = {"toy": ar.save_base_model(root / "toy", **ar.MODEL_SIZES["tiny"])}
    for name in ("phi", "gemma2"):
        out[name] = archs.save_arch(name, root / name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy", "phi", "gemma2"])
def test_trl_grpo_with_fastrlhf_logprobs_trains_as_trl_does(name, model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    from trl import GRPOTrainer

    from fastrlhf.integrations import trl as ours

    theirs = _run(GRPOTrainer, model_dirs[name], tmp_path / "trl")
    mine = _run(ours.GRPOTrainer, model_dirs[name], tmp_path / "ours")
    assert len(theirs) == len(mine) == 3
    for a, b in zip(theirs, mine):
        # the first step's numbers to 1e-5; after two AdamW steps at lr 1e-2 the two log-prob paths'
        # float32 rounding has moved the weights apart a little (Gemma 2's step-3 KL: 2e-5 relative on an
        # Intel Xeon, under 1e-5 on an AMD EPYC), so 1e-4 from then on
        rel = 1e-5 if a["step"] == 1 else 1e-4
        for key in ("loss", "grad_norm", "kl", "entropy", "reward", "clip_ratio/region_mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (a["step"], key)
    assert any(r["grad_norm"] > 0 for r in theirs) and any(r["kl"] > 0 for r in theirs[1:])


def _run_dpo(trainer_cls, model_dir, out, **cfg_kw):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3) + "0" * (a % 2)}
            for a, b in zip(range(16), range(20, 36))]
    cfg = DPOConfig(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=3,
                    learning_rate=1e-2, beta=0.1, use_cpu=True, logging_steps=1, report_to=[], save_strategy="no",
                    seed=0, dataloader_num_workers=0, disable_tqdm=True, bf16=False, **cfg_kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    trainer = trainer_cls(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


DPO_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "mean_token_accuracy", "entropy")


@pytest.mark.slow
@pytest.mark.parametrize("name,cfg", [("toy", {}), ("phi", {}), ("gemma2", {"use_weighting": True})])
def test_trl_dpo_with_fastrlhf_logprobs_trains_as_trl_does(name, cfg, model_dirs, tmp_path, monkeypatch):
    """TRL's DPOTrainer asks its fused head for log-probs, entropy, mean logits and top-1 hits (and
    log sum p^2 with WPO's weighting): the logged trajectory is TRL's own."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    from trl import DPOTrainer

    from fastrlhf.integrations import trl as ours

    theirs = _run_dpo(DPOTrainer, model_dirs[name], tmp_path / "trl", **cfg)
    mine = _run_dpo(ours.DPOTrainer, model_dirs[name], tmp_path / "ours", **cfg)
    assert len(theirs) == len(mine) == 3
    for a, b in zip(theirs, mine):
        for key in DPO_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert theirs[-1]["loss"] != pytest.approx(theirs[0]["loss"], abs=1e-3)  # it trained
    assert all(r["grad_norm"] > 0 for r in theirs)


def test_the_fused_head_returns_trls_fields(model_dirs):
    """Our patched forward against TRL's patched forward on the same model: log-probs and
    entropies at every label position (0 at -100), the loss; an unknown field is refused."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head as trl_head

    from fastrlhf.integrations.trl import add_fused_lm_head

    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for name in ("gemma2", "phi"):
        outs = []
        for patch in (trl_head, add_fused_lm_head):
            model = AutoModelForCausalLM.from_pretrained(model_dirs[name], dtype=torch.float32)
            patch(model, temperature=0.7, outputs=fields)
            outs.append(model(input_ids=ids, labels=labels, fused_lm_head=True))
        a, b = outs
        for field in fields[:-1]:
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5, msg=field)
        assert torch.equal(b.is_top1, a.is_top1) and b.is_top1.dtype == torch.bool
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        assert all(torch.all(getattr(b, f)[:, :3] == 0) for f in fields)
        assert b.log_sum_sq_probs.requires_grad is False and b.log_probs.requires_grad
    with pytest.raises(ValueError, match="not \\['argmax'\\]"):
        add_fused_lm_head(AutoModelForCausalLM.from_pretrained(model_dirs["toy"]), outputs=("log_probs", "argmax"))
