"""Configs: one flat dataclass per trainer, composed from the groups trainers share (RunFields,
OptimFields, EpochFields, PairFields, RolloutFields: each field written once, a trainer
overriding only a default), one rule table that validates every field, and config <-> YAML
<-> command line.

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
import os
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
    from fastrlhf import dist

    if dist.is_main():
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


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The --dtype a run computes in: auto is bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def arg(default, help: str):
    """A config field: its default and the one-line help its flag shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def override(group, name: str, default=dataclasses.MISSING, help: str | None = None):
    """A trainer's own default (and help) for a field of a shared group: the field stays where
    the group put it, with the group's help unless another is given."""
    f = group.__dataclass_fields__[name]
    return arg(f.default if default is dataclasses.MISSING else default, help or help_of(f))


# ----------------------------------------------------------------------------------------
# the groups every trainer composes (flat on the command line and in YAML: --lr, not --optim.lr)
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunFields:
    """What every run has: the model it starts from, its data, where it writes, the device and
    precision, resuming, sizes of the packed forward, and how often it evaluates and saves."""

    model: str = arg("", "HF model directory to start from; empty: the built-in task's model")
    data: str = arg("", "your data: JSONL / JSON / parquet / a datasets directory (DIR:SPLIT) in this trainer's "
                        "format (docs/models-and-data.md); empty: the built-in task's")
    eval_data: str = arg("", "held-out data in the same format; empty: the built-in task's held-out set, or a 5% "
                             "split of data by prompt")
    output_dir: str = arg("runs/run", "where metrics.jsonl, samples.jsonl, checkpoints/ and final/ go")
    max_len: int = arg(1024, "longest prompt + response in tokens")
    tokens_per_micro_batch: int = arg(8192, "packed tokens per forward pass")
    eval_every: int = arg(100, "evaluate every k steps (and at the end)")
    save_every: int = arg(500, "checkpoint every k steps (0: only final/)")
    seed: int = arg(0, "seed for data order, initialisation and sampling")
    device: str = arg("auto", "auto | cpu | cuda[:N]")
    dtype: str = arg("auto", "compute dtype of forward passes, the frozen reference / reward models and vLLM: auto "
                             "(bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32; the trained weights "
                             "and AdamW state stay float32 (master weights) and final/ is saved in this dtype")
    gradient_checkpointing: bool = arg(False, "recompute each decoder layer's activations in the backward (less "
                                              "memory, ~30% more compute)")
    fsdp_offload: bool = arg(False, "under torchrun: FSDP2's CPU offload (CPUOffloadPolicy): the trained models' "
                                    "sharded float32 weights, gradients and AdamW state live in host memory and the "
                                    "optimiser step runs on the CPU; each layer is copied to the GPU for its pass")
    sharded_checkpoints: bool = arg(True, "under torchrun: checkpoints as torch.distributed.checkpoint shards, each "
                                          "rank writing its own part of the weights and AdamW state (resumable on any "
                                          "number of ranks; `fastrlhf export` makes an HF directory of one); false: "
                                          "gathered to rank 0 and written as in one process. final/ is one HF "
                                          "directory either way; LoRA checkpoints are always the adapter")
    resume: str = arg("auto", "auto: continue from the newest intact checkpoint in output_dir if its settings are "
                              "this run's (a differing field is an error) | never: start over there | must: a "
                              "checkpoint is required")
    disable_dropout: bool = arg(True, "set every dropout of the trained models to 0 (as TRL): the sampler, the "
                                      "reference and the trainer then compute the same distribution")

    def __post_init__(self):
        validate_config(self)


@dataclasses.dataclass
class OptimFields:
    """AdamW and its schedule."""

    lr: float = arg(1e-5, "peak learning rate")
    warmup_steps: int = arg(10, "linear warm-up steps")
    schedule: str = arg("cosine", "cosine | linear | constant after warm-up")
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "max gradient norm")


@dataclasses.dataclass
class LoraFields:
    """LoRA adapters (PEFT) instead of full fine-tuning: the decoder's linear layers get low-rank
    adapters and only they train (with the output layer if asked); the base stays frozen."""

    lora_r: int = arg(0, "LoRA rank (0: full fine-tuning); the reference is then the same model with its adapters "
                         "off, final/ the merged model and final/adapter/ the PEFT adapter")
    lora_alpha: float = arg(16.0, "LoRA alpha: the update is alpha / lora_r * B A")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input (0 for RL: sampler, reference and trainer then "
                                   "compute the same distribution)")
    lora_target_modules: str = arg("all-linear", "comma-separated module names to adapt (e.g. q_proj,v_proj), or "
                                                 "all-linear: every linear layer of the decoder")
    lora_train_head: bool = arg(False, "also train the output layer fully (a tied one with its input embedding); "
                                       "a value model's scalar head always trains")


