"""LoRA (PEFT adapters) for every trainer, on the built-in model and on real architectures.

Against outside references: the weights pushed to the engine and saved in final/ equal PEFT's
own merge_and_unload (Llama, a tied Qwen2 with a trained head, GPT-2's Conv1D, Phi's biased
head); the reference (adapters off) equals the base model loaded on its own; a saved adapter
reloaded with PeftModel.from_pretrained, and the merged final/ loaded by transformers, give the
trainer's log-probs; the trainable-parameter count is the hand-derived r * (in + out) per
adapted layer. Trainers: SFT resumes exactly from an adapter-only checkpoint; DPO starts at
ln 2 (policy == reference) and the per-step reference equals the precomputed one; GRPO on vLLM
after LoRA SFT of a tied Qwen2 (its adapter directory as --model) keeps the sampler within 1e-3
of the trainer after every merged push; PPO trains a LoRA policy and critic; the reward model
trains adapters and its value head.
"""

import copy
import gc
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf import cli, config, data, lora, models
from fastrlhf.algos import sft
from fastrlhf.tasks import arithmetic as ar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import archs  # noqa: E402
from tests.trainer.test_real_models import CHAT, data_file  # noqa: E402

TOY = ["--max_len", "64", "--tokens_per_micro_batch", "4096"]


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {name: archs.save_arch(name, root / name) for name in ("qwen2-tied", "gpt2", "phi")}
    out["toy"] = ar.save_base_model(root / "toy", **ar.MODEL_SIZES["tiny"])
    return out


def _cfg(*flags):
    return config.load_config(sft.SFTConfig, ["--lora_r", "4", "--device", "cpu", *flags])


def _adapted(path, *flags, seed=0):
    """A LoRA model on path with every trainable parameter moved off its initial value (B = 0
    would make the adapters a no-op)."""
    model = models.load_trained(path, _cfg(*flags), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch(model, lengths=(9, 14, 5)):
    g = torch.Generator().manual_seed(1)
    V = model.get_output_embeddings().weight.shape[0]
    return data.pack([(s, s) for s in (torch.randint(0, V, (n,), generator=g).tolist() for n in lengths)], 256)[0]


@pytest.mark.parametrize("name,flags", [("toy", ()), ("qwen2-tied", ("--lora_train_head", "true")),
                                        ("gpt2", ()), ("phi", ("--lora_train_head", "true"))])
def test_merged_weights_equal_peft_merge_and_unload(name, flags, dirs):
    model = _adapted(dirs[name], *flags)
    ours = dict(lora.merged_weights(model))
    theirs = copy.deepcopy(model).merge_and_unload()
    expected = dict(theirs.named_parameters())  # each parameter once (a tied output layer is its embedding)
    assert set(ours) == set(expected), set(ours) ^ set(expected)
    for k, v in expected.items():
        assert (ours[k].float() - v.float()).abs().max() <= 1e-6, k
    # and the merged model computes what the adapted one does
    mb = _batch(model)
    with torch.no_grad():
        assert (models.token_logprobs(theirs, mb) - models.token_logprobs(model, mb)).abs().max() <= 1e-5


@pytest.mark.parametrize("name,flags", [("toy", ()), ("qwen2-tied", ("--lora_train_head", "true"))])
def test_the_reference_is_the_base_with_adapters_off(name, flags, dirs):
    policy = _adapted(dirs[name], *flags)
    policy.train()
    ref = models.reference(policy, dirs[name], device="cpu", dtype=torch.float32)
    base = models.load_causal_lm(dirs[name])
    mb = _batch(policy)
    with torch.no_grad():
        off, on, alone = (models.token_logprobs(m, mb) for m in (ref, policy, base))
    assert (off - alone).abs().max() <= 1e-6
    assert (on - alone).abs().max() > 1e-2  # the adapters (and the trained head) do change the policy
    assert policy.training  # the reference pass left the policy as it was, adapters on
    with torch.no_grad():
        assert torch.equal(models.token_logprobs(policy, mb), on)


def test_saved_adapter_and_merged_final_reload_to_the_trainers_logprobs(dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _adapted(dirs["qwen2-tied"], "--lora_train_head", "true")
    tok = models.load_tokenizer(dirs["qwen2-tied"])
    models.save_pretrained_atomic(model, tok, tmp_path / "final")
    mb = _batch(model)
    with torch.no_grad():
        want = models.token_logprobs(model, mb)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
        assert merged.config.tie_word_embeddings  # the trained head is its trained embedding
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["qwen2-tied"]),
                                            tmp_path / "final" / "adapter")
        for loaded in (merged, adapter):
            models._register_attention()
            loaded.config._attn_implementation = models.ATTN
            assert (models.token_logprobs(loaded, mb) - want).abs().max() <= 1e-5
    # an adapter directory wherever a model directory goes (a frozen reference, `fastrlhf pairs`): merged on load
    with torch.no_grad():
        assert (models.token_logprobs(models.load_causal_lm(tmp_path / "final" / "adapter"),
                                      mb) - want).abs().max() <= 1e-5
    # an adapter directory as --model: the run starts from its base with the adapter merged in
    start = models.start_dir(str(tmp_path / "final" / "adapter"), tmp_path / "run")
    assert start == str(tmp_path / "run" / "base")
    with torch.no_grad():
        assert (models.token_logprobs(models.load_causal_lm(start), mb) - want).abs().max() <= 1e-5


