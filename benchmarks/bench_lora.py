"""LoRA against full fine-tuning: the same model and batch, side by side.

    python -m benchmarks.bench_lora [--rank 16] [--reps 3] [--rounds 2] [--device cpu] [--table]
        [--hidden 384 --layers 6 --vocab 16000 --tokens 1024]

Measured: a Qwen2-shaped model built from its config (by default hidden 384, 6 layers, head_dim
64 with a third as many KV heads, vocabulary 16000, untied), loaded through the trainers' own
path (models.load_trained: float32 masters; with --lora_r the base in the compute dtype and
PEFT adapters on every decoder linear, fastrlhf.lora), one SFT optimiser step per repetition
under the run's autocast (bf16 on CUDA): a packed micro-batch of --tokens tokens (sequences of
128), fused log-probs, backward, AdamW. On CUDA the peak allocated GPU memory is reported too. Modes:
full fine-tuning, LoRA r, LoRA r + the
output layer trained (--lora_train_head). Each mode runs in its own child process (its peak RSS
is that mode's, torch's runtime included), the modes alternating over --rounds so that the step
times are measured side by side; reported: trainable / total parameters, the training state
(float32 trainable parameters, their gradients, AdamW's two moments; the frozen base), the
median step time and each mode's ratio to full fine-tuning, peak RSS.

Serving (--serving): how vLLM should get a LoRA policy's weights, measured with the built-in
task's small model (hidden 256, 4 layers; r=16 on every linear, random adapters): the same 256
prompts x --new-tokens sampled tokens, each engine in its own process, median of the last 3 of
4 generate() calls: vLLM serving the merged weights (what fastrlhf pushes) against vLLM serving
the base with the adapter (enable_lora, a LoRARequest: what an adapter-only push would need).

Modelled (--table): per-GPU memory, one GPU, for Qwen2.5 1.5B / 7B / 14B: full fine-tuning
(16 bytes per parameter: float32 master, gradient, AdamW's two moments) against LoRA r=16 on
every linear (the base frozen in bf16: 2 bytes per parameter; adapters, their gradients and
moments: 16 bytes per adapter parameter), each + a colocated vLLM engine's bf16 weights (2 bytes
per parameter); activations excluded. An H100 has 80 GB.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common

MODES = {"full": [], "lora": ["--lora_r", "{r}"], "lora+head": ["--lora_r", "{r}", "--lora_train_head", "true"]}
# Qwen2.5: parameters, hidden, layers, intermediate, KV width (kv heads x head_dim), vocabulary
QWEN = {"1.5B": (1.54e9, 1536, 28, 8960, 256, 151936), "7B": (7.62e9, 3584, 28, 18944, 512, 152064),
        "14B": (14.8e9, 5120, 48, 13824, 1024, 152064)}


def _model_dir(path: str, args) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrlhf.tasks import arithmetic as ar

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 3) if heads % max(1, heads // 3) == 0 else heads,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    Qwen2ForCausalLM(config).save_pretrained(path)
    ar.build_tokenizer().save_pretrained(path)  # any tokenizer: the batch is random token ids
    return path


def child(mode: str, path: str, args) -> dict:
    """One mode: load, one warm-up step, `reps` timed steps; its numbers as a dict."""
    import torch

    from fastrlhf import config, data, lora, models, optim
    from fastrlhf.algos.sft import SFTConfig

    device = torch.device(args.device)
    cfg = config.load_config(SFTConfig, ["--device", args.device, *[a.format(r=args.rank) for a in MODES[mode]]])
    prec = optim.Precision(cfg.dtype, device)
    model = models.load_trained(path, cfg, device)
    head = list(model.get_output_embeddings().parameters()) if cfg.lora_train_head else []
    opt = optim.make_optimizer(model.parameters(), 1e-4, 0.0, head=head, head_lr=1e-4 if head else 0.0)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, args.vocab, (128,), generator=g).tolist() for _ in range(max(1, args.tokens // 128))]
    mb = data.to_device(data.pack([(s, s) for s in seqs], args.tokens)[0], device)
    times = []
    for i in range(args.reps + 1):
        common._sync(args.device)
        t0 = time.perf_counter()
        with prec.autocast():
            loss = -models.token_logprobs(model, mb).sum() / args.tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients allocated: they are state a step holds
        common._sync(args.device)
        if i:
            times.append(time.perf_counter() - t0)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
    params = list({id(p): p for p in model.parameters()}.values())
    trained = [p for p in params if p.requires_grad]
    return {"mode": mode, **lora.counts(model), "step_s": times,
            "trained_mb": nbytes(trained), "frozen_mb": nbytes(p for p in params if not p.requires_grad),
            "grads_mb": nbytes(p.grad for p in trained if p.grad is not None),
            "adam_mb": nbytes(v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")),
            "peak_rss_mb": common._rss_kb("VmHWM") / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def _child_json(cmd: list[str], what: str) -> dict:
    """Run one measuring child process; its last stdout line, JSON."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"bench_lora {what}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve(mode: str, model_dir: str, adapter: str, new_tokens: int) -> dict:
    """One engine (child process): tokens/s of sampling with merged weights or with the adapter."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # as fastrlhf.rollout.vllm does on CPU
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from fastrlhf.rollout.vllm import _cpu_kv_cache_bytes

    kw = dict(enable_lora=True, max_lora_rank=16, max_loras=1) if mode == "adapter" else {}
    llm = LLM(model_dir, dtype="float32", seed=0, max_model_len=128, enforce_eager=True,
              kv_cache_memory_bytes=_cpu_kv_cache_bytes(0.05), **kw)
    from fastrlhf.tasks import arithmetic as ar

    tok = ar.build_tokenizer()
    prompts = [{"prompt_token_ids": tok(f"{a}+{b}=")["input_ids"]} for a, b in zip(range(256), range(100, 356))]
    sp = SamplingParams(max_tokens=new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    req = LoRARequest("policy", 1, adapter) if mode == "adapter" else None
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=req, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    gen_s = statistics.median(times[1:])
    return {"mode": mode, "tokens": n, "gen_s": gen_s, "tokens_per_s": n / gen_s}


def measure_serving(args) -> list[dict]:
    import torch

    from fastrlhf import config, models
    from fastrlhf.algos.sft import SFTConfig
    from fastrlhf.tasks import arithmetic as ar

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = str(ar.save_base_model(f"{tmp}/base", **ar.MODEL_SIZES["small"]))
        cfg = config.load_config(SFTConfig, ["--device", "cpu", "--lora_r", "16", "--lora_alpha", "32"])
        model = models.load_trained(base, cfg, torch.device("cpu"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        tok = models.load_tokenizer(base)
        models.save_hf_dir(model, tok, f"{tmp}/merged")  # merged/ and merged/adapter/
        for _ in range(args.rounds):
            for mode, d in (("merged", f"{tmp}/merged"), ("adapter", base)):
                cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--serve", mode, "--work", d,
                       "--adapter", f"{tmp}/merged/adapter", f"--new-tokens={args.new_tokens}"]
                rows.append(_child_json(cmd, f"--serve {mode}"))
    print(f"\nvLLM sampling a LoRA policy, built-in small model, r=16, 256 prompts x {args.new_tokens} tokens, "
          f"{common.device_name('cpu')}")
    for mode in ("merged", "adapter"):
        tps = [r["tokens_per_s"] for r in rows if r["mode"] == mode]
        print(f"  {mode:>8}: " + ", ".join(f"{t:,.0f}" for t in tps) + " tokens/s")
    return rows


def measure(args) -> list[dict]:
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        path = _model_dir(f"{tmp}/model", args)
        for _ in range(args.rounds):
            for mode in MODES:
                cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--child", mode, "--work", path,
                       *(f"--{k}={getattr(args, k)}" for k in ("reps", "rank", "device", "hidden", "layers", "vocab",
                                                                "tokens"))]
                runs[mode].append(_child_json(cmd, mode))
    rows = []
    for rs in runs.values():
        row = {**rs[0], "step_s": statistics.median(t for r in rs for t in r["step_s"]),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        row["state_mb"] = row["trained_mb"] + row["grads_mb"] + row["adam_mb"]
        rows.append(row)
    full = rows[0]
    print(f"\nLoRA r={args.rank} vs full fine-tuning: Qwen2-shaped, hidden {args.hidden}, {args.layers} layers, "
          f"V={args.vocab}; one SFT step on {args.tokens} packed tokens; {common.device_name(args.device)}; "
          f"median of {args.rounds} x {args.reps} steps")
    print(f"  {'mode':>10} {'trained':>11} {'of':>11} {'state MB':>9} {'frozen MB':>10} {'step s':>7} "
          f"{'x full':>7} {'peak RSS MB':>12} {'peak GPU MB':>12}")
    for r in rows:
        gpu = f"{r['peak_gpu_mb']:>12.0f}" if r.get("peak_gpu_mb") is not None else f"{'-':>12}"
        print(f"  {r['mode']:>10} {r['params/trainable']:>11,} {r['params/total']:>11,} {r['state_mb']:>9.1f} "
              f"{r['frozen_mb']:>10.1f} {r['step_s']:>7.3f} {r['step_s'] / full['step_s']:>7.2f} "
              f"{r['peak_rss_mb']:>12.0f} {gpu}")
        if args.save:
            common.append_csv([{"op": "lora_step", "provider": r["mode"], "mode": "full",
                                "size": f"H={args.hidden},L={args.layers},V={args.vocab},N={args.tokens},r={args.rank}",
                                "median_ms": r["step_s"] * 1e3,
                                "peak_mem_mb": r.get("peak_gpu_mb") or r["peak_rss_mb"]}], args.device)
    return rows


def table(r: int = 16) -> list[dict]:
    """The modelled per-GPU GB (module docstring)."""
    rows = []
    print(f"\nmodelled memory on one GPU, GB: full fine-tuning vs LoRA r={r} on every linear (bf16 base), "
          "(+ a colocated vLLM engine's bf16 weights)")
    for name, (params, H, layers, inter, kv, _V) in QWEN.items():
        adapter = layers * r * ((H + H) * 2 + (H + kv) * 2 + (H + inter) * 2 + (inter + H))  # q o k v gate up down
        full, lora = 16 * params / 1e9, (2 * params + 16 * adapter) / 1e9
        vllm = 2 * params / 1e9
        rows.append({"model": name, "adapter_params": adapter, "full_gb": full, "lora_gb": lora, "vllm_gb": vllm})
        print(f"  {name:>5}: adapters {adapter / 1e6:5.1f}M parameters; full {full:6.1f} ({full + vllm:6.1f}); "
              f"LoRA {lora:5.1f} ({lora + vllm:5.1f})")
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--no-save", dest="save", action="store_false", help="print only: no CSV row, no lora.json")
    p.add_argument("--table", action="store_true", help="print only the modelled table")
    p.add_argument("--serving", action="store_true", help="vLLM with merged weights vs serving the adapter")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--serve", default="", help=argparse.SUPPRESS)
    p.add_argument("--adapter", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args.child, args.work, args)))
        return
    if args.serve:
        print(json.dumps(serve(args.serve, args.work, args.adapter, args.new_tokens)))
        return
    if args.serving:
        rows = measure_serving(args)
        if args.save:
            out = common.RESULTS / "lora_serving.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2))
        return
    rows = [] if args.table else measure(args)
    modelled = table(args.rank)
    if not args.save:
        return
    out = common.RESULTS / "lora.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"measured": rows, "modelled": modelled}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