@dataclasses.dataclass
class EpochFields:
    """Offline training: passes over a fixed dataset."""

    epochs: int = arg(1, "passes over the data")
    max_steps: int = arg(0, "stop after this many steps (0: run all epochs)")


@dataclasses.dataclass
class PairFields:
    """Training on preference pairs (rm, dpo) and the built-in task's simulated annotator."""

    pairs_per_step: int = arg(32, "preference pairs per optimiser step")
    task_pairs: int = arg(4000, "built-in task: pairs the simulated annotator labels")
    task_label_noise: float = arg(0.1, "built-in task: annotator's chance to pick the worse one")
    task_eval_pairs: int = arg(400, "built-in task: held-out pairs")


@dataclasses.dataclass
class RolloutFields:
    """Online RL (grpo, ppo): the reward, the rollout engine, sampling, the clipped policy loss
    and its passes over each rollout batch, samples.jsonl, the built-in task's prompts."""

    reward_fn: str = arg("", "module:function or file.py:function: TRL's batched fn(prompts, completions, **fields) "
                             "-> list[float], or fn(prompt, response, **fields) -> float; empty: the built-in task's "
                             "exact match (built-in prompts only)")
    reward_model: str = arg("", "reward model directory (instead of reward_fn)")
    engine: str = arg("auto", "rollout engine: auto (vllm if installed) | vllm | hf")
    gpu_memory_utilization: float = arg(0.3, "vLLM's share of device memory (of RAM on CPU)")
    enforce_eager: bool = arg(False, "vLLM without graph capture / compilation (faster start)")
    offload_params: bool = arg(False, "also move the parameters off the GPU while generating")
    rollout_tp: int = arg(1, "under torchrun: vLLM tensor parallelism over groups of this many neighbouring ranks "
                             "(each group's engine shards the model and generates the group's prompts together); 1: "
                             "every rank its own whole engine (data-parallel rollouts)")
    max_new_tokens: int = arg(512, "longest completion")
    prompts_per_step: int = arg(32, "P: prompts per step")
    group_size: int = arg(8, "G: samples per prompt")
    temperature: float = arg(1.0, "sampling temperature (log-probs are taken at it too)")
    top_p: float = arg(1.0, "nucleus sampling")
    steps: int = arg(200, "optimisation steps (one rollout batch each)")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    minibatches: int = arg(1, "optimiser steps per pass")
    clip_low: float = arg(0.2, "ratio clip below: 1 - clip_low")
    clip_high: float = arg(0.2, "ratio clip above: 1 + clip_high (0.28: DAPO's clip-higher)")
    dual_clip: float = arg(0.0, "dual-clip c > 1 for negative advantages (0: off)")
    surrogate: str = arg("clip", "clip: PPO's clipped surrogate | cispo: the clipped IS weight as a constant times "
                                 "log p, every token keeps its gradient (MiniMax-M1; clip_low 1: no lower bound) | "
                                 "sapo: a soft sigmoid gate instead of the clip (Qwen's SAPO)")
    sapo_tau_pos: float = arg(1.0, "SAPO's gate temperature for positive advantages")
    sapo_tau_neg: float = arg(1.05, "SAPO's gate temperature for non-positive advantages (> tau_pos: decays faster)")
    ratio_level: str = arg("token", "token | sequence: each token's ratio is its sequence's exp(mean log-ratio) "
                                    "(GSPO; TRL's importance_sampling_level)")
    loss_agg: str = arg("token-mean", "token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm")
    entropy_coef: float = arg(0.0, "entropy bonus")
    is_cap: float = arg(2.0, "upper bound of the sampler-vs-trainer importance weights (0: no weights)")
    is_floor: float = arg(0.0, "lower bound of the importance weights (0: none)")
    is_mode: str = arg("truncate", "truncate: clamp the weights to [is_floor, is_cap] (TIS) | mask: drop the tokens "
                                   "or sequences outside it (MIS)")
    is_level: str = arg("token", "token: a weight per token | sequence: exp(the summed log-ratio) for every token of "
                                 "the sequence (TRL's sequence_* modes)")
    head_lr: float = arg(0.0, "learning rate of the policy's output layer (lm_head), as nanochat's unembedding_lr; "
                              "0: lr")
    log_samples_every: int = arg(10, "write log_samples prompts, completions and rewards to samples.jsonl every "
                                     "k steps")
    log_samples: int = arg(4, "samples per samples.jsonl write (0: none)")
    task_prompts: int = arg(4000, "built-in task: training prompts")
    task_eval_prompts: int = arg(200, "built-in task: held-out prompts")
    # the online trainers' own defaults for fields of the other groups
    data: str = override(RunFields, "data", help="prompts ({\"prompt\": str | messages, ...}, + answer for rule "
                                                 "rewards): JSONL / JSON / parquet / datasets directory; empty: the "
                                                 "built-in task's training prompts")
    eval_data: str = override(RunFields, "eval_data", help="held-out prompts; empty: built-in held-out prompts or a "
                                                           "5% split")
    eval_every: int = override(RunFields, "eval_every", 10, help="evaluate every k steps (and at the start and end)")
    save_every: int = override(RunFields, "save_every", 50)
    lr: float = override(OptimFields, "lr", 1e-6)
    warmup_steps: int = override(OptimFields, "warmup_steps", 0)
    schedule: str = override(OptimFields, "schedule", "constant")


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
    "group_size": _range(1), "rollout_tp": _range(1), "ppo_epochs": _range(1), "minibatches": _range(1),
    "max_len": _range(2),
    "max_new_tokens": _range(1), "tokens_per_micro_batch": _range(1), "tokens_per_step": _range(1),
    "pairs_per_step": _range(1), "log_samples": NON_NEGATIVE, "log_samples_every": _range(1),
    "critic_warmup": NON_NEGATIVE, "kl_horizon": _range(1), "temperature": POSITIVE,
    "top_p": _range(0, 1, lo_open=True), "clip_low": _range(0, 1), "clip_high": NON_NEGATIVE,
    "dual_clip": lambda v: None if v == 0 or (math.isfinite(v) and v > 1) else "0 (off) or a finite number > 1",
    "kl_coef": NON_NEGATIVE, "kl_target": NON_NEGATIVE, "entropy_coef": NON_NEGATIVE, "is_cap": NON_NEGATIVE,
    "gamma": UNIT, "lam": UNIT, "value_clip": POSITIVE, "beta": POSITIVE,
    "label_smoothing": _range(0, 0.5, hi_open=True), "gpu_memory_utilization": _range(0, 1, lo_open=True),
    "task_error_rate": UNIT, "task_label_noise": UNIT, "task_examples": _range(1), "task_pairs": _range(1),
    "task_eval_pairs": _range(1), "task_prompts": _range(1), "task_eval_prompts": NON_NEGATIVE,
    "seed": NON_NEGATIVE, "lora_r": NON_NEGATIVE, "lora_alpha": POSITIVE, "lora_dropout": _range(0, 1, hi_open=True),
    "lora_target_modules": lambda v: None if v.strip() and all(t.strip() for t in v.split(",")) else
    "all-linear or comma-separated module names",
    "schedule": _choices("cosine", "linear", "constant"), "engine": _choices("auto", "vllm", "hf"),
    "kl_kind": _choices("k1", "k2", "k3"), "surrogate": _choices("clip", "cispo", "sapo"),
    "sapo_tau_pos": POSITIVE, "sapo_tau_neg": POSITIVE,
    "ratio_level": _choices("token", "sequence"), "is_mode": _choices("truncate", "mask"),
    "is_level": _choices("token", "sequence"), "is_floor": NON_NEGATIVE,
    "task_model_size": _choices("tiny", "small", "medium"),
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
    if getattr(cfg, "fsdp_offload", False) and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("fsdp_offload: offloads FSDP2's shards, and one process shards nothing; run under "
                         "torchrun --nproc_per_node N (N > 1), or leave it off (GRPO / PPO already move the "
                         "training state off the GPU while generating)")
    if getattr(cfg, "is_cap", 0) and getattr(cfg, "is_floor", 0) > cfg.is_cap:
        raise ValueError(f"is_floor={cfg.is_floor}: expected <= is_cap={cfg.is_cap}")
    if getattr(cfg, "surrogate", "cispo") != "cispo" and getattr(cfg, "clip_low", 0) == 1:
        raise ValueError("clip_low=1.0: expected >= 0 and < 1 (1, no lower bound, is for surrogate=cispo)")
    if getattr(cfg, "surrogate", "clip") != "clip" and getattr(cfg, "dual_clip", 0):
        raise ValueError(f"dual_clip={cfg.dual_clip}: bounds the clipped surrogate; surrogate={cfg.surrogate} has none "
                         "to bound")
    if getattr(cfg, "lora_r", 0) == 0 and getattr(cfg, "lora_train_head", False):
        raise ValueError("lora_train_head: trains the output layer beside LoRA adapters; set lora_r > 0 (with "
                         "lora_r=0 every layer trains anyway)")
    if getattr(cfg, "lora_r", 0) and getattr(cfg, "head_lr", 0) and not cfg.lora_train_head:
        raise ValueError(f"head_lr={cfg.head_lr}: with LoRA the output layer is frozen unless lora_train_head is set")
    if hasattr(cfg, "max_new_tokens") and not cfg.max_new_tokens < cfg.max_len:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: expected 0 < max_new_tokens < max_len={cfg.max_len} "
                         "(max_len counts the prompt and the completion)")
