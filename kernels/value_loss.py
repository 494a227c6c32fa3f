"""value_loss: PPO's clipped value loss for the critic, fused per token.

Per token, with prediction v, the rollout's prediction v_old and the return R:
    v_clip = v_old + clamp(v - v_old, -clip, clip)
    loss   = 0.5 * max((v - R)^2, (v_clip - R)^2)
aggregated by `loss_agg` like policy_loss (see _aggregate.py).
d loss / d v = (v - R) where the unclipped term is the larger, (v_clip - R) where the clipped
term is larger and |v - v_old| < clip, else 0.
Metrics (detached token means over the mask): clipfrac (share of tokens where the clipped
term is the larger) and vpred_mean (mean prediction).

The memory argument: eager builds ~8 (B, T) temporaries and keeps them for autograd; here
the forward reads 3 inputs once and writes 4 partial sums per (sequence, tile); the backward
reads them again and writes d(values). No host synchronisation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._aggregate import _load_bt, _load_keep, check_loss_agg, check_token_tensors, row_weights
from ._common import empty_f32, resolve_impl

_K = 4  # partial sums: loss, tokens, clipped, values

# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _value_token(v, v_old, ret, clip):
    v_clip = v_old + tl.minimum(tl.maximum(v - v_old, -clip), clip)
    l1 = (v - ret) * (v - ret)
    l2 = (v_clip - ret) * (v_clip - ret)
    clipped = l2 > l1
    inside = tl.abs(v - v_old) < clip
    dloss = tl.where(clipped, tl.where(inside, v_clip - ret, 0.0), v - ret)
    return 0.5 * tl.where(clipped, l2, l1), dloss, clipped  # max(l1, l2); a NaN stays NaN


@triton.jit
def _load_value_inputs(V, VOLD, RET, MASK, b, t, t_ok, s_v_b, s_v_t, s_o_b, s_o_t, s_r_b, s_r_t,
                       s_m_b, s_m_t):
    return (_load_bt(V, b, t, t_ok, s_v_b, s_v_t), _load_bt(VOLD, b, t, t_ok, s_o_b, s_o_t),
            _load_bt(RET, b, t, t_ok, s_r_b, s_r_t), _load_keep(MASK, b, t, t_ok, s_m_b, s_m_t))


@triton.jit
def _value_loss_fwd_kernel(
    V, VOLD, RET, MASK, PARTIALS,
    T,
    s_v_b, s_v_t, s_o_b, s_o_t, s_r_b, s_r_t, s_m_b, s_m_t, s_part_k,
    clip,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    v, v_old, ret, keep = _load_value_inputs(V, VOLD, RET, MASK, b, t, t_ok, s_v_b, s_v_t, s_o_b,
                                             s_o_t, s_r_b, s_r_t, s_m_b, s_m_t)
    loss, _, clipped = _value_token(v, v_old, ret, clip)
    out = PARTIALS + (b * tl.num_programs(1) + tile)
    tl.store(out + 0 * s_part_k, tl.sum(tl.where(keep, loss, 0.0), axis=0))
    tl.store(out + 1 * s_part_k, tl.sum(keep.to(tl.float32), axis=0))
    tl.store(out + 2 * s_part_k, tl.sum((keep & clipped).to(tl.float32), axis=0))
    tl.store(out + 3 * s_part_k, tl.sum(tl.where(keep, v, 0.0), axis=0))


@triton.jit
def _value_loss_bwd_kernel(
    V, VOLD, RET, MASK, COEF, DV,
    T,
    s_v_b, s_v_t, s_o_b, s_o_t, s_r_b, s_r_t, s_m_b, s_m_t,
    clip,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    v, v_old, ret, keep = _load_value_inputs(V, VOLD, RET, MASK, b, t, t_ok, s_v_b, s_v_t, s_o_b,
                                             s_o_t, s_r_b, s_r_t, s_m_b, s_m_t)
    _, dloss, _ = _value_token(v, v_old, ret, clip)
    coef = tl.load(COEF + b)
    tl.store(DV + b * T + t, tl.where(keep, coef * dloss, 0.0).to(DV.dtype.element_ty), mask=t_ok)


# ----------------------------------------------------------------------------------------
# launchers and torch.library custom ops (see linear_logprob.py)
# ----------------------------------------------------------------------------------------

BLOCK_T = 1024


@torch.library.custom_op("fastrlhf::value_loss", mutates_args=())
def _value_loss_op(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float,
                   loss_agg: str, max_len: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T) each -> loss () fp32, the partial sums (K, B) fp32, the sequences' weights (B,) fp32."""
    B, T = values.shape
    n_tiles = max(1, triton.cdiv(T, BLOCK_T))
    partials = torch.empty((_K, B, n_tiles), device=values.device, dtype=torch.float32)
    strides = values.stride() + old_values.stride() + returns.stride() + mask.stride()
    if B:
        _value_loss_fwd_kernel[(B, n_tiles)](values, old_values, returns, mask, partials, T,
                                             *strides, partials.stride(0), clip, BLOCK_T=BLOCK_T)
    sums = partials.sum(dim=2)  # (K, B)
    w = row_weights(sums[1], loss_agg, max_len, T)  # (B,)
    return (w * sums[0]).sum(), sums, w


