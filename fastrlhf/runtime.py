"""A trainer run's lifecycle, composed from the pieces below it: begin (validate, seed, the
device and the precision), optimisation (optimiser, schedule, resumed state, metrics log) and
finish (final/ and summary.json, never from a non-finite model).

    config.py       configs, the shared fields, the rule table, YAML and flags
    optim.py        optimiser, schedule, precision, the skipping optimiser step
    logs.py         metrics.jsonl, samples.jsonl
    checkpoints.py  checkpoints, damage check, resume
    files.py        atomic files and directories
    dist.py         rank, world size, is the main process (1 process until FSDP2)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from fastrlhf import checkpoints, dist, logs, lora, models, optim
from fastrlhf.config import resolve_device
from fastrlhf.files import write_atomic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def begin(cfg) -> tuple[Path, torch.device, optim.Precision]:
    """The output directory (created), seeded RNGs, the device and the precision of a run (the
    settings were validated when cfg was built: config.validate_config)."""
    # under torchrun: the process group, this rank's GPU
    device = dist.setup(resolve_device(cfg.device), host_collectives=getattr(cfg, "fsdp_offload", False))
    prec = optim.Precision(cfg.dtype, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    return out, device, prec


def start_model(cfg, task, out: Path) -> str:
    """The HF directory a run starts from: --model (a PEFT adapter directory: its base with the
    adapter merged in, models.start_dir), else the built-in task's base model, written to out/base."""
    if cfg.model:
        return models.start_dir(cfg.model, out)
    return str(dist.on_main(lambda: task.base_model(out / "base")))


def optimisation(cfg, model, out: Path, total: int, ckpt: Path | None, desc: str, *, head_lr: float = 0.0,
                 critic: tuple | None = None):
    """AdamW + warm-up schedule, the resumed trainer state (step, counters, summary: what the
    run has reported so far, e.g. its start/* scores) from ckpt if any, and the metrics log:
    (opt, sched, state, log). head_lr > 0: the output layer (lm_head) learns at head_lr, the
    rest at cfg.lr (make_optimizer). critic: PPO's (critic, optimiser, schedule), resumed with it."""
    head = list(model.get_output_embeddings().parameters()) if head_lr else []
    opt = optim.make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, head=head, head_lr=head_lr)
    sched = optim.make_schedule(opt, cfg.warmup_steps, total, cfg.schedule)
    state = checkpoints.load_trainer_state(ckpt, model, opt, sched, critic) if ckpt else {"step": 0, "counters": {}}
    state.setdefault("summary", {})
    if lora.is_adapted(model) and dist.is_main():
        n = lora.counts(model)
        print(f"{desc}: LoRA r={cfg.lora_r}, {n['params/trainable']:,} of {n['params/total']:,} parameters trained "
              f"({100 * n['params/trainable'] / n['params/total']:.2f}%)", flush=True)
    return opt, sched, state, logs.MetricsLog(out, total, desc=desc, resume_step=state["step"] if ckpt else None)


def finish(out_dir: Path, log: logs.MetricsLog, model, tokenizer, summary: dict, step: int,
           counters: dict, dtype: torch.dtype | None = None) -> dict:
    """Close the log, write final/ (HF directory, in `dtype`: the run's compute dtype) and
    summary.json, both atomically, from the main process."""
    log.close()
    if step and counters.get("skipped_nonfinite", 0) + counters.get("skipped_overflow", 0) >= step:
        raise optim.TrainingError(f"every one of the {step} optimiser steps was skipped as non-finite: nothing was "
                                  "trained, final/ is not written")
    models.check_finite_model(model, "final model")  # final/ is never written from a non-finite model
    summary.update({"steps": step, "final": str(out_dir / "final"), "world_size": dist.world_size(),
                    **lora.counts(model), **counters})
    state = models.full_state_dict(model)  # sharded: gathered from every rank
    if dist.is_main():
        models.save_pretrained_atomic(model, tokenizer, out_dir / "final", dtype=dtype, state=state)
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
