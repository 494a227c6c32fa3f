"""Optimisation: AdamW groups, the schedule, token-budget steps, mixed precision (float32
master weights, autocast, a float16 loss scale) and the step that skips, counts and finally
refuses non-finite updates."""

from __future__ import annotations

import contextlib
import math

import torch

from fastrlhf import dist
from fastrlhf.config import compute_dtype


class Precision:
    """Mixed precision as GPU trainers do it: float32 master weights and optimiser state,
    forward passes under autocast in the compute dtype (bf16 / fp16), float16 with a dynamic
    loss scale (GradScaler). float32: no autocast. The frozen models are loaded in the compute
    dtype itself (they have no optimiser to keep precision for)."""

    def __init__(self, name: str, device: torch.device):
        self.device = torch.device(device)
        self.dtype = compute_dtype(name, self.device)
        if self.dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("dtype bfloat16: this GPU does not support it; use --dtype float16")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def make_optimizer(params, lr: float, weight_decay: float, *, head=(), head_lr: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only. `head`: parameters (the output layer) in their own
    group at head_lr, as nanochat's unembedding_lr; the schedule scales every group alike.
    Why: in online RL on a small model the gain is mostly sharpening the output distribution,
    which the output layer does in few, low-noise parameters, while equally large Adam steps on
    every body weight are mostly noise (README, "Online RL")."""
    def decay_split(ps, **extra):  # matrices decayed, the rest not
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay, **extra},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, **extra}]

    head_ids = {id(p) for p in head}
    params = [p for p in params if p.requires_grad]
    groups = decay_split([p for p in params if id(p) not in head_ids])
    groups += [g for g in decay_split([p for p in params if id(p) in head_ids], lr=head_lr, name="head") if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=_can_fuse(params))


def _can_fuse(params) -> bool:
    """torch's fused AdamW (one kernel over every tensor) where it exists: float parameters on the
    CPU or CUDA. On SmolLM2-135M's float32 weights on 2 CPU cores a step took 0.08 s fused against
    0.48 s for the default multi-tensor one (PPO's four optimiser steps a step cost 19 s of its 47)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def lr_metrics(opt) -> dict:
    """The learning rates a step used: lr (the body's), and lr/head when the output layer has its own."""
    out = {"lr": opt.param_groups[0]["lr"]}
    for g in opt.param_groups:
        if g.get("name") == "head":
            out["lr/head"] = g["lr"]
    return out


def make_schedule(opt, warmup_steps: int, total_steps: int, kind: str):
    """Linear warm-up, then cosine to 10% / linear to 0 / constant."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown lr schedule {kind!r}; expected cosine, linear or constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return max(0.0, 1 - frac) if kind == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def split_by_budget(items: list, budget: int, count) -> list[list]:
    """Gradient accumulation by token budget: consecutive items (sequences) into optimiser
    steps of about `budget` counted tokens each (count(item) -> int); the last may be short."""
    steps, cur, used = [], [], 0
    for it in items:
        cur.append(it)
        used += count(it)
        if used >= budget:
            steps.append(cur)
            cur, used = [], 0
    if cur:
        steps.append(cur)
    return steps


def optimizer_state(model, opt) -> dict:
    """opt.state_dict(); of a sharded model the whole state gathered from every rank (a
    collective), keyed by parameter name, on the host."""
    from fastrlhf.models import is_sharded

    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, saved: dict) -> None:
    """Load what optimizer_state saved, whichever way it was keyed: by index (one process) or by
    parameter name (sharded), into this run's optimiser, sharded or not (a checkpoint resumes on
    another number of ranks)."""
    from fastrlhf.models import is_sharded

    by_index = all(isinstance(k, int) for k in saved["state"]) and \
        all(isinstance(i, int) for g in saved["param_groups"] for i in g["params"])
    if by_index and not is_sharded(model):
        opt.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if by_index:  # index i is the i-th parameter of the optimiser's groups, in order
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        saved = {"state": {order[i]: v for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, opt, saved, options=StateDictOptions(full_state_dict=True))


class TrainingError(RuntimeError):
    """A run that cannot go on (every step skipped, a model gone non-finite); one line, exit 2."""


def clip_gradients(model, opt, grad_clip: float, scaler=None) -> torch.Tensor:
    """Unscale (float16: the GradScaler's scale) and clip the gradients to grad_clip; returns
    their norm before clipping as a 0-d tensor on the device (no host sync)."""
    if scaler is not None:
        scaler.unscale_(opt)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)


def apply_step(opt, sched, counters: dict, grad_norm: float, *, ok: bool = True, scaler=None,
               update_scaler: bool = True) -> None:
    """The second half of an optimiser step, once the gradient norm is on the host: step unless
    ok=False (the loss was not finite: the caller counted it) or the norm is not finite (counted
    here in counters["skipped_nonfinite"], or ["skipped_overflow"] under a float16 loss scale,
    which is then lowered); zero the gradients, advance the schedule."""
    if ok:
        if math.isfinite(grad_norm):
            opt.step()
            counters.pop("skipped_in_a_row", None)
        else:
            key = "skipped_overflow" if scaler is not None else "skipped_nonfinite"
            counters[key] = counters.get(key, 0) + 1
            _count_skip(counters)
    if scaler is not None and update_scaler:
        scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()


def optimizer_step(model, opt, sched, grad_clip: float, counters: dict, ok: bool = True, scaler=None,
                   update_scaler: bool = True) -> float:
    """Clip, step (unless the step's loss was not finite, ok=False, or the gradient norm is
    not: then the update is skipped and counted in counters["skipped_nonfinite"]), zero the
    gradients, advance the schedule. Returns the gradient norm. With a float16 GradScaler the
    gradients are unscaled first and an overflow (the scale was too high: it is lowered) is
    counted in counters["skipped_overflow"]; update_scaler=False when a second optimiser steps
    on the same scaled loss next (the scale is updated once, after the last)."""
    grad_norm = float(dist.whole(clip_gradients(model, opt, grad_clip, scaler))) if ok else float("nan")
    apply_step(opt, sched, counters, grad_norm, ok=ok, scaler=scaler, update_scaler=update_scaler and ok)
    return grad_norm


def backward_and_step(loss: torch.Tensor, model, opt, sched, grad_clip: float, counters: dict,
                      prec: Precision | None = None) -> float:
    """One optimiser step on a whole-step loss (see optimizer_step)."""
    ok = finite_or_skip(loss, counters)
    if ok:
        prec.backward(loss) if prec is not None else loss.backward()
    return optimizer_step(model, opt, sched, grad_clip, counters, ok, prec.scaler if prec else None)


MAX_SKIPPED_IN_A_ROW = 20  # non-finite steps in a row that stop a run: it is not going to recover


def _count_skip(counters: dict) -> None:
    counters["skipped_in_a_row"] = counters.get("skipped_in_a_row", 0) + 1
    if counters["skipped_in_a_row"] >= MAX_SKIPPED_IN_A_ROW:
        raise TrainingError(f"{counters['skipped_in_a_row']} optimiser steps in a row had a non-finite loss or "
                            "gradient and were skipped: stopping (lower lr, check the data, or the model's weights)")


def count_nonfinite_loss(counters: dict) -> None:
    """A step whose loss was not finite: counted in skipped_nonfinite (the step is not applied)."""
    counters["skipped_nonfinite"] = counters.get("skipped_nonfinite", 0) + 1
    _count_skip(counters)


def finite_or_skip(loss: torch.Tensor, counters: dict) -> bool:
    """True if the loss is finite; else count the skip (the step is not applied)."""
    if torch.isfinite(loss):
        return True
    count_nonfinite_loss(counters)
    return False