@_value_loss_op.register_fake
def _(values, old_values, returns, mask, clip, loss_agg, max_len):
    B = values.shape[0]
    return empty_f32(values, ()), empty_f32(values, (_K, B)), empty_f32(values, B)


@torch.library.custom_op("fastrlhf::value_loss_backward", mutates_args=())
def _value_loss_backward_op(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, coef: Tensor,
                            clip: float) -> Tensor:
    """coef (B,): upstream gradient * each sequence's weight -> d(values) (B, T) in its dtype."""
    B, T = values.shape
    dv = torch.empty((B, T), device=values.device, dtype=values.dtype)
    strides = values.stride() + old_values.stride() + returns.stride() + mask.stride()
    if B:
        _value_loss_bwd_kernel[(B, max(1, triton.cdiv(T, BLOCK_T)))](
            values, old_values, returns, mask, coef.contiguous(), dv, T, *strides, clip, BLOCK_T=BLOCK_T)
    return dv


@_value_loss_backward_op.register_fake
def _(values, old_values, returns, mask, coef, clip):
    return values.new_empty(values.shape)


def _setup_context(ctx, inputs, output):
    values, old_values, returns, mask, clip, loss_agg, max_len = inputs
    _, sums, w = output
    ctx.save_for_backward(values, old_values, returns, mask, w)
    ctx.clip = clip
    ctx.mark_non_differentiable(sums, w)


def _backward(ctx, g_loss, _g_sums, _g_w):
    values, old_values, returns, mask, w = ctx.saved_tensors
    return _value_loss_backward_op(values, old_values, returns, mask, w * g_loss, ctx.clip), \
        None, None, None, None, None, None


_value_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------


def value_loss(values, old_values, returns, mask, *, clip=0.2, loss_agg="token-mean",
               max_len=None, impl=None):
    """Clipped value loss. values, old_values, returns, mask: (B, T); values gets the gradient.

    Returns (loss, metrics) with metrics {"clipfrac", "vpred_mean"} detached float32 scalars.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be (B, T), got shape {tuple(values.shape)}")
    B, T = values.shape
    check_token_tensors({"values": values, "old_values": old_values, "returns": returns}, B, T, mask)
    check_loss_agg(loss_agg, max_len)
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    if resolve_impl(impl, values) == "torch":
        return value_loss_ref(values, old_values, returns, mask, clip=clip, loss_agg=loss_agg,
                              max_len=max_len)
    loss, sums, _ = _value_loss_op(values, old_values.detach(), returns.detach(), mask, float(clip), loss_agg,
                                   max_len)
    tot = sums.detach().sum(dim=1)
    n = tot[1].clamp(min=1.0)
    return loss, {"clipfrac": tot[2] / n, "vpred_mean": tot[3] / n}


def value_loss_ref(values, old_values, returns, mask, *, clip=0.2, loss_agg="token-mean",
                   max_len=None):
    """Pure torch, autograd-differentiated (the CPU path; in float64, the test reference)."""
    B, T = values.shape
    dt = torch.promote_types(values.dtype, torch.float32)
    keep = mask != 0
    f = lambda t: torch.where(keep, t.to(dt), 0.0)  # noqa: E731  (see policy_loss_ref)
    v, v_old, ret = f(values), f(old_values).detach(), f(returns).detach()
    v_clip = v_old + torch.clamp(v - v_old, -clip, clip)
    l1, l2 = (v - ret) ** 2, (v_clip - ret) ** 2
    loss_tok = 0.5 * torch.maximum(l1, l2)
    zero = torch.zeros((), dtype=dt, device=v.device)
    counts = keep.to(dt).sum(dim=1)
    loss = (row_weights(counts.float(), loss_agg, max_len, T).to(dt)
            * torch.where(keep, loss_tok, zero).sum(dim=1)).sum()
    n = counts.sum().clamp(min=1.0)
    with torch.no_grad():
        metrics = {"clipfrac": torch.where(keep, (l2 > l1).to(dt), zero).sum() / n,
                   "vpred_mean": torch.where(keep, v, zero).sum() / n}
    out = torch.float64 if dt == torch.float64 else torch.float32
    return loss.to(out), {k: m.to(out) for k, m in metrics.items()}
