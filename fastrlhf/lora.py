"""LoRA adapters through PEFT: the trained model's decoder gets low-rank adapters, the base stays
frozen (in the compute dtype: no float32 master copy, no AdamW state for it).

    apply(model, cfg, ...)     PEFT's LoraConfig from the run's --lora_* flags on a loaded model, or
                               the adapters of a checkpoint (resume); trainable parameters float32
    AdaptersOff(model)         the reference: the same model with its adapters off (PEFT's
                               disable_adapter()), so the base is in memory once
    merged_weights(model)      (name, W + scale * B @ A) under the base model's own parameter names,
                               one parameter at a time, the trained modules untouched: what the
                               rollout engine is pushed and what final/ holds
    save_adapter(model, dir)   the PEFT adapter directory (PeftModel.from_pretrained loads it)
    is_adapter_dir / adapter_base    a PEFT adapter directory given as --model (models.start_dir
                               merges it into the run's starting model)

Where the output layer sits: adapters go on the decoder's linear layers only (PEFT's
"all-linear" leaves the output layer out), so linear_logprob keeps reading a plain lm_head
weight. --lora_train_head trains that layer fully beside the adapters, as a PEFT
modules_to_save copy: the original stays for the reference, and a tied output layer is trained
together with its input embedding (ensure_weight_tying), as full fine-tuning of a tied model
does. A value model (reward model, PPO critic) always trains its scalar head fully the same way.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fastrlhf import dist

ADAPTER = "default"  # the one adapter a run trains


def enabled(cfg) -> bool:
    return getattr(cfg, "lora_r", 0) > 0


def is_adapted(model) -> bool:
    """A PEFT model (sharded or not). Without peft imported nothing can be one."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_config(cfg, model, *, value: bool):
    """PEFT's LoraConfig of a run's --lora_* settings for `model` (value: a scalar-head model)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    head = ["score"] if value else (["lm_head"] if cfg.lora_train_head else None)
    tied = bool(head) and not value and getattr(model.config, "tie_word_embeddings", False)
    if tied:
        head = head + [_input_embedding_name(model)]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      modules_to_save=head, ensure_weight_tying=tied, bias="none")


def _input_embedding_name(model) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb).rpartition(".")[2]


def apply(model, cfg, *, value: bool = False, ckpt: Path | None = None):
    """The model with adapters: fresh ones from cfg (B = 0, so it starts as the base; A drawn
    from cfg.seed alone, so every rank of a sharded run holds the same), or a checkpoint's (an
    adapter directory, resumed). Every trainable parameter is made float32
    (the base may be bfloat16: only what AdamW updates needs master precision)."""
    import warnings

    from peft import PeftModel, get_peft_model

    model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on Conv1D fan_in_fan_out, tied modules to save
        if ckpt is not None:
            peft = PeftModel.from_pretrained(model, str(ckpt), is_trainable=True)
        else:
            try:  # A's random init from the run's seed alone: every rank (and any rank count) draws the same
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed)
                    peft = get_peft_model(model, lora_config(cfg, model, value=value))
            except ValueError as e:  # a --lora_target_modules name the model does not have
                raise ValueError(f"lora_target_modules={cfg.lora_target_modules!r}: {e}") from e
    for p in peft.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft


def counts(model) -> dict:
    """params/trainable and params/total (each parameter once)."""
    seen = {id(p): p for p in model.parameters()}.values()
    return {"params/trainable": sum(p.numel() for p in seen if p.requires_grad),
            "params/total": sum(p.numel() for p in seen)}


def active(module: nn.Module) -> nn.Module:
    """The module a PEFT modules_to_save wrapper runs now (the trained copy, or the original while
    adapters are off); any other module itself."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        if module.disable_adapters or ADAPTER not in module.modules_to_save:
            return module.original_module
        return module.modules_to_save[ADAPTER]
    return module


class AdaptersOff:
    """The reference of an adapted policy: the same model, its adapters off for each call
    (token_logprobs and friends see `with model.disable_adapter()`), in eval mode. No second
    copy of the base."""

    def __init__(self, model):
        self.model = model

    @contextlib.contextmanager
    def off(self):
        was = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield self.model
        finally:
            self.model.train(was)

    def eval(self):  # the reference is always evaluated in eval mode (off() sees to it)
        return self

    def __getattr__(self, name):
        return getattr(self.model, name)


def merged_weights(model, state: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of the base model under its own (HF checkpoint) name,
    each adapted weight merged (W + scale * B @ A, in float32, a new tensor: the trained module
    is untouched), a modules_to_save copy under its original's name; one parameter at a time,
    each gathered whole on a sharded model (a collective: every rank iterates alike). state: read
    the tensors from the model's whole state dict instead (models.full_state_dict: no collective)."""
    base = model.get_base_model()
    if state is None:
        whole = lambda name: dist.whole(base.get_parameter(name).detach())  # noqa: E731
    else:
        whole = lambda name: state[f"base_model.model.{name}"]  # noqa: E731
    for name, _ in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        if f".modules_to_save.{ADAPTER}." in name:
            yield name.replace(f".modules_to_save.{ADAPTER}.", "."), whole(name)
            continue
        if ".base_layer." not in name:
            yield name, whole(name)
            continue
        prefix, _, rest = name.partition(".base_layer.")
        w = whole(name)
        layer = base.get_submodule(prefix)
        if rest == "weight" and ADAPTER in getattr(layer, "lora_A", {}):
            a = whole(f"{prefix}.lora_A.{ADAPTER}.weight").float()  # (r, in)
            b = whole(f"{prefix}.lora_B.{ADAPTER}.weight").float()  # (out, r)
            delta = (b @ a) * layer.scaling[ADAPTER]  # (out, in)
            w = w.float() + (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)  # GPT-2's Conv1D: (in, out)
        yield f"{prefix}.{rest}", w


def save_adapter(model, out_dir: Path, tokenizer=None, state: dict | None = None) -> None:
    """The PEFT adapter directory (adapter_config.json, adapter_model.safetensors, + the
    tokenizer); state: the whole state dict of a sharded model (models.full_state_dict)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out_dir), state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def is_adapter_dir(path) -> bool:
    return bool(path) and (Path(path) / "adapter_config.json").exists()


def adapter_base(path) -> str:
    """The base model directory a PEFT adapter directory names (adapter_config.json's
    base_model_name_or_path, relative to the working directory or to the adapter)."""
    config_path = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config['peft_type']!r}; fastrlhf reads LoRA adapters only")
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path}: no base_model_name_or_path: which model does this adapter belong to?")
    for candidate in (Path(base), Path(path) / base):
        if (candidate / "config.json").exists():
            return str(candidate)
    raise FileNotFoundError(f"{config_path}: base_model_name_or_path {base!r} is not a model directory here "
                            "(no downloads: point it at a local HF directory)")