def test_the_trainable_parameters_are_the_adapters(dirs):
    model = models.load_trained(dirs["toy"], _cfg(), torch.device("cpu"))
    c = model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    H, I = c.hidden_size, c.intermediate_size  # noqa: E741 (the config's names)
    per_layer = 4 * ((H + H) + (H + kv) + (H + kv) + (H + H)) + 4 * ((H + I) + (H + I) + (I + H))  # r (in + out)
    n = lora.counts(model)
    assert n["params/trainable"] == c.num_hidden_layers * per_layer
    assert n["params/total"] == sum(p.numel() for p in models.load_causal_lm(dirs["toy"]).parameters()) + \
        n["params/trainable"]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    head = lora.counts(models.load_trained(dirs["toy"], _cfg("--lora_train_head", "true"), torch.device("cpu")))
    assert head["params/trainable"] == n["params/trainable"] + c.vocab_size * H


def test_in_bf16_the_base_is_bf16_and_what_trains_is_float32(dirs):
    """--dtype bfloat16 (CPU autocast here, as on a GPU): the frozen base is stored in bf16 (no
    float32 copy), the adapters and the trained head in float32 (master precision for AdamW), and
    a step under autocast moves them; the merged weights come out float32 for the engine to cast."""
    from fastrlhf import optim

    model = models.load_trained(dirs["qwen2-tied"], _cfg("--dtype", "bfloat16", "--lora_train_head", "true"),
                                torch.device("cpu"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trained = [p for _, p in named]
    assert frozen == {torch.bfloat16} and {p.dtype for p in trained} == {torch.float32}
    before = [p.detach().clone() for p in trained]
    prec = optim.Precision("bfloat16", torch.device("cpu"))
    opt = optim.make_optimizer(model.parameters(), 1e-2, 0.0)
    with prec.autocast():
        loss = -models.token_logprobs(model, _batch(model)).sum()
    loss.backward()
    opt.step()
    moved = {n for (n, p), old in zip(named, before) if not torch.equal(old, p)}
    # B starts at 0, so A's first gradient is 0: every B and the trained head (= embedding) move
    assert {n for n, _ in named if "lora_B" in n or "modules_to_save" in n} <= moved
    merged = dict(lora.merged_weights(model))
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


@pytest.mark.parametrize("flags,message", [
    (["--lora_train_head", "true"], "lora_train_head: .* set lora_r > 0"),
    (["--lora_r", "4", "--head_lr", "1e-3"], "head_lr=0.001: with LoRA the output layer is frozen"),
    (["--lora_r", "4", "--lora_dropout", "1.0"], "lora_dropout=1.0: expected >= 0 and < 1"),
    (["--lora_r", "4", "--lora_target_modules", "q_proj,,v_proj"], "lora_target_modules="),
])
def test_lora_settings_that_cannot_be_right_are_refused(flags, message):
    from fastrlhf.algos import grpo

    with pytest.raises((SystemExit, ValueError), match=message):
        config.load_config(grpo.GRPOConfig, flags)


def test_a_target_module_the_model_lacks_is_named(dirs):
    with pytest.raises(ValueError, match="lora_target_modules='qkv_proj'"):
        models.load_trained(dirs["toy"], _cfg("--lora_target_modules", "qkv_proj"), torch.device("cpu"))


# ----------------------------------------------------------------------------------------
# the trainers
# ----------------------------------------------------------------------------------------

TINY_SFT = ["--task_examples", "300", "--task_model_size", "tiny", "--tokens_per_step", "64", "--warmup_steps", "2",
            "--lr", "1e-2", "--task_eval_prompts", "8", "--device", "cpu", "--lora_r", "8", *TOY]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_sft_learns_and_resumes_exactly_from_an_adapter_checkpoint(tmp_path):
    a = tmp_path / "a"
    summary = cli.train("sft", TINY_SFT + ["--output_dir", str(a), "--max_steps", "6", "--save_every", "3",
                                           "--eval_every", "3"])
    rows = _metrics(a)
    assert rows[0]["loss/sft"] == pytest.approx(math.log(len(ar.VOCAB)), abs=0.25)  # B = 0: the base's loss
    assert rows[-1]["loss/sft"] < rows[0]["loss/sft"] - 0.3
    ckpt = a / "checkpoints" / "step-3"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert summary["params/trainable"] < summary["params/total"] / 5
    assert (a / "final" / "model.safetensors").exists() and (a / "final" / "adapter" / "adapter_config.json").exists()
    b = tmp_path / "b"
    shutil.copytree(ckpt, b / "checkpoints" / "step-3")
    shutil.copytree(a / "base", b / "base")  # the adapters' base (the built-in task writes the same one again)
    cli.train("sft", TINY_SFT + ["--output_dir", str(b), "--max_steps", "6", "--save_every", "3", "--eval_every", "3"])
    for x, y in zip(rows[3:], _metrics(b)):
        assert y["loss/sft"] == pytest.approx(x["loss/sft"], abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_lora_dpo_starts_at_ln2_and_its_per_step_reference_is_the_base(tmp_path, dirs):
    """B = 0: policy == reference at step 1, so the loss is -log sigmoid(0) = ln 2. With the
    reference recomputed every step (adapters off, on a policy that has moved) the trajectory
    equals the one with reference log-probs precomputed before training."""
    runs = {}
    for pre in ("true", "false"):
        out = tmp_path / pre
        cli.train("dpo", ["--model", str(dirs["toy"]), "--output_dir", str(out), "--task_pairs", "96",
                          "--task_eval_pairs", "16", "--pairs_per_step", "32", "--max_steps", "3",
                          "--warmup_steps", "1", "--lr", "1e-2", "--eval_every", "3", "--task_eval_prompts", "8",
                          "--device", "cpu", "--lora_r", "8", "--precompute_ref", pre, *TOY])
        runs[pre] = _metrics(out)
    assert runs["true"][0]["loss/dpo"] == pytest.approx(math.log(2), rel=1e-5)
    assert runs["true"][-1]["loss/dpo"] < math.log(2) - 0.01  # it moved away from its reference
    for x, y in zip(runs["true"], runs["false"]):
        assert y["loss/dpo"] == pytest.approx(x["loss/dpo"], rel=1e-5)


@pytest.mark.slow
def test_lora_reward_model_trains_adapters_and_its_value_head(tmp_path, dirs):
    """The learnable preference of the full-training test (chosen = the sum, rejected = the sum
    with a spurious trailing 0), learnt through adapters and the value head alone."""
    task = ar.ArithmeticTask()
    for name, split, n in (("train", "train", 512), ("eval", "test", 64)):
        ar.write_jsonl([{"prompt": task.prompt(a, b), "chosen": str(a + b), "rejected": f"{a + b}0"}
                        for a, b in task.split(n, split)], tmp_path / f"{name}.jsonl")
    out = tmp_path / "rm"
    summary = cli.train("rm", ["--model", str(dirs["toy"]), "--output_dir", str(out), "--data",
                               str(tmp_path / "train.jsonl"), "--eval_data", str(tmp_path / "eval.jsonl"),
                               "--pairs_per_step", "32", "--epochs", "2", "--lr", "1e-2", "--warmup_steps", "1",
                               "--eval_every", "100", "--device", "cpu", "--lora_r", "8", *TOY])
    rows = _metrics(out)
    assert rows[1]["loss/rm"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh (zero) head: r = 0 for all
    assert summary["eval/accuracy"] > 0.9
    rm = models.load_value_model(out / "final")  # merged: a sequence-classification directory
    assert rm.config.architectures == ["LlamaForSequenceClassification"]
    assert rm.score.weight.abs().sum() > 0  # the head was trained, and saved under its own name
    assert summary["params/trainable"] > 0 and (out / "final" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_lora_ppo_trains_policy_and_critic_adapters(tmp_path, dirs):
    out = tmp_path / "ppo"
    cli.train("ppo", ["--model", str(dirs["toy"]), "--output_dir", str(out), "--reward_fn",
                      "tests.trainer.rewards_for_tests:sevens", "--engine", "hf", "--prompts_per_step", "8",
                      "--group_size", "2", "--max_new_tokens", "4", "--lr", "1e-2", "--critic_lr", "1e-2",
                      "--task_prompts", "100", "--task_eval_prompts", "4", "--steps", "3", "--ppo_epochs", "2",
                      "--save_every", "2", "--device", "cpu", "--lora_r", "8", *TOY])
    rows = _metrics(out)[1:]
    assert all(r["rollout/logprob_diff_max"] <= 1e-3 for r in rows)
    assert rows[-1]["kl"] > 0  # the reference (adapters off) and the trained policy differ
    assert (out / "checkpoints" / "step-2" / "critic" / "adapter_model.safetensors").exists()
    critic = models.load_value_model(out / "critic")  # merged critic, its head trained
    assert critic.score.weight.abs().sum() > 0 and (out / "critic" / "adapter").is_dir()


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_grpo_on_vllm_after_lora_sft_of_a_tied_real_model(tmp_path, dirs):
    """LoRA SFT of a tied Qwen2 with its output layer (= embedding) trained; GRPO with new
    adapters from that SFT adapter directory as --model (merged into its base), a KL term to
    it, on vLLM: every merged push leaves the sampler within 1e-3 of the trainer."""
    pytest.importorskip("vllm")
    train = data_file(tmp_path / "chat.jsonl", CHAT)
    cli.train("sft", ["--model", str(dirs["qwen2-tied"]), "--data", str(train), "--eval_data", str(train),
                      "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--lr", "1e-2", "--max_len", "128",
                      "--tokens_per_step", "64", "--device", "cpu", "--log_samples", "0", "--lora_r", "8",
                      "--lora_train_head", "true"])
    prompts = data_file(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in CHAT if "prompt" in r])
    out = tmp_path / "grpo"
    cli.train("grpo", ["--model", str(tmp_path / "sft" / "final" / "adapter"), "--data", str(prompts),
                       "--eval_data", str(prompts), "--reward_fn", "tests.trainer.rewards_for_tests:spaces",
                       "--engine", "vllm", "--enforce_eager", "true", "--gpu_memory_utilization", "0.03",
                       "--max_len", "96", "--max_new_tokens", "16", "--prompts_per_step", "4", "--group_size", "4",
                       "--steps", "3", "--lr", "1e-2", "--eval_every", "3", "--kl_coef", "0.05", "--ppo_epochs", "2",
                       "--device", "cpu", "--output_dir", str(out), "--lora_r", "8", "--lora_train_head", "true"])
    rows = _metrics(out)[1:]
    assert [r["rollout/engine"] for r in rows] == ["vllm"] * 3
    assert all(r["rollout/logprob_diff_max"] <= 1e-3 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    assert rows[-1]["kl"] > 0
    # the run started from the SFT result: its reference is the merged SFT model, not the raw base
    sft_final = models.load_causal_lm(tmp_path / "sft" / "final")
    mb = _batch(sft_final)
    with torch.no_grad():
        assert (models.token_logprobs(models.load_causal_lm(out / "base"), mb) -
                models.token_logprobs(sft_final, mb)).abs().max() <= 1e-5
    gc.collect()  # the engine goes before the next one starts
