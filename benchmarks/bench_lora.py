"""LoRA against full fine-tuning: the same model and batch, side by side.

    python -m benchmarks.bench_lora [--rank 16] [--reps 3] [--rounds 2] [--table]

Measured: a Qwen2-shaped model built from its config (hidden 384, 6 layers, 6 heads / 2 KV
heads, vocabulary 16000, untied), loaded through the trainers' own path
(models.load_trained: float32 masters; with --lora_r PEFT adapters on every decoder linear,
fastrlhf.lora), one SFT optimiser step per repetition: a packed micro-batch of 1024 tokens
(8 sequences), fused log-probs, backward, AdamW. Modes: full fine-tuning, LoRA r, LoRA r + the
output layer trained (--lora_train_head). Each mode runs in its own child process (its peak RSS
is that mode's, torch's runtime included), the modes alternating over --rounds so that the step
times are measured side by side; reported: trainable / total parameters, the training state
(float32 trainable parameters, their gradients, AdamW's two moments; the frozen base), the
median step time and each mode's ratio to full fine-tuning, peak RSS.

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


def _model_dir(path: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrlhf.tasks import arithmetic as ar

    import torch

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=16000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=2048)
    Qwen2ForCausalLM(config).save_pretrained(path)
    ar.build_tokenizer().save_pretrained(path)  # any tokenizer: the batch is random token ids
    return path


def child(mode: str, path: str, reps: int, r: int) -> dict:
    """One mode: load, one warm-up step, `reps` timed steps; its numbers as a dict."""
    import torch

    from fastrlhf import config, data, lora, models, optim
    from fastrlhf.algos.sft import SFTConfig

    cfg = config.load_config(SFTConfig, ["--device", "cpu", *[a.format(r=r) for a in MODES[mode]]])
    model = models.load_trained(path, cfg, torch.device("cpu"))
    head = list(model.get_output_embeddings().parameters()) if cfg.lora_train_head else []
    opt = optim.make_optimizer(model.parameters(), 1e-4, 0.0, head=head, head_lr=1e-4 if head else 0.0)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 16000, (128,), generator=g).tolist() for _ in range(8)]
    mb = data.pack([(s, s) for s in seqs], 1024)[0]
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        (-models.token_logprobs(model, mb).sum() / 1024).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients allocated: they are state a step holds
        if i:
            times.append(time.perf_counter() - t0)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2**20  # noqa: E731
    params = list({id(p): p for p in model.parameters()}.values())
    trained = [p for p in params if p.requires_grad]
    return {"mode": mode, **lora.counts(model), "step_s": times,
            "trained_mb": nbytes(trained), "frozen_mb": nbytes(p for p in params if not p.requires_grad),
            "grads_mb": nbytes(p.grad for p in trained if p.grad is not None),
            "adam_mb": nbytes(v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")),
            "peak_rss_mb": common._rss_kb("VmHWM") / 1024}


def measure(args) -> list[dict]:
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        path = _model_dir(f"{tmp}/model")
        for _ in range(args.rounds):
            for mode in MODES:
                cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--child", mode, "--work", path,
                       "--reps", str(args.reps), "--rank", str(args.rank)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode:
                    raise RuntimeError(f"bench_lora {mode}: {proc.stderr[-3000:]}")
                runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for mode, rs in runs.items():
        row = {**rs[0], "step_s": statistics.median(t for r in rs for t in r["step_s"]),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        row["state_mb"] = row["trained_mb"] + row["grads_mb"] + row["adam_mb"]
        rows.append(row)
    full = rows[0]
    print(f"\nLoRA r={args.rank} vs full fine-tuning: Qwen2-shaped, hidden 384, 6 layers, V=16000; one SFT step "
          f"on 1024 packed tokens; {common.device_name('cpu')}; median of {args.rounds} x {args.reps} steps")
    print(f"  {'mode':>10} {'trained':>11} {'of':>11} {'state MB':>9} {'frozen MB':>10} {'step s':>7} "
          f"{'x full':>7} {'peak RSS MB':>12}")
    for r in rows:
        print(f"  {r['mode']:>10} {r['params/trainable']:>11,} {r['params/total']:>11,} {r['state_mb']:>9.1f} "
              f"{r['frozen_mb']:>10.1f} {r['step_s']:>7.3f} {r['step_s'] / full['step_s']:>7.2f} "
              f"{r['peak_rss_mb']:>12.0f}")
    return rows


def table(r: int = 16) -> list[dict]:
    """The modelled per-GPU GB (module docstring)."""
    rows = []
    print(f"\nmodelled memory on one GPU, GB: full fine-tuning vs LoRA r={r} on every linear (bf16 base), "
          "(+ a colocated vLLM engine's bf16 weights)")
    for name, (params, H, layers, inter, kv, V) in QWEN.items():
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
    p.add_argument("--table", action="store_true", help="print only the modelled table")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args.child, args.work, args.reps, args.rank)))
        return
    rows = [] if args.table else measure(args)
    modelled = table(args.rank)
    out = common.RESULTS / "lora.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"measured": rows, "modelled": modelled}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
