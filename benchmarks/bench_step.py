"""One GRPO step end to end: fastrlhf (vLLM engine, HF engine) vs TRL's GRPOTrainer.

    python -m benchmarks.bench_step [--model small|tiny|smollm2] [--prompts 32] [--group 8] [--steps 4]

Same model, same prompts, same P prompts x G samples per step, same completion length limit,
temperature 1, no KL term, token-mean (DAPO) loss, one optimiser step per rollout batch, no
gradient checkpointing (TRL's GRPOConfig turns it on by default: off here, as ours), same hardware.
--model: the built-in Llama at that size (random init) on the built-in task's prompts and exact
match, or smollm2, the real SmolLM2-135M-Instruct (fastrlhf.hub) on chat sums
(fastrlhf.tasks.chat_sums: its ~40-token chat prompts and its last-number verifier).
Each provider runs in its own process (a fair peak-memory reading; vLLM's CPU backend also
changes the process's thread count) for --steps steps; the first step is warm-up and the
median of the rest is reported, split into phases (each timed around the functions that do it,
synchronised on CUDA):
  generate   the engine's generate (TRL: its _generate)
  push       the weight push into the engine (fastrlhf vllm only; TRL on CPU has no engine)
  score      the reward function (TRL: _calculate_rewards)
  forward    the log-prob forwards (ours: models.token_logprobs; TRL: _get_per_token_logps_and_entropies)
  backward   the loss's backward
  optimizer  gradient clipping and the AdamW step
  other      the rest of the step (batch building, advantages, the loss ops, logging)
The training phase's achieved rate, 6 * (matmul parameters) * (forward tokens with gradient) +
2 * ... (without), over forward + backward seconds (attention FLOPs left out: short sequences),
is printed beside a plain float32 matmul's on the same machine in the same process (an MLP-shaped
(4096 x H) @ (H x 4H) product): the CPU's ceiling for this work, so the gap to it is a number.
On CPU TRL's own vLLM mode cannot run (it calls model.load_weights, which vLLM's CPU backend
rejects), so TRL uses transformers generate here; both of our engines are reported so the
comparison is fair. Peak memory is the process's peak RSS (CPU) / max allocated (CUDA); vLLM
reserves its KV cache up front (gpu_memory_utilization), which dominates its figure.
"""

from __future__ import annotations

import functools
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
PHASES = ("generate", "push", "score", "forward", "backward", "optimizer")


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return common._rss_kb("VmHWM") / 1024


