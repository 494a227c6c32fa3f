"""Real architectures, as users bring them: random-weight Llama, Qwen2 (untied and tied), Qwen3,
Mistral, Gemma 2, Phi-3, Phi, GPT-2, Cohere and Granite models built from their transformers
configs with a locally trained byte-level BPE tokenizer and a ChatML template (tests/archs.py).

For each: the trainer's packed, fused log-probs and entropies equal transformers' own float64
forward (eager attention, materialised logits), gradients of the output layer included; SFT on
chat data runs and its final/ loads in transformers; and (slow) a GRPO step on vLLM after SFT
shows the sampler and the trainer agree after the weight push. The pieces that went wrong
without a word are each pinned: Phi's output bias, Gemma 2's final-logit and attention-logit
softcapping, Cohere / Granite logit scales, sliding windows, tied output layers in a vLLM push,
GPT-2's dropout, and an output transform we do not reproduce, which is refused at load.
"""

import gc
import json
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf import cli, data, models

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import archs  # noqa: E402

CHAT = [
    {"messages": [{"role": "system", "content": "Answer with the number only."},
                  {"role": "user", "content": "What is 12+34?"}, {"role": "assistant", "content": "46"},
                  {"role": "user", "content": "And 5+6?"}, {"role": "assistant", "content": "11"}]},
    {"messages": [{"role": "user", "content": "Tell me about the sky."},
                  {"role": "assistant", "content": "The sky is blue during the day."}]},
    {"prompt": [{"role": "user", "content": "What is 7+8?"}], "completion": [{"role": "assistant", "content": "15"}]},
    {"prompt": [{"role": "user", "content": "Say hello."}], "completion": "Hello world!"},
] * 4


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """The torch path of the kernels (the Triton interpreter is slow at V = 512; the kernels
    meet their float64 references on their own tests, and here on Gemma 2 and Phi)."""
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {name: archs.save_arch(name, root / name) for name in archs.ARCHS}


