"""Checkpoints: `<output_dir>/checkpoints/step-<N>/` holds, in one process, an HF model directory
(config, safetensors, tokenizer; with LoRA the PEFT adapter alone; PPO's critic in critic/) and
`trainer_state.pt` (optimizer, scheduler, data position, RNG states, the summary so far). Under
torchrun (full fine-tuning, --sharded_checkpoints on) it holds the weights and AdamW state as
torch.distributed.checkpoint shards instead, in `shards/`: each rank writes its own part, nothing
is gathered, and any number of ranks (one process too) loads them back, each reading what its
own sharding needs; the model's config and tokenizer beside them, so `fastrlhf export` can make
an HF directory of one. Either way a checkpoint is written beside its place and renamed (a crash
never leaves a half-written one); the damage check sets a cut-short one aside; resuming refuses a
run whose settings changed. Only the main process writes anything but its own shard (fastrlhf.dist)."""

from __future__ import annotations

import contextlib
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

SHARDS = "shards"  # a sharded checkpoint's torch.distributed.checkpoint directory


def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint holds DCP shards (written under torchrun) rather than an HF directory."""
    return (Path(ckpt) / SHARDS).is_dir()


def weights(ckpt: Path | None) -> Path | None:
    """What models.load_trained(ckpt=) loads weights from: the checkpoint when it is an HF (or
    adapter) directory; None when there is none or it holds shards (loaded into the sharded model
    with its optimiser state: load_trainer_state)."""
    return None if ckpt is None or is_sharded(ckpt) else ckpt


def writes_shards(cfg) -> bool:
    """Whether this run's checkpoints are sharded: under torchrun, full fine-tuning, unless
    --sharded_checkpoints false. (LoRA's checkpoints stay the small PEFT adapter directory.)"""
    from fastrlhf import lora

    return dist.world_size() > 1 and getattr(cfg, "sharded_checkpoints", True) and not lora.enabled(cfg)


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
    if is_sharded(ckpt):
        why = _damaged_shards(ckpt / SHARDS)
        if why:
            return why
    for state in sorted(ckpt.glob("**/*_state.pt")):
        try:
            with zipfile.ZipFile(state) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{state.relative_to(ckpt)} is not a complete torch file ({e})"
        if bad is not None:
            return f"{state.relative_to(ckpt)} is corrupt (bad CRC in {bad})"
    return None


def _damaged_shards(path: Path) -> str | None:
    """A DCP directory's .metadata readable, and every shard file as long as the metadata says."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a missing or truncated pickle: whatever it raises
        return f"{SHARDS}/.metadata is missing or unreadable ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        have = (path / name).stat().st_size if (path / name).exists() else -1
        if have < size:
            return f"{SHARDS}/{name} is {'missing' if have < 0 else f'cut short ({have} of {size} bytes)'}"
    return None


# Settings a resumed run may change: where and how it runs, how often it reports, how long.
RESUMABLE = {"output_dir", "device", "engine", "gpu_memory_utilization", "enforce_eager", "offload_params",
             "eval_every", "save_every", "log_samples", "log_samples_every", "gradient_checkpointing", "fsdp_offload",
             "sharded_checkpoints", "rollout_tp",
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
                    keep: int = 2, critic: tuple | None = None, sharded: bool = False) -> Path:
    """A checkpoint of step `step`, written atomically (older ones beyond `keep` removed): the
    model, its optimiser and schedule, `state` (step, counters, summary, ...) and the RNG states;
    critic: PPO's (critic, its optimiser, its schedule). sharded (writes_shards): every rank
    writes its own shards (a collective: call it on all ranks); else an HF directory +
    trainer_state.pt from the main process, a sharded model's state gathered to it first."""
    final = out_dir / "checkpoints" / f"step-{step}"
    parts = {"policy": (model, opt, sched), **({"critic": critic} if critic else {})}
    rng = {"python_rng": random.getstate(), "torch_rng": torch.get_rng_state()}
    if sharded:
        _save_shards(final, parts, tokenizer, {**rng, **state})
    else:
        _save_gathered(final, parts, tokenizer, {**rng, **state})
    if dist.is_main():
        for old in _checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_gathered(final: Path, parts: dict, tokenizer, state: dict) -> None:
    """The one-process layout: the policy's HF directory (LoRA: its adapter) and trainer_state.pt,
    the critic's in critic/ with critic_state.pt."""
    from fastrlhf.models import full_state_dict, save_trained
    from fastrlhf.optim import optimizer_state

    whole = {name: (full_state_dict(m), optimizer_state(m, o)) for name, (m, o, _) in parts.items()}  # (collectives)
    if not dist.is_main():
        return
    with atomic_dir(final) as tmp:
        for name, (m, _, sched) in parts.items():
            where = tmp if name == "policy" else tmp / name
            weights, moments = whole[name]
            save_trained(m, tokenizer, where, state=weights)
            saved = {"optimizer": moments, "scheduler": sched.state_dict(), **(state if name == "policy" else {})}
            torch.save(saved, where / ("trainer_state.pt" if name == "policy" else f"{name}_state.pt"))


def _part_state(model, opt) -> dict:
    """A trained model's weights and optimiser state as this rank holds them (its shards, keyed
    by parameter name): what DCP writes, and the template it loads into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, moments = get_state_dict(model, opt)
    return {"model": weights, "optimizer": moments}


def _save_shards(final: Path, parts: dict, tokenizer, state: dict) -> None:
    """DCP: shards/ (every rank its own part of each model and optimiser; nothing gathered), and
    from the main process trainer_state.pt (schedules, RNG, data position) and each model's config
    + the tokenizer (what export needs); all into the temp directory the main process makes
    (atomic_dir), renamed into place by it once every rank's shards are written."""
    import torch.distributed.checkpoint as dcp

    with contextlib.ExitStack() as stack:
        tmp = dist.on_main(lambda: stack.enter_context(atomic_dir(final)))
        # a collective; a rank's failure is raised on every rank (and the main process's temp directory removed)
        dcp.save({name: _part_state(m, o) for name, (m, o, _) in parts.items()}, checkpoint_id=str(tmp / SHARDS))

        def beside() -> None:
            for name, (m, _, _) in parts.items():
                where = tmp if name == "policy" else tmp / name
                m.config.save_pretrained(where)
                tokenizer.save_pretrained(where)
            schedules = {f"{name}_scheduler": sched.state_dict() for name, (_, _, sched) in parts.items()}
            torch.save({**state, **schedules, "world_size": dist.world_size()}, tmp / "trainer_state.pt")
        dist.on_main(beside)


def _load_shards(ckpt: Path, parts: dict) -> None:
    """The models' and optimisers' state from a sharded checkpoint, into this run's (sharded
    over any number of ranks, or whole in one process: DCP reads what each rank's own layout needs)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from fastrlhf.models import check_finite_model

    want = {name: _part_state(m, o) for name, (m, o) in parts.items()}
    dcp.load(want, checkpoint_id=str(ckpt / SHARDS))
    for name, (m, o) in parts.items():
        set_state_dict(m, o, model_state_dict=want[name]["model"], optim_state_dict=want[name]["optimizer"])
        check_finite_model(m, ckpt if name == "policy" else ckpt / name)


def load_trainer_state(ckpt: Path, model, opt, sched, critic: tuple | None = None) -> dict:
    """What save_checkpoint wrote, into this run's model(s), optimiser(s) and schedule(s) (a
    gathered checkpoint's weights were loaded with the model: models.load_trained(ckpt=)); the RNG
    states restored; returns the rest (step, counters, summary, ...)."""
    # map_location: a checkpoint written on a GPU resumes on a CPU machine (and back: the
    # optimiser moves its state to its parameters' device)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
    parts = {"policy": (model, opt, sched), **({"critic": critic} if critic else {})}
    if is_sharded(ckpt):
        _load_shards(ckpt, {name: (m, o) for name, (m, o, _) in parts.items()})
        for name, (_, _, s) in parts.items():
            s.load_state_dict(state.pop(f"{name}_scheduler"))
        state.pop("world_size", None)
    else:
        from fastrlhf.optim import load_optimizer_state

        for name, (m, o, s) in parts.items():
            saved = state if name == "policy" else \
                torch.load(ckpt / name / f"{name}_state.pt", weights_only=False, map_location="cpu")
            load_optimizer_state(m, o, saved.pop("optimizer"))
            s.load_state_dict(saved.pop("scheduler"))
    random.setstate(state.pop("python_rng"))
    torch.set_rng_state(state.pop("torch_rng"))
    return state


def maybe_checkpoint(out_dir: Path, cfg, step: int, total: int, model, tokenizer, opt, sched,
                     counters: dict, summary: dict) -> None:
    """Every cfg.save_every steps (not at the last step: final/ is written then)."""
    if cfg.save_every and step % cfg.save_every == 0 and step < total:
        save_checkpoint(out_dir, step, model, tokenizer, opt, sched,
                        {"step": step, "counters": counters, "summary": summary}, sharded=writes_shards(cfg))


def export(ckpt: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A sharded checkpoint's models as HF directories (one process; no optimiser state is read):
    the policy in out_dir, PPO's critic in out_dir/critic, in `dtype`, written atomically."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fastrlhf.models import load_tokenizer, save_pretrained_atomic

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not is_sharded(ckpt):
        kind = "an HF directory already" if (ckpt / "config.json").exists() else "not a fastrlhf checkpoint"
        raise ValueError(f"{ckpt}: no {SHARDS}/ in it ({kind}); export reads checkpoints written under torchrun")
    why = damaged(ckpt)
    if why:
        raise ValueError(f"{ckpt}: {why}")
    parts = ["policy"] + (["critic"] if (ckpt / "critic" / "config.json").exists() else [])
    for name in parts:
        where = ckpt if name == "policy" else ckpt / name
        config = AutoConfig.from_pretrained(where)
        auto = AutoModelForCausalLM if name == "policy" else AutoModelForSequenceClassification
        model = auto.from_config(config, dtype=torch.float32)
        weights = {name: {"model": get_model_state_dict(model)}}  # the template, keyed as the trainer saved it
        dcp.load(weights, checkpoint_id=str(ckpt / SHARDS))
        set_model_state_dict(model, weights[name]["model"])
        save_pretrained_atomic(model, load_tokenizer(where), out_dir if name == "policy" else out_dir / name, dtype)
    return out_dir


def main(argv: list[str]) -> None:
    """fastrlhf export CHECKPOINT OUTPUT_DIR [--dtype float32|bfloat16|float16]"""
    import argparse

    p = argparse.ArgumentParser(prog="fastrlhf export", description="A sharded checkpoint (written under torchrun: "
                                "step-N/shards/) as an HF directory transformers and vLLM load; PPO's critic in "
                                "OUTPUT_DIR/critic.")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/sft/checkpoints/step-500")
    p.add_argument("output_dir")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the saved weights' dtype (the checkpoint holds the float32 master weights)")
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.output_dir, getattr(torch, args.dtype))
    print(f"fastrlhf export: {args.checkpoint} -> {out}")