class Phases:
    """Seconds per phase per step: wrap(owner, name, phase) times every call of owner.name (the
    outermost call only, when phases nest), synchronising CUDA around it; step() closes a step.
    Forward tokens are counted with and without gradient, for the FLOP count."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.now: dict = {}
        self.steps: list[dict] = []
        self.depth = 0

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def wrap(self, owner, name: str, phase: str, tokens=None) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*a, **k):
            if self.depth:
                return inner(*a, **k)
            import torch

            self.depth += 1
            self._sync()
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self._sync()
                self.now[phase] = self.now.get(phase, 0.0) + time.perf_counter() - t0
                if tokens is not None:
                    key = "tokens_grad" if torch.is_grad_enabled() else "tokens_nograd"
                    self.now[key] = self.now.get(key, 0) + tokens(*a, **k)
                self.depth -= 1
        setattr(owner, name, timed)

    def step(self, seconds: float) -> None:
        """Close a step of `seconds`, less any evaluation it ran (phase "eval": not the step's work)."""
        self.steps.append({**self.now, "step": seconds - self.now.pop("eval", 0.0)})
        self.now = {}

    def summary(self) -> dict:
        rows = self.steps[1:]  # the first step is warm-up
        for r in rows:  # (per step: a difference of medians need not be one of the steps)
            r["other"] = r["step"] - sum(r.get(p, 0.0) for p in PHASES)
        out = {f"{p}_s": statistics.median(r.get(p, 0.0) for r in rows) for p in PHASES + ("step", "other")}
        for key in ("tokens_grad", "tokens_nograd"):
            out[key] = statistics.median(r.get(key, 0) for r in rows)
        return out


def matmul_ceiling(hidden: int) -> float:
    """GFLOP/s of a float32 (4096 x H) @ (H x 4H) matmul on this device (median of 10)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, w = torch.randn(4096, hidden, device=device), torch.randn(hidden, 4 * hidden, device=device)
    ms = common.time_ms(lambda: a @ w, device, warmup=3, reps=10)[0]
    return 2 * 4096 * hidden * 4 * hidden / (ms / 1e3) / 1e9


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: every Linear's weight (a tied output layer
    counted as the matmul it is; an embedding lookup is not one)."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _packed_tokens(model, batch, *a, **k) -> int:
    return int(batch["input_ids"].numel())


def run_fastrlhf(engine: str, args, model_dir: str, data: tuple | None, out: Path) -> dict:
    from fastrlhf import cli, logs, models, optim
    from fastrlhf.algos import online
    from fastrlhf.rollout import hf as hf_engine

    phases, t_step, sizes = Phases(), [None], {}
    if engine == "vllm":
        from fastrlhf.rollout import vllm as vllm_engine

        phases.wrap(vllm_engine.VLLMEngine, "generate", "generate")
        phases.wrap(vllm_engine.VLLMEngine, "update_weights", "push")
    phases.wrap(hf_engine.HFEngine, "generate", "generate")
    phases.wrap(online, "evaluate", "eval")  # (the last step's evaluation: left out of the step)
    phases.wrap(online.RewardFunction, "__call__", "score")
    phases.wrap(models, "token_logprobs", "forward", tokens=_packed_tokens)
    phases.wrap(optim.Precision, "backward", "backward")
    phases.wrap(optim, "clip_gradients", "optimizer")
    phases.wrap(optim, "apply_step", "optimizer")
    log = logs.MetricsLog.log

    def logged(self, step, metrics):  # a step ends where it is logged; step 0 is the evaluation before training
        now = time.perf_counter()
        if step > 0:
            phases.step(now - t_step[0])
        else:
            phases.now = {}
        t_step[0] = now
        return log(self, step, metrics)
    logs.MetricsLog.log = logged
    load = models.load_trained

    def loaded(*a, **k):
        model = load(*a, **k)
        sizes["matmul_params"] = matmul_params(model)
        sizes["hidden"] = model.config.hidden_size
        return model
    models.load_trained = loaded
    data_args = ["--data", data[0], "--eval_data", data[1], "--reward_fn", data[2]] if data else \
        ["--task_eval_prompts", "1"]
    prompt_len = 64 if data else 16
    cli.train("grpo", ["--model", model_dir, "--output_dir", str(out), "--engine", engine,
                       "--prompts_per_step", str(args.prompts), "--group_size", str(args.group),
                       "--max_new_tokens", str(args.max_new_tokens), "--steps", str(args.steps),
                       "--eval_every", "1000000", "--save_every", "0", "--log_samples", "0",
                       "--lr", "1e-5", "--gpu_memory_utilization", "0.1", "--is_cap", "2.0",
                       "--max_len", str(args.max_new_tokens + prompt_len), "--tokens_per_micro_batch", "4096",
                       *data_args])
    return {**phases.summary(), **sizes, "peak_mem_mb": _peak_mb()}


def run_trl(args, model_dir: str, data: tuple | None, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if data:
        from fastrlhf import data as fdata
        from fastrlhf.tasks import chat_sums

        records = fdata.load_prompts(data[0])
        reward = chat_sums.reward
    else:
        from fastrlhf.tasks import arithmetic as ar

        records = ar.train_prompts(ar.ArithmeticTask(), args.prompts * args.steps)

        def reward(prompts, completions, answer, **_):
            return [ar.exact_match(p, c, a) for p, c, a in zip(prompts, completions, answer)]
    ds = Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"]} for p in records])
    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.prompts * args.group,
                     num_generations=args.group, max_completion_length=args.max_new_tokens,
                     steps_per_generation=1, gradient_accumulation_steps=1, max_steps=args.steps,
                     learning_rate=1e-5, beta=0.0, loss_type="dapo", temperature=1.0,
                     gradient_checkpointing=False, use_vllm=False, use_cpu=not torch.cuda.is_available(),
                     bf16=torch.cuda.is_available(), logging_steps=1, report_to=[], save_strategy="no",
                     seed=0, dataloader_num_workers=0, disable_tqdm=True)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    phases = Phases()
    phases.wrap(trainer, "_generate", "generate")
    phases.wrap(trainer, "_calculate_rewards", "score")
    phases.wrap(trainer, "_get_per_token_logps_and_entropies", "forward",
                tokens=lambda model, input_ids, attention_mask, *a, **k: int(attention_mask.sum()))
    phases.wrap(trainer.accelerator, "backward", "backward")
    phases.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    phases.wrap(torch.optim.AdamW, "step", "optimizer")  # (before train() builds the optimiser)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            phases.now, self.t0 = {}, time.perf_counter()  # (what ran between steps: not a step's)

        def on_step_end(self, *a, **k):
            phases.step(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    return {**phases.summary(), "matmul_params": matmul_params(model), "hidden": model.config.hidden_size,
            "peak_mem_mb": _peak_mb()}


def child(provider: str, args) -> None:
    """Run one provider in this process; print its JSON result as the last line."""
    with tempfile.TemporaryDirectory() as tmp:
        data = None
        if args.model == "smollm2":
            from fastrlhf import hub
            from fastrlhf.tasks import chat_sums

            model_dir = hub.resolve("smollm2")
            files = []
            for name, rows in (("train", chat_sums.prompts(args.prompts * args.steps, "train")),
                               ("heldout", chat_sums.prompts(8, "test"))):
                path = Path(tmp) / f"{name}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                files.append(str(path))
            data = (*files, "fastrlhf.tasks.chat_sums:reward")
        else:
            from fastrlhf.tasks import arithmetic as ar

            model_dir = str(ar.save_base_model(Path(tmp) / "model", **ar.MODEL_SIZES[args.model]))
        if provider == "trl":
            res = run_trl(args, model_dir, data, Path(tmp) / "trl")
        else:
            res = run_fastrlhf(provider.split("-")[1], args, model_dir, data, Path(tmp) / "run")
        res["matmul_gflops"] = matmul_ceiling(res["hidden"])
    print(json.dumps(res))


def train_gflops(r: dict) -> float:
    """The training phase's achieved GFLOP/s: matmul FLOPs of the log-prob forwards (6 per matmul
    parameter per token with a backward, 2 without) over forward + backward seconds."""
    flops = r["matmul_params"] * (6 * r["tokens_grad"] + 2 * r["tokens_nograd"])
    return flops / max(1e-9, r["forward_s"] + r["backward_s"]) / 1e9


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    p = common.arg_parser(__doc__, ["grpo_step"], PROVIDERS, ["full"])
    p.add_argument("--model", "--model-size", dest="model", default="small", choices=["tiny", "small", "smollm2"],
                   help="the built-in model at a size (random init, the built-in task) "
                        "or smollm2 (the real model, chat sums)")
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
    size = f"P={args.prompts},G={args.group},L={args.max_new_tokens},model={args.model}"
    results = {}
    for prov in args.providers.split(","):
        cmd = [sys.executable, "-m", "benchmarks.bench_step", *argv, "--child", prov]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            print(f"{prov} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[prov] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, base = [], results.get("trl")
    print(f"\none GRPO step, {size}, on {common.device_name(device)} (median of {args.steps - 1} steps; seconds)")
    cols = ("step",) + PHASES + ("other",)
    print(f"  {'provider':<15} " + " ".join(f"{c:>9}" for c in cols) + f" {'vs trl':>7} {'train GFLOP/s':>14} "
          f"{'matmul GFLOP/s':>15} {'peak MB':>8}")
    for prov, r in results.items():
        ratio = base["step_s"] / r["step_s"] if base else float("nan")
        print(f"  {prov:<15} " + " ".join(f"{r[c + '_s']:>9.3f}" for c in cols) + f" {ratio:>6.2f}x "
              f"{train_gflops(r):>14.1f} {r['matmul_gflops']:>15.1f} {r['peak_mem_mb']:>8.0f}")
        for phase in cols:
            rows.append({"op": "grpo_step", "provider": prov, "mode": phase, "size": size,
                         "median_ms": round(r[f"{phase}_s"] * 1e3, 3), "p20_ms": "", "p80_ms": "",
                         "peak_mem_mb": round(r["peak_mem_mb"], 1), "device": common.device_name(device),
                         "commit": common.commit()})
        for mode, value in (("train_gflops", train_gflops(r)), ("matmul_gflops", r["matmul_gflops"])):
            rows.append({"op": "grpo_step", "provider": prov, "mode": mode, "size": size, "median_ms": round(value, 2),
                         "p20_ms": "", "p80_ms": "", "peak_mem_mb": "", "device": common.device_name(device),
                         "commit": common.commit()})
    if rows and not args.no_save:
        print(f"wrote {common.append_csv(rows, device)}")
    return rows


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