def _hf_reference(path, seqs, **overrides):
    """transformers' own float64 forward, eager attention: log-softmax of the logits at the
    labels, and the entropy, per sequence."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager", **overrides)
    ref.eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            logp = torch.log_softmax(ref(torch.tensor([s])).logits[0, :-1], -1)  # (L - 1, V)
            out.append((logp.gather(-1, torch.tensor(s[1:])[:, None])[:, 0], -(logp.exp() * logp).sum(-1)))
    return out


def _random_seqs(V, lengths=(9, 17, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name,impl", [(a, "torch") for a in archs.ARCHS] + [("gemma2", "triton"), ("phi", "triton")])
def test_packed_logprobs_equal_the_architectures_own_float64_forward(name, impl, arch_dirs, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", impl)
    model = models.load_causal_lm(arch_dirs[name])  # float32: the load itself runs the fidelity check
    seqs = _random_seqs(model.config.vocab_size)
    mb = data.pack([(s, s) for s in seqs], 256)[0]
    lp, ent = models.token_logprobs(model, mb, return_entropy=True)
    cu = mb["cu_seqlens"].tolist()
    for i, (ref_lp, ref_ent) in enumerate(_hf_reference(arch_dirs[name], seqs)):
        ours = slice(cu[i], cu[i + 1] - 1)  # the last position of each sequence has no label
        assert (lp[0, ours].double() - ref_lp).abs().max() <= 1e-5, name
        assert (ent[0, ours].double() - ref_ent).abs().max() <= 1e-5, name


@pytest.mark.parametrize("name", ["phi", "gemma2", "cohere", "granite", "qwen2-tied"])
def test_output_layer_gradients_equal_float64_autograd(name, arch_dirs):
    """d(sum of log-probs) w.r.t. the output weight (and Phi's bias) through the fused kernel's
    backward (bias, softcap, scale, tied embedding) against float64 autograd through HF's forward."""
    from transformers import AutoModelForCausalLM

    seqs = _random_seqs(512, (12, 7))
    model = models.load_causal_lm(arch_dirs[name])
    mb = data.pack([(s, s) for s in seqs], 256)[0]
    models.token_logprobs(model, mb).sum().backward()
    ref = AutoModelForCausalLM.from_pretrained(arch_dirs[name], dtype=torch.float64, attn_implementation="eager")
    total = 0
    for s in seqs:
        logp = torch.log_softmax(ref(torch.tensor([s])).logits[0, :-1], -1)
        total = total + logp.gather(-1, torch.tensor(s[1:])[:, None]).sum()
    total.backward()
    ours, theirs = model.get_output_embeddings(), ref.get_output_embeddings()
    scale = theirs.weight.grad.abs().max()
    assert (ours.weight.grad.double() - theirs.weight.grad).abs().max() <= 1e-5 * max(1.0, scale), name
    if theirs.bias is not None:
        assert ours.bias.grad is not None, "the output bias is trained"
        assert (ours.bias.grad.double() - theirs.bias.grad).abs().max() <= 1e-5


def test_what_the_output_transforms_were_worth(arch_dirs):
    """Dropping Phi's bias, Gemma 2's softcap or Cohere's scale (what the trainer did before: only
    lm_head.weight reached the kernel) moves the log-probs by more than 0.1 nat even on these
    random-weight models (4.2 nats for a trained Phi's bias): each is reproduced for a reason."""
    for name in ("phi", "gemma2", "cohere"):
        model = models.load_causal_lm(arch_dirs[name])
        seqs = _random_seqs(model.config.vocab_size)
        mb = data.pack([(s, s) for s in seqs], 256)[0]
        right = models.token_logprobs(model, mb)
        head = models.output_head(model)
        from fastrlhf.kernels import linear_logprob

        h = models.hidden_states(model, mb)
        plain = linear_logprob(h, head.weight, mb["labels"])  # what the trainer computed before
        assert (right - plain).abs().max() > 0.1, name


def test_sliding_windows_and_attention_softcapping_are_reproduced(tmp_path):
    """Windows shorter than the sequences (Mistral all layers, Gemma 2 every other layer,
    Qwen2's use_sliding_window) and Gemma 2's attention-logit softcap, in the packed path and
    the padded (generation) path, against transformers' eager attention."""
    cases = {"mistral": dict(sliding_window=4), "gemma2": dict(sliding_window=4),
             "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)}
    for name, kw in cases.items():
        d = archs.save_arch(name, tmp_path / name, **kw)
        model = models.load_causal_lm(d)
        seqs = _random_seqs(model.config.vocab_size, (9, 14, 5))
        refs = _hf_reference(d, seqs)
        packed = data.pack([(s, s) for s in seqs], 256)[0]
        lp = models.token_logprobs(model, packed)[0]
        padded = models.token_logprobs(model, data.pad_batch([(s, s) for s in seqs], 0))
        cu = packed["cu_seqlens"].tolist()
        for i, (ref, _) in enumerate(refs):
            assert (lp[cu[i]:cu[i + 1] - 1].double() - ref).abs().max() <= 1e-5, name
            assert (padded[i, : len(seqs[i]) - 1].double() - ref).abs().max() <= 1e-5, name
        no_window = archs.save_arch(name, tmp_path / f"{name}-full")  # the window matters here
        assert (models.token_logprobs(models.load_causal_lm(no_window), packed)[0] - lp).abs().max() > 1e-3


def test_an_output_transform_we_do_not_reproduce_is_refused_at_load(tmp_path):
    d = archs.save_arch("llama", tmp_path / "mup")
    cfg = json.loads((d / "config.json").read_text())
    cfg["lm_head_multiplier"] = 0.5  # Falcon-H1's field on another architecture: not reproduced
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lm_head_multiplier=0.5 .*does not reproduce"):
        models.load_causal_lm(d)


def test_the_fidelity_check_refuses_a_model_whose_logprobs_we_get_wrong(arch_dirs, monkeypatch):
    """If the output transform were lost (as before: only lm_head.weight reached the kernel),
    loading Gemma 2 stops with the difference and the config fields that may be why."""
    monkeypatch.setattr(models, "output_transform", lambda config: (1.0, None))
    with pytest.raises(ValueError, match=r"differ from transformers' own forward by .* final_logit_softcapping"):
        models.load_causal_lm(arch_dirs["gemma2"])


# ---------------------------------------------------------------- chat data on every architecture


@pytest.mark.parametrize("name", archs.ARCHS)
def test_sft_on_chat_data_and_final_loads_in_transformers(name, arch_dirs, tmp_path):
    train = data_file(tmp_path / "chat.jsonl", CHAT)
    out = tmp_path / "run"
    summary = cli.train("sft", ["--model", str(arch_dirs[name]), "--data", str(train), "--eval_data", str(train),
                        "--output_dir", str(out), "--max_steps", "2", "--lr", "1e-3", "--max_len", "128",
                        "--tokens_per_step", "64", "--eval_every", "2", "--device", "cpu"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/sft"])) for r in rows)
    assert summary["eval/loss"] < rows[0]["loss/sft"] + 1.0
    # final/ is a transformers directory: it loads, and computes what the trainer computes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out / "final", attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids, _ = data.conversation(tok, CHAT[0]["messages"])
    ours = models.token_logprobs(models.load_causal_lm(out / "final"), data.pack([(ids, ids)], 256)[0])[0, :-1]
    with torch.no_grad():
        theirs = torch.log_softmax(loaded(torch.tensor([ids])).logits[0, :-1], -1).gather(
            -1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert (ours - theirs).abs().max() < 1e-4
    assert [json.loads(x)["completion"] for x in (out / "samples.jsonl").read_text().splitlines()]  # texts shown


def data_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batched_reward(prompts, completions, completion_ids, **kwargs):
    """TRL's signature: the longer the completion, the better (any model can learn it)."""
    assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant", completions[0]
    return [len(ids) / 16 for ids in completion_ids]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", [a for a in archs.ARCHS if a != "phi"])
def test_grpo_on_vllm_after_sft_on_chat_data(name, arch_dirs, tmp_path):
    """SFT on chat data, then one GRPO step from its final/ with the vLLM engine (vLLM loads the
    directory, the weights are pushed, the sampler and the trainer agree), rewarded by a TRL-style
    batched function on conversational prompts."""
    pytest.importorskip("vllm")
    train = data_file(tmp_path / "chat.jsonl", CHAT)
    cli.train("sft", ["--model", str(arch_dirs[name]), "--data", str(train), "--eval_data", str(train),
              "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--lr", "1e-3", "--max_len", "128",
              "--tokens_per_step", "64", "--device", "cpu", "--log_samples", "0"])
    prompts = data_file(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in CHAT if "prompt" in r])
    out = tmp_path / "grpo"
    cli.train("grpo", ["--model", str(tmp_path / "sft" / "final"), "--data", str(prompts), "--eval_data", str(prompts),
               "--reward_fn", "tests.trainer.test_real_models:batched_reward", "--engine", "vllm",
               "--enforce_eager", "true", "--gpu_memory_utilization", "0.03", "--max_len", "96",
               "--max_new_tokens", "8", "--prompts_per_step", "4", "--group_size", "4", "--steps", "1",
               "--lr", "1e-4", "--eval_every", "1", "--device", "cpu", "--output_dir", str(out)])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rollout/engine"] == "vllm" and "eval/reward" in rows[0]
    assert rows[1]["rollout/logprob_diff_max"] <= 1e-3, rows[1]["rollout/logprob_diff_max"]
    assert (out / "samples.jsonl").exists()
    gc.collect()  # the engine goes before the next one starts


@pytest.mark.vllm
def test_phi_generates_with_transformers_when_vllm_would_patch_its_classes(arch_dirs, tmp_path, capsys):
    """vLLM 0.32 has no Phi of its own: its Transformers backend would patch transformers'
    PhiModel in this process. engine=auto falls back to transformers generate and says why;
    engine=vllm refuses."""
    pytest.importorskip("vllm")
    from fastrlhf.rollout import EngineError, make_engine

    model = models.load_causal_lm(arch_dirs["phi"])
    tok = models.load_tokenizer(arch_dirs["phi"])
    kw = dict(model_dir=arch_dirs["phi"], policy=model, tokenizer=tok, max_model_len=64, seed=0)
    assert make_engine("auto", **kw).name == "hf"
    assert "Transformers backend" in capsys.readouterr().err
    with pytest.raises(EngineError, match="Transformers backend"):
        make_engine("vllm", **kw)


def test_dropout_is_off_in_rl_so_sampler_and_trainer_agree(arch_dirs, tmp_path):
    """GPT-2 ships dropout 0.1: in train mode the trainer's log-probs of the sampled tokens
    differed from the sampler's by ~0.5 from the first step. Off by default (TRL's
    disable_dropout); --disable_dropout false keeps it, and the gap."""
    prompts = data_file(tmp_path / "p.jsonl", [{"prompt": "What is 2+2?"}, {"prompt": "Hello"}] * 4)
    common = ["--model", str(arch_dirs["gpt2"]), "--data", str(prompts), "--eval_data", str(prompts),
              "--reward_fn", "tests.trainer.rewards_for_tests:sevens", "--engine", "hf", "--max_len", "64",
              "--max_new_tokens", "8", "--prompts_per_step", "4", "--group_size", "2", "--steps", "1",
              "--eval_every", "1", "--device", "cpu"]
    diff = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        cli.train("grpo", common + ["--output_dir", str(out), "--disable_dropout", flag])
        step = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1]
        diff[flag] = step["rollout/logprob_diff_max"]
    assert diff["true"] < 1e-4 and diff["false"] > 0.05, diff


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    """Llama 3 and Mistral ship no pad token: the HF engine crashed on it."""
    d = archs.save_arch("llama", tmp_path / "nopad", pad=False)
    tok = models.load_tokenizer(d)
    assert tok.pad_token == tok.eos_token
    from fastrlhf.rollout.hf import HFEngine

    groups = HFEngine(models.load_causal_lm(d), tok).generate([tok("Hi")["input_ids"],
                                                               tok("What is 1+1?")["input_ids"]],
                                                               n=2, temperature=1.0, max_tokens=4, seed=0)
    assert [len(g) for g in groups] == [2, 2]


def test_online_helpers_see_conversational_prompts_through_the_template(arch_dirs):
    tok = models.load_tokenizer(arch_dirs["qwen2"])
    ids = data.prompt_ids(tok, [{"role": "user", "content": "What is 7+8?"}])
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 7+8?<|im_end|>\n<|im_start|>assistant\n"
