"""Configs: one flat dataclass per trainer, the fields every trainer shares (ModelFields),
one rule table that validates every field, and config <-> YAML <-> command line.

Each field has metadata {"help": ...}. A YAML file only overrides fields (an unknown key is an
error naming the key and the file); every field is also a command-line flag (`--lr 1e-4`,
`--loss_type ipo`); a value that cannot be right is refused when the config is built, before
anything is loaded or written, with one line naming the field and what it may be.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from fastrlhf.files import write_atomic


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _coerce(f: dataclasses.Field, value: Any, where: str):
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                   "bool": bool}.get(str(f.type), None)
    if typ is None or value is None:
        return value
    if typ is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: {f.name} must be true or false, got {value!r}")
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {f.name} must be {typ.__name__}, got {value!r}") from None


def load_config(cls, argv: list[str] | None = None, *, prog: str = "fastrlhf"):
    """Defaults <- --config YAML <- command-line flags. Returns an instance of cls."""
    own = cls.__dict__.get("__annotations__", {})  # the trainer's own fields first in --help, the shared after
    fields = {f.name: f for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)}
    p = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").splitlines()[0])
    p.add_argument("--config", help="YAML file overriding the defaults")
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{help_of(f)} (default: {default!r})".replace("%", "%%")  # argparse %-formats help
        p.add_argument(f"--{name}", dest=name, default=None, help=text)
        if "_" in name:  # --output-dir as well as --output_dir
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        return cls(**_gather_values(args, fields, prog))
    except ValueError as e:  # a bad value: one line naming the field, no traceback
        raise SystemExit(f"{prog}: {e}") from None


def _gather_values(args, fields: dict, prog: str) -> dict:
    values = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.exists():
            raise SystemExit(f"{prog}: config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{prog}: {path} must hold a mapping of config fields")
        for k, v in loaded.items():
            if k not in fields:
                raise SystemExit(f"{prog}: {path}: unknown config field {k!r}; known: {sorted(fields)}")
            values[k] = _coerce(fields[k], v, str(path))
    for name in fields:
        v = getattr(args, name)
        if v is not None:
            values[name] = _coerce(fields[name], v, "command line")
    return values


def save_config(cfg, out_dir: Path) -> None:
    write_atomic(out_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu or cuda[:N]")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return torch.device(name)


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclasses.dataclass
class ModelFields:
    """What every trainer shares: how the trained model is held and whether the run resumes;
    composed into every trainer's config (flat on the command line: --dtype, --resume, ...)."""

    dtype: str = dataclasses.field(default="auto", metadata={
        "help": "compute dtype of forward passes, the frozen reference / reward models and vLLM: auto "
                "(bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32; the trained weights and "
                "AdamW state stay float32 (master weights) and final/ is saved in this dtype"})
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata={
        "help": "recompute each decoder layer's activations in the backward (less memory, ~30% more compute)"})
    resume: str = dataclasses.field(default="auto", metadata={
        "help": "auto: continue from the newest intact checkpoint in output_dir if its settings are this run's "
                "(a differing field is an error) | never: start over there | must: a checkpoint is required"})
    disable_dropout: bool = dataclasses.field(default=True, metadata={
        "help": "set every dropout of the trained models to 0 (as TRL): the sampler, the reference and the "
                "trainer then compute the same distribution"})

    def __post_init__(self):
        validate_config(self)


def _range(lo=None, hi=None, *, lo_open=False, hi_open=False):
    bounds = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
    bounds += [f"{'<' if hi_open else '<='} {hi}"] if hi is not None else []
    wanted = " and ".join(bounds)

    def check(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "a finite number" + (f" {wanted}" if wanted else "")
        if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
            return wanted
        return None
    return check


def _choices(*options):
    return lambda v: None if v in options else f"one of {list(options)}"


POSITIVE, NON_NEGATIVE, UNIT = _range(0, lo_open=True), _range(0), _range(0, 1)

# One rule per field name, shared by every trainer (a trainer can override one: RULES on its class).
RULES = {
    "lr": POSITIVE, "critic_lr": POSITIVE, "head_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "grad_clip": POSITIVE, "warmup_steps": NON_NEGATIVE, "max_steps": NON_NEGATIVE, "save_every": NON_NEGATIVE,
    "epochs": _range(1), "eval_every": _range(1), "steps": _range(1), "prompts_per_step": _range(1),
    "group_size": _range(1), "ppo_epochs": _range(1), "minibatches": _range(1), "max_len": _range(2),
    "max_new_tokens": _range(1), "tokens_per_micro_batch": _range(1), "tokens_per_step": _range(1),
    "pairs_per_step": _range(1), "log_samples": NON_NEGATIVE, "log_samples_every": _range(1),
    "critic_warmup": NON_NEGATIVE, "kl_horizon": _range(1), "temperature": POSITIVE,
    "top_p": _range(0, 1, lo_open=True), "clip_low": _range(0, 1, hi_open=True), "clip_high": NON_NEGATIVE,
    "dual_clip": lambda v: None if v == 0 or (math.isfinite(v) and v > 1) else "0 (off) or a finite number > 1",
    "kl_coef": NON_NEGATIVE, "kl_target": NON_NEGATIVE, "entropy_coef": NON_NEGATIVE, "is_cap": NON_NEGATIVE,
    "gamma": UNIT, "lam": UNIT, "value_clip": POSITIVE, "beta": POSITIVE,
    "label_smoothing": _range(0, 0.5, hi_open=True), "gpu_memory_utilization": _range(0, 1, lo_open=True),
    "task_error_rate": UNIT, "task_label_noise": UNIT, "task_examples": _range(1), "task_pairs": _range(1),
    "task_eval_pairs": _range(1), "task_prompts": _range(1), "task_eval_prompts": NON_NEGATIVE,
    "seed": NON_NEGATIVE,
    "schedule": _choices("cosine", "linear", "constant"), "engine": _choices("auto", "vllm", "hf"),
    "kl_kind": _choices("k1", "k2", "k3"), "task_model_size": _choices("tiny", "small", "medium"),
    "loss_agg": _choices("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "dtype": _choices("auto", *DTYPES), "resume": _choices("auto", "never", "must"),
    "device": lambda v: None if v == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", v) else "auto, cpu or cuda[:N]",
}


def validate_config(cfg) -> None:
    """Every field against its rule (finite, range, choices): ValueError naming the first bad one."""
    rules = {**RULES, **getattr(type(cfg), "RULES", {})}
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), rules.get(f.name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        problem = rule(value)
        if problem:
            raise ValueError(f"{f.name}={value!r}: expected {problem}")
    if hasattr(cfg, "max_new_tokens") and not cfg.max_new_tokens < cfg.max_len:  # the one rule across fields
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: expected 0 < max_new_tokens < max_len={cfg.max_len} "
                         "(max_len counts the prompt and the completion)")
