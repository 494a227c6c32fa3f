"""What every trainer shares, as plain functions: config <-> YAML <-> command line, the metrics
log, optimiser and schedule, token-budget steps, atomic checkpoints with exact resume.

Config. One flat dataclass per algorithm; each field has metadata {"help": ...}. A YAML file
only overrides fields (an unknown key is an error naming the key and the file); every field is
also a command-line flag (`--lr 1e-4`, `--loss_type ipo`).

Checkpoints. `<output_dir>/checkpoints/step-<N>/` holds an HF model directory (config,
safetensors, tokenizer) and `trainer_state.pt` (optimizer, scheduler, data position, RNG
states, metrics so far); it is written to a temp dir and renamed, so a crash never leaves a
half-written checkpoint, and a non-finite loss never reaches one (the step is skipped and
counted). `final/` is written the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# the fields every trainer shares for the model it trains, and precision
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# settings that cannot be right, refused before anything is loaded or written
# ----------------------------------------------------------------------------------------

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


class Precision:
    """Mixed precision as GPU trainers do it: float32 master weights and optimiser state,
    forward passes under autocast in the compute dtype (bf16 / fp16), float16 with a dynamic
    loss scale (GradScaler). float32: no autocast. The frozen models are loaded in the compute
    dtype itself (they have no optimiser to keep precision for)."""

    def __init__(self, name: str, device: torch.device):
        self.device = torch.device(device)
        if name == "auto":
            name = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = DTYPES[name]
        if self.dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("dtype bfloat16: this GPU does not support it; use --dtype float16")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def begin(cfg) -> tuple[Path, torch.device, Precision]:
    """The output directory (created), seeded RNGs, the device and the precision of a run."""
    check_common(cfg)
    device = resolve_device(cfg.device)
    prec = Precision(cfg.dtype, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    return out, device, prec


def check_common(cfg) -> None:
    """Settings every trainer shares that cannot be right, refused before anything runs."""
    for name in ("eval_every", "log_samples_every"):
        if getattr(cfg, name, 1) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)}: expected >= 1")
    if getattr(cfg, "save_every", 0) < 0:
        raise ValueError(f"save_every={cfg.save_every}: expected >= 0 (0: only final/)")
    if hasattr(cfg, "max_new_tokens") and not 0 < cfg.max_new_tokens < cfg.max_len:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: expected 0 < max_new_tokens < max_len={cfg.max_len} "
                         "(max_len counts the prompt and the completion)")


def optimisation(cfg, model, out: Path, total: int, ckpt: Path | None, desc: str, *, head_lr: float = 0.0):
    """AdamW + warm-up schedule, the resumed trainer state (step, counters, summary: what the
    run has reported so far, e.g. its start/* scores) from ckpt if any, and the metrics log:
    (opt, sched, state, log). head_lr > 0: the output layer (lm_head) learns at head_lr, the
    rest at cfg.lr (make_optimizer)."""
    if head_lr < 0:
        raise ValueError(f"head_lr={head_lr}: expected >= 0 (0: the output layer learns at lr)")
    head = list(model.get_output_embeddings().parameters()) if head_lr else []
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, head=head, head_lr=head_lr)
    sched = make_schedule(opt, cfg.warmup_steps, total, cfg.schedule)
    state = load_trainer_state(ckpt, opt, sched) if ckpt else {"step": 0, "counters": {}}
    state.setdefault("summary", {})
    return opt, sched, state, MetricsLog(out, total, desc=desc, resume_step=state["step"] if ckpt else None)


# ----------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a sibling temp directory to fill; on success it replaces `final` (the old one is
    kept as final.old until the new one is in place). A crash leaves `final` untouched and only
    `final.tmp` behind, which the next write clears."""
    final = Path(final)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        if _disk_full(e, final.parent):
            free = shutil.disk_usage(final.parent).free
            raise OSError(errno.ENOSPC, f"no space left on device writing {final} ({free / 2**20:.0f} MiB free "
                                        f"on {final.parent}); the previous copy, if any, is untouched") from e
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _disk_full(e: BaseException, where: Path) -> bool:
    """An error that is the disk being full, whatever the writer said (torch.save reports
    'unexpected pos 683264 vs 683152', safetensors an I/O error)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if isinstance(e, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(where).free < 16 * 2**20
        except OSError:
            return False
    return False


def _read_rows(path: Path, keep_step: int) -> list[str]:
    """The JSONL rows up to keep_step; a row cut short by a crash (the last) is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= keep_step:
            kept.append(line)
    return kept


class MetricsLog:
    """metrics.jsonl (one JSON object per step, flushed), TensorBoard when installed, Weights &
    Biases when installed and asked for (FASTRLHF_WANDB_PROJECT=<project>), and a one-line
    progress bar on stderr. Resuming from the checkpoint of step resume_step keeps the rows up to
    it and drops the later ones (logged before a crash, or by a finished run rerun), which the
    resumed run logs again."""

    def __init__(self, out_dir: Path, total_steps: int, *, desc: str, resume_step: int | None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        resume = resume_step is not None
        if resume and self.path.exists():
            write_atomic(self.path, "".join(line + "\n" for line in _read_rows(self.path, resume_step)))
        self.file = open(self.path, "a" if resume else "w")
        self.total, self.desc, self.t0 = total_steps, desc, time.time()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard not installed: jsonl only
            pass
        self.wandb = None
        project = os.environ.get("FASTRLHF_WANDB_PROJECT")
        if project:
            try:
                import wandb
            except ImportError:
                print("FASTRLHF_WANDB_PROJECT is set but wandb is not installed: logging to "
                      f"{self.path} only", file=sys.stderr)
            else:
                self.wandb = wandb.init(project=project, name=f"{desc}-{out_dir.name}", dir=str(out_dir),
                                        resume="allow" if resume else None)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.progress(step, row)

    def progress(self, step: int, row: dict) -> None:
        if not sys.stderr.isatty() and step % max(1, self.total // 10) and step != self.total:
            return
        frac = step / max(1, self.total)
        bar = "#" * int(20 * frac)
        shown = {k: v for k, v in row.items() if k.startswith(("loss", "eval/", "reward/mean")) and isinstance(v, float)}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        end = "\r" if sys.stderr.isatty() and step != self.total else "\n"
        print(f"{self.desc} [{bar:<20}] {step}/{self.total} {time.time() - self.t0:.0f}s {text}",
              file=sys.stderr, end=end, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class SampleLog:
    """samples.jsonl: {"step", ...} rows of generated text (prompt, completion, reward), flushed;
    resuming from the checkpoint of step resume_step drops the rows written after it."""

    def __init__(self, out_dir: Path, *, resume_step: int | None):
        self.path = out_dir / "samples.jsonl"
        if resume_step is not None and self.path.exists():
            write_atomic(self.path, "".join(line + "\n" for line in _read_rows(self.path, resume_step)))
        self.file = open(self.path, "a" if resume_step is not None else "w")

    def write(self, step: int, rows: list[dict]) -> None:
        for row in rows:
            self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _num(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v


# ----------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------


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
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_metrics(opt) -> dict:
    """The learning rates a step used: lr (the body's), and lr/head when the output layer has its own."""
    out = {"lr": opt.param_groups[0]["lr"]}
    out.update({"lr/head": g["lr"] for g in opt.param_groups if g.get("name") == "head"})
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


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------


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
             "eval_every", "save_every", "log_samples", "log_samples_every", "gradient_checkpointing",
             "tokens_per_micro_batch", "max_steps", "steps", "epochs", "resume"}


def resume_checkpoint(cfg, out_dir: Path) -> Path | None:
    """The checkpoint this run continues from, by cfg.resume:
      auto   the newest intact checkpoint, if there is one (a damaged one is set aside as
             step-N.damaged and the one before it is used, saying so), provided the run's
             settings are those it was written with: a differing field stops the run, named;
      never  start over: existing checkpoints and logs in output_dir are removed;
      must   as auto, but no intact checkpoint is an error."""
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
    from fastrlhf.models import save_hf_dir

    final = out_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as tmp:
        save_hf_dir(model, tokenizer, tmp)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                    **state}, tmp / "trainer_state.pt")
        if extra is not None:
            extra(tmp)
    for old in _checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_finite_model(model, where) -> None:
    """Every parameter finite: a checkpoint or model holding NaN/inf is refused, named."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingError(f"{where}: parameter {name} holds NaN or inf; it cannot be trained or saved")


class TrainingError(RuntimeError):
    """A run that cannot go on (every step skipped, a model gone non-finite); one line, exit 2."""


def load_trainer_state(ckpt: Path, opt, sched) -> dict:
    # map_location: a checkpoint written on a GPU resumes on a CPU machine (and back: the
    # optimiser moves its state to its parameters' device)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
    opt.load_state_dict(state.pop("optimizer"))
    sched.load_state_dict(state.pop("scheduler"))
    random.setstate(state.pop("python_rng"))
    torch.set_rng_state(state.pop("torch_rng"))
    return state


def optimizer_step(model, opt, sched, grad_clip: float, counters: dict, ok: bool = True, scaler=None,
                   update_scaler: bool = True) -> float:
    """Clip, step (unless the step's loss was not finite, ok=False, or the gradient norm is
    not: then the update is skipped and counted in counters["skipped_nonfinite"]), zero the
    gradients, advance the schedule. Returns the gradient norm. With a float16 GradScaler the
    gradients are unscaled first and an overflow (the scale was too high: it is lowered) is
    counted in counters["skipped_overflow"]; update_scaler=False when a second optimiser steps
    on the same scaled loss next (the scale is updated once, after the last)."""
    grad_norm = float("nan")
    if ok:
        if scaler is not None:
            scaler.unscale_(opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
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


def finite_or_skip(loss: torch.Tensor, counters: dict) -> bool:
    """True if the loss is finite; else count the skip (the step is not applied)."""
    if torch.isfinite(loss):
        return True
    counters["skipped_nonfinite"] = counters.get("skipped_nonfinite", 0) + 1
    _count_skip(counters)
    return False


def maybe_checkpoint(out_dir: Path, cfg, step: int, total: int, model, tokenizer, opt, sched,
                     counters: dict, summary: dict) -> None:
    """Every cfg.save_every steps (not at the last step: final/ is written then)."""
    if cfg.save_every and step % cfg.save_every == 0 and step < total:
        save_checkpoint(out_dir, step, model, tokenizer, opt, sched,
                        {"step": step, "counters": counters, "summary": summary})


def finish(out_dir: Path, log: MetricsLog, model, tokenizer, summary: dict, step: int,
           counters: dict, dtype: torch.dtype | None = None) -> dict:
    """Close the log, write final/ (HF directory, in `dtype`: the run's compute dtype) and
    summary.json, both atomically."""
    from fastrlhf.models import save_pretrained_atomic

    log.close()
    if step and counters.get("skipped_nonfinite", 0) + counters.get("skipped_overflow", 0) >= step:
        raise TrainingError(f"every one of the {step} optimiser steps was skipped as non-finite: nothing was "
                            "trained, final/ is not written")
    check_finite_model(model, "final model")  # final/ is never written from a non-finite model
    save_pretrained_atomic(model, tokenizer, out_dir / "final", dtype=dtype)
    summary.update({"steps": step, "final": str(out_dir / "final"), **counters})
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
