"""Checkpoints: `<output_dir>/checkpoints/step-<N>/` holds an HF model directory (config,
safetensors, tokenizer; with LoRA the PEFT adapter alone) and `trainer_state.pt` (optimizer, scheduler, data position, RNG states,
the summary so far), written beside their place and renamed (a crash never leaves a half-written
one); the damage check that sets a cut-short one aside; resuming, which refuses a run whose
settings changed. Only the main process writes (fastrlhf.dist)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from fastrlhf import dist
from fastrlhf.files import atomic_dir


def _checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: step-<N> directories holding trainer_state.pt
    (a crash's leftover step-<N>.tmp / .old never counts)."""
    found = [(int(m.group(1)), p) for p in (out_dir / "checkpoints").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = _checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def damaged(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file cut short by a crash or a full disk), or
    None. Cheap: the safetensors header against the file's size, the zip directory and CRCs of
    trainer_state.pt; nothing is deserialised."""
    import struct
    import zipfile

    for weights in sorted(ckpt.glob("**/*.safetensors")):
        size = weights.stat().st_size
        try:
            with open(weights, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if 8 + n <= size else None
        except (struct.error, ValueError, UnicodeDecodeError):
            header = None
        if header is None:
            return f"{weights.relative_to(ckpt)} has no readable header"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            return f"{weights.relative_to(ckpt)} is cut short ({size} of {8 + n + end} bytes)"
    for state in sorted(ckpt.glob("**/*_state.pt")):
        try:
            with zipfile.ZipFile(state) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{state.relative_to(ckpt)} is not a complete torch file ({e})"
        if bad is not None:
            return f"{state.relative_to(ckpt)} is corrupt (bad CRC in {bad})"
    return None


# Settings a resumed run may change: where and how it runs, how often it reports, how long.
RESUMABLE = {"output_dir", "device", "engine", "gpu_memory_utilization", "enforce_eager", "offload_params",
             "eval_every", "save_every", "log_samples", "log_samples_every", "gradient_checkpointing", "fsdp_offload",
             "tokens_per_micro_batch", "max_steps", "steps", "epochs", "resume"}


def resume_checkpoint(cfg, out_dir: Path) -> Path | None:
    """The checkpoint this run continues from (chosen, and set aside or removed, by the main
    process; every rank gets its answer), by cfg.resume:
      auto   the newest intact checkpoint, if there is one (a damaged one is set aside as
             step-N.damaged and the one before it is used, saying so), provided the run's
             settings are those it was written with: a differing field stops the run, named;
      never  start over: existing checkpoints and logs in output_dir are removed;
      must   as auto, but no intact checkpoint is an error."""
    return dist.on_main(lambda: _resume_checkpoint(cfg, out_dir))


def _resume_checkpoint(cfg, out_dir: Path) -> Path | None:
    if cfg.resume == "never":
        for name in ("checkpoints", "metrics.jsonl", "samples.jsonl", "summary.json"):
            target = out_dir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        return None
    ckpt = None
    for candidate in reversed(_checkpoints(out_dir)):
        why = damaged(candidate)
        if why is None:
            ckpt = candidate
            break
        aside = candidate.with_name(candidate.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(candidate, aside)
        print(f"checkpoint {candidate} is damaged ({why}): set aside as {aside.name}; "
              "resuming from the one before it", file=sys.stderr)
    if ckpt is None:
        if cfg.resume == "must":
            raise ValueError(f"resume=must but {out_dir} holds no intact checkpoint")
        return None
    saved = out_dir / "config.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        now = dataclasses.asdict(cfg)
        changed = [f"{k}={before[k]!r} (now {now[k]!r})" for k in now
                   if k in before and k not in RESUMABLE and before[k] != now[k]]
        if changed:
            raise ValueError(f"{out_dir} holds a checkpoint ({ckpt.name}) of a run with other settings: "
                             f"{', '.join(changed)}; rerun with those, or --resume never to start over there")
    return ckpt


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, opt, sched, state: dict,
                    keep: int = 2, extra=None) -> Path:
    """HF directory + trainer_state.pt (+ whatever extra(tmp_dir) writes, e.g. a critic),
    written atomically; older checkpoints beyond `keep` removed."""
    from fastrlhf.models import full_state_dict, save_trained
    from fastrlhf.optim import optimizer_state

    final = out_dir / "checkpoints" / f"step-{step}"
    weights, moments = full_state_dict(model), optimizer_state(model, opt)  # sharded: gathered from every rank
    if not dist.is_main():
        return final
    with atomic_dir(final) as tmp:
        save_trained(model, tokenizer, tmp, state=weights)
        torch.save({"optimizer": moments, "scheduler": sched.state_dict(),
                    "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                    **state}, tmp / "trainer_state.pt")
        if extra is not None:
            extra(tmp)
    for old in _checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path, model, opt, sched) -> dict:
    # map_location: a checkpoint written on a GPU resumes on a CPU machine (and back: the
    # optimiser moves its state to its parameters' device)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
    from fastrlhf.optim import load_optimizer_state

    load_optimizer_state(model, opt, state.pop("optimizer"))
    sched.load_state_dict(state.pop("scheduler"))
    random.setstate(state.pop("python_rng"))
    torch.set_rng_state(state.pop("torch_rng"))
    return state


def maybe_checkpoint(out_dir: Path, cfg, step: int, total: int, model, tokenizer, opt, sched,
                     counters: dict, summary: dict) -> None:
    """Every cfg.save_every steps (not at the last step: final/ is written then)."""
    if cfg.save_every and step % cfg.save_every == 0 and step < total:
        save_checkpoint(out_dir, step, model, tokenizer, opt, sched,
                        {"step": step, "counters": counters, "summary": summary})
