"""One GRPO step end to end: fastrlhf (vLLM engine, HF engine) vs TRL's GRPOTrainer.

    python -m benchmarks.bench_step [--model-size small] [--prompts 32] [--group 8] [--steps 4]

Same model (the built-in Llama at --model-size, random init), same prompts (the built-in
task's), same P prompts x G samples per step, same completion length limit, temperature 1,
no KL term, token-mean (DAPO) loss, one optimiser step per rollout batch, same hardware.
Each provider runs in its own process (a fair peak-memory reading; vLLM's CPU backend also
changes the process's thread count) for --steps steps; the first step is warm-up and the
median of the rest is reported, split into phases:
  generate   sampling (fastrlhf: the engine's generate; TRL: generate + scoring + its
             log-prob passes, all inside _generate_and_score_completions)
  sync       the weight push into the engine (fastrlhf vllm only)
  train      everything else in the step (rewards, log-probs, loss, backward, optimiser)
On CPU TRL's own vLLM mode cannot run (it calls model.load_weights, which vLLM's CPU backend
rejects), so TRL uses transformers generate here; both of our engines are reported so the
comparison is fair. Peak memory is the process's peak RSS (CPU) / max allocated (CUDA); vLLM
reserves its KV cache up front (gpu_memory_utilization), which dominates its figure.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

PROVIDERS = ["fastrlhf-vllm", "fastrlhf-hf", "trl"]


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return common._rss_kb("VmHWM") / 1024


def run_fastrlhf(engine: str, args, model_dir: str, out: Path) -> dict:
    from fastrlhf import cli

    cli.train("grpo", ["--model", model_dir, "--output_dir", str(out), "--engine", engine,
                       "--prompts_per_step", str(args.prompts), "--group_size", str(args.group),
                       "--max_new_tokens", str(args.max_new_tokens), "--steps", str(args.steps),
                       "--eval_every", "1000000", "--task_eval_prompts", "1", "--save_every", "0",
                       "--lr", "1e-5", "--gpu_memory_utilization", "0.1", "--is_cap", "2.0",
                       "--max_len", str(min(64, args.max_new_tokens + 16)), "--tokens_per_micro_batch", "4096"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # row 0: eval
    rows = rows[1:]  # the first step is warm-up
    gen = statistics.median(r["time/generate_s"] for r in rows)
    sync = statistics.median(r["time/weight_sync_s"] for r in rows)
    step_total = [r["time/generate_s"] + r["time/weight_sync_s"] + r["time/train_s"] for r in rows]
    total = statistics.median(step_total)
    return {"generate_s": gen, "sync_s": sync, "train_s": total - gen - sync, "step_s": total,
            "peak_mem_mb": _peak_mb()}


def run_trl(args, model_dir: str, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastrlhf.tasks import arithmetic as ar

    prompts = ar.train_prompts(ar.ArithmeticTask(), args.prompts * args.steps)
    ds = Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"]} for p in prompts])

    def reward(prompts, completions, answer, **_):
        return [ar.exact_match(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.prompts * args.group,
                     num_generations=args.group, max_completion_length=args.max_new_tokens,
                     steps_per_generation=1, gradient_accumulation_steps=1, max_steps=args.steps,
                     learning_rate=1e-5, beta=0.0, loss_type="dapo", temperature=1.0,
                     use_vllm=False, use_cpu=not torch.cuda.is_available(),
                     bf16=torch.cuda.is_available(), logging_steps=1, report_to=[], save_strategy="no",
                     seed=0, dataloader_num_workers=0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)

    gen_times, step_times = [], []
    inner = trainer._generate_and_score_completions

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = inner(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        return r

    trainer._generate_and_score_completions = timed

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    gen, total = statistics.median(gen_times[1:]), statistics.median(step_times[1:])
    return {"generate_s": gen, "sync_s": 0.0, "train_s": total - gen, "step_s": total, "peak_mem_mb": _peak_mb()}


def child(provider: str, args) -> None:
    """Run one provider in this process; print its JSON result as the last line."""
    from fastrlhf.tasks import arithmetic as ar

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(ar.save_base_model(Path(tmp) / "model", **ar.MODEL_SIZES[args.model_size]))
        if provider == "trl":
            res = run_trl(args, model_dir, Path(tmp) / "trl")
        else:
            res = run_fastrlhf(provider.split("-")[1], args, model_dir, Path(tmp) / "run")
    print(json.dumps(res))


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    p = common.arg_parser(__doc__, ["grpo_step"], PROVIDERS, ["full"])
    p.add_argument("--model-size", default="small", choices=["tiny", "small"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="steps per provider (the first is warm-up)")
    p.add_argument("--child", default="", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args)
        return []
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = f"P={args.prompts},G={args.group},L={args.max_new_tokens},model={args.model_size}"
    results = {}
    for prov in args.providers.split(","):
        cmd = [sys.executable, "-m", "benchmarks.bench_step", *argv, "--child", prov]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            print(f"{prov} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[prov] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, base = [], results.get("trl")
    print(f"\none GRPO step, {size}, on {common.device_name(device)} (median of {args.steps - 1} steps)")
    print(f"  {'provider':<15} {'step s':>8} {'generate':>9} {'sync':>7} {'train':>7} {'peak MB':>9} {'vs trl':>7}")
    for prov, r in results.items():
        ratio = base["step_s"] / r["step_s"] if base else float("nan")
        print(f"  {prov:<15} {r['step_s']:>8.3f} {r['generate_s']:>9.3f} {r['sync_s']:>7.3f} "
              f"{r['train_s']:>7.3f} {r['peak_mem_mb']:>9.0f} {ratio:>6.2f}x")
        for phase in ("step", "generate", "sync", "train"):
            ms = r[f"{phase}_s"] * 1e3
            rows.append({"op": "grpo_step", "provider": prov, "mode": phase, "size": size,
                         "median_ms": round(ms, 3), "p20_ms": "", "p80_ms": "",
                         "peak_mem_mb": round(r["peak_mem_mb"], 1), "device": common.device_name(device),
                         "commit": common.commit()})
    if rows and not args.no_save:
        print(f"wrote {common.append_csv(rows, device)}")
    return rows


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
