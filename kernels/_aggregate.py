"""How a (B, T) per-token loss becomes a scalar: the four `loss_agg` modes.

Trainers silently disagree here, so the semantics are spelled out. With mask m (nonzero =
the token counts), per-token loss l, n_b = sum_t m[b, t] tokens in sequence b:

    token-mean               sum_bt l m / sum_bt m                  (DAPO; TRL "dapo"/"bnpo")
    seq-mean-token-mean      mean over sequences with n_b > 0 of sum_t l m / n_b   (GRPO paper)
    seq-mean-token-sum       (1 / B) sum_b sum_t l m
    seq-mean-token-sum-norm  (1 / (B * max_len)) sum_b sum_t l m    (Dr.GRPO; max_len defaults to T)

Every mode is sum_b w_b * sum_t l[b, t] m[b, t] with a per-sequence weight w_b computed from
the mask alone, so both the forward (from per-sequence sums) and the backward (d l[b, t] =
g * w_b * m[b, t]) need only (B,) numbers. All of it is tensor arithmetic: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_loss_agg(loss_agg: str, max_len) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {list(LOSS_AGGS)}")
    if max_len is not None and not max_len > 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")


def row_weights(counts: torch.Tensor, loss_agg: str, max_len: int | None, T: int) -> torch.Tensor:
    """counts (B,) fp32 tokens per sequence -> w (B,) fp32 with loss = sum_b w_b * rowsum_b, a
    tensor of its own (no expand: the loss ops return it as a custom op's output)."""
    B = counts.shape[0]
    if loss_agg == "token-mean":
        return (1.0 / counts.sum().clamp(min=1.0)).repeat(B)
    if loss_agg == "seq-mean-token-mean":
        nonempty = (counts > 0).float()
        return nonempty / (counts.clamp(min=1.0) * nonempty.sum().clamp(min=1.0))
    if loss_agg == "seq-mean-token-sum":
        return counts.new_full((B,), 1.0 / max(B, 1))
    return counts.new_full((B,), 1.0 / (max(B, 1) * (max_len or T)))


def check_token_tensors(named: dict, B: int, T: int, mask: torch.Tensor) -> None:
    """(B, T) float inputs on one device; mask (B, T) of bool, integer or floating dtype."""
    for name, t in named.items():
        if t is None:
            continue
        if t.shape != (B, T):
            raise ValueError(f"{name} must have shape ({B}, {T}) like logprobs, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if mask.shape != (B, T):
        raise ValueError(f"mask must have shape ({B}, {T}) like logprobs, got {tuple(mask.shape)}")
    if not (mask.dtype == torch.bool or mask.is_floating_point() or mask.dtype in _INT_DTYPES):
        raise ValueError(f"mask must be bool, integer or floating (nonzero = keep), got {mask.dtype}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    devices["mask"] = mask.device
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


# ----------------------------------------------------------------------------------------
# Triton loaders of (B, T) token tensors, shared by the policy and value loss kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _load_bt(PTR, b, t, t_ok, stride_b, stride_t):
    """Row b, positions t of a (B, T) input as fp32."""
    return tl.load(PTR + b * stride_b + t * stride_t, mask=t_ok, other=0.0).to(tl.float32)


@triton.jit
def _load_keep(MASK, b, t, t_ok, stride_b, stride_t):
    """Which positions count: in range and mask != 0 (any mask dtype)."""
    return t_ok & (tl.load(MASK + b * stride_b + t * stride_t, mask=t_ok, other=0) != 0)
