"""TRL's GRPOTrainer and DPOTrainer with fastrlhf's fused log-probs.

TRL (>= 1.16) computes per-token log-probs through a fused LM head it patches onto the model
(`trl.trainer.utils.add_fused_lm_head`: the backbone, then a chunked projection, never the whole
logits). The trainers here are TRL's own, their models patched with this module's
`add_fused_lm_head` instead: the same contract (called as `model(..., labels=labels,
fused_lm_head=True)`, it returns per-token fields, zero / False where the label is -100)
computed by `fastrlhf.kernels.linear_logprob` in one pass over the vocabulary, with the output
layer as the architecture computes it (bias, logit scale, final-logit softcapping; an output
transform we do not reproduce is refused):

    from fastrlhf.integrations.trl import GRPOTrainer      # instead of: from trl import GRPOTrainer
    from fastrlhf.integrations.trl import DPOTrainer       # instead of: from trl import DPOTrainer

Everything else is TRL's: generation, rewards, advantages, the losses, logging. Every field TRL's
head offers is computed: log_probs and entropy (with gradients), and the statistics DPOTrainer
logs or weights with, without gradient: mean_logits (`logits/chosen`, `logits/rejected`),
is_top1 (`mean_token_accuracy`), log_sum_sq_probs (WPO's weights, `use_weighting=True`). Tests
run TRL's GRPO and DPO both ways on the CPU and find the same trajectories.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from fastrlhf.kernels import linear_logprob
from fastrlhf.kernels._common import STATS  # what linear_logprob's return_stats computes

OUTPUTS = ("log_probs", "entropy", *STATS)  # TRL's FusedCausalLMOutput fields


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's `add_fused_lm_head` contract, on fastrlhf's linear_logprob (module docstring)."""
    from trl.trainer.utils import FusedCausalLMOutput

    from fastrlhf.models import autocast_dtype, output_transform

    missing = [o for o in outputs if o not in OUTPUTS]
    if missing:
        raise ValueError(f"fastrlhf's fused LM head computes {OUTPUTS}, not {missing}")
    logit_scale, softcap = output_transform(model.config)  # refuses a transform we do not reproduce
    original_forward = model.forward
    want_entropy = "entropy" in outputs
    stats = tuple(o for o in outputs if o in STATS)

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original_forward(*args, **kwargs, **extra)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # (B, T, H)
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2: the head whole, as TRL does
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        labels = labels.to(weight.device)
        # the kernel takes one dtype: float32 outside autocast if asked, else autocast's (as token_logprobs)
        ctx = torch.autocast(hidden.device.type, enabled=False) if cast_lm_head_to_fp32 else contextlib.nullcontext()
        dtype = torch.float32 if cast_lm_head_to_fp32 else autocast_dtype(weight)
        hidden, weight = hidden.to(weight.device, dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with ctx:
            out = linear_logprob(hidden, weight, labels, bias=bias, temperature=temperature,
                                 logit_scale=logit_scale, softcap=softcap, return_entropy=want_entropy,
                                 return_stats=stats)
        out = out if isinstance(out, tuple) else (out,)
        log_probs, entropy = out[0], out[1] if want_entropy else None
        extra = out[-1] if stats else {}
        mask = labels != -100
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask, **extra)

    model.forward = types.MethodType(forward, model)


@functools.cache
def _trainer_class(name: str):
    """TRL's trainer `name`, whose __init__ patches its models with our add_fused_lm_head."""
    import importlib

    import trl

    module = importlib.import_module(f"trl.trainer.{name[:-len('Trainer')].lower()}_trainer")

    def __init__(self, *args, **kwargs):
        original = module.add_fused_lm_head
        module.add_fused_lm_head = add_fused_lm_head  # what TRL's __init__ patches the models with
        try:
            super(cls, self).__init__(*args, **kwargs)
        finally:
            module.add_fused_lm_head = original

    cls = type(name, (getattr(trl, name),), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"TRL's {name}, its fused LM head fastrlhf's (module docstring)."})
    return cls


def __getattr__(name):  # trl is imported only when a trainer is asked for
    if name in ("GRPOTrainer", "DPOTrainer"):
        return _trainer_class(name)
    raise AttributeError(name)
