"""policy_loss: the PPO / GRPO-family clipped surrogate, fused per token, with its metrics.

Per token, with ratio r = exp(logprobs - old_logprobs) and advantage A, surrogate="clip" (PPO,
GRPO, DAPO):
    pg   = max(-A * r, -A * clamp(r, 1 - clip_low, 1 + clip_high))   clip-higher when unequal (DAPO)
    pg   = min(pg, -A * dual_clip)  where A < 0                       dual clip (Ye et al. 2020)
surrogate="cispo" (MiniMax-M1, 2025: the clipped IS weight is a constant, so every token keeps
its gradient; TRL's cispo with epsilon_high=E is clip_low=1, clip_high=E-1):
    pg   = -sg(clamp(r, 1 - clip_low, 1 + clip_high)) * A * logprobs
surrogate="sapo" (Soft Adaptive Policy Optimization, Gao et al. 2025 (Qwen); TRL's sapo): a
smooth gate in place of the hard clip, tau = tau_pos where A > 0, else tau_neg:
    pg   = -(4 / tau) * sigmoid(tau * (r - 1)) * A
its gradient -A * 4 s (1 - s) * r (s the sigmoid) equals PPO's -A * r at r = 1 and decays
smoothly, faster for the negative side when tau_neg > tau_pos;
then, whichever surrogate,
    pg  *= is_weights                                                 sampler/trainer IS correction
    loss = pg + kl_coef * kl_penalty(logprobs, ref_logprobs, kl_kind) - entropy_coef * entropy
aggregated by `loss_agg` (see _aggregate.py). d loss / d logprobs per token:
    clip:  -A * r * is_w   where the unclipped branch is active, 0 where clipping or the dual
           clip bind;   cispo: -A * clamp(r) * is_w everywhere;   sapo: -A * 4 s (1 - s) r * is_w;
    + kl_coef * dkl/dx; and d loss / d entropy = -entropy_coef. Other inputs get no gradient.
ratio_level="sequence" (GSPO-token, Zheng et al. 2025): every token's ratio is its sequence's
    s = exp(mean over the sequence's tokens of (logprobs - old_logprobs)), as a value, with the
    token's own gradient (d s_t / d logprobs_t = s): computed by handing the kernel
    old' = sg(logprobs) - log s, so r = s exactly; one masked mean and one float32 (B, T)
    temporary in torch before the kernel. With advantages constant over each sequence (GRPO)
    this is GSPO itself (its gradient through the mean is the same, for every loss_agg); TRL's
    importance_sampling_level="sequence".
Metrics (detached, token means over the mask, whatever loss_agg is):
    clipfrac    share of tokens where the clipped branch binds (-A*clamp(r) > -A*r); cispo: where
                the IS weight is clamped; sapo: where r is outside [1 - clip_low, 1 + clip_high]
                (what a hard clip would cut)
    approx_kl   mean of (r - 1) - log r: the k3 estimate of KL(old || new)
    ratio_mean  mean of r
    kl          mean of kl_penalty(logprobs, ref_logprobs) (0 without a reference)
    entropy     mean of entropy (0 without one)

The memory argument: eager torch builds ~15 (B, T) fp32 temporaries (ratio, two surrogate
branches, max, masks, KL terms, products) and keeps most for autograd, then several reduction
passes. Here one forward kernel reads each input once and writes 7 partial sums per
(sequence, tile); one backward kernel reads the inputs again and writes d(logprobs)
[and d(entropy)]. Nothing leaves the GPU: there is no .item(), so the op can be captured in a
CUDA graph. It is bandwidth-bound at about (5 + #optional inputs) * 4 B per token forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._aggregate import _load_bt, _load_keep, check_loss_agg, check_token_tensors, row_weights
from ._common import check_finite, empty_f32, resolve_impl
from .kl_penalty import _kl_token, kl_kind_id, kl_penalty_ref

# partial sums per (sequence, tile): loss, tokens, clipped, ratio, approx_kl, kl, entropy
_K = 7
METRICS = ("clipfrac", "ratio_mean", "approx_kl", "kl", "entropy")
SURROGATES = ("clip", "cispo", "sapo")  # the kernels' SURROGATE constexpr is the index
RATIO_LEVELS = ("token", "sequence")

# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _policy_token(lp, old, adv, ref, ent, isw, clip_low, clip_high, dual_clip, kl_coef,
                  entropy_coef, tau_pos, tau_neg, HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr,
                  HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr, KL_KIND: tl.constexpr,
                  SURROGATE: tl.constexpr):
    """Per-token loss, d loss / d logprobs, clipped flag, ratio, approx_kl, kl (fp32 tiles)."""
    log_ratio = lp - old
    ratio = tl.exp(log_ratio)
    clamped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    if SURROGATE == 1:  # cispo: the clamped weight is a constant: d(-A w lp)/dlp = -A w
        clipped = clamped != ratio
        dpg = -adv * clamped
        pg = dpg * lp
    elif SURROGATE == 2:  # sapo: d/dlp of -(4/tau) sigmoid(tau (r - 1)) A = -A 4 s (1 - s) r
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        clipped = clamped != ratio
        pg = -adv * gate * (4.0 / tau)
        dpg = -adv * 4.0 * gate * (1.0 - gate) * ratio
    else:
        pg1 = -adv * ratio
        pg2 = -adv * clamped
        clipped = pg2 > pg1
        pg = tl.where(clipped, pg2, pg1)  # max(pg1, pg2), but a NaN stays NaN (tl.maximum drops it)
        dpg = tl.where(clipped, 0.0, pg1)  # d(-A r)/dlp = -A r
    if HAS_DUAL:
        pg3 = -adv * dual_clip
        dual = (adv < 0) & (pg3 < pg)
        pg = tl.where(dual, pg3, pg)
        dpg = tl.where(dual, 0.0, dpg)
    if HAS_ISW:
        pg = pg * isw
        dpg = dpg * isw
    loss = pg
    dloss = dpg
    kl = tl.zeros(lp.shape, tl.float32)
    if HAS_REF:
        kl, dkl = _kl_token(lp, ref, KL_KIND)
        loss += kl_coef * kl
        dloss += kl_coef * dkl
    if HAS_ENT:
        loss -= entropy_coef * ent
    approx_kl = ratio - 1.0 - log_ratio
    return loss, dloss, clipped, ratio, approx_kl, kl


@triton.jit
def _load_policy_inputs(LP, OLD, ADV, MASK, REF, ENT, ISW, b, t, t_ok,
                        s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t,
                        s_ref_b, s_ref_t, s_ent_b, s_ent_t, s_isw_b, s_isw_t,
                        HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr):
    """The tiles both policy kernels read; absent optional inputs come back as lp (unused)."""
    lp = _load_bt(LP, b, t, t_ok, s_lp_b, s_lp_t)
    old = _load_bt(OLD, b, t, t_ok, s_old_b, s_old_t)
    adv = _load_bt(ADV, b, t, t_ok, s_adv_b, s_adv_t)
    keep = _load_keep(MASK, b, t, t_ok, s_m_b, s_m_t)
    ref = lp
    ent = lp
    isw = lp
    if HAS_REF:
        ref = _load_bt(REF, b, t, t_ok, s_ref_b, s_ref_t)
    if HAS_ENT:
        ent = _load_bt(ENT, b, t, t_ok, s_ent_b, s_ent_t)
    if HAS_ISW:
        isw = _load_bt(ISW, b, t, t_ok, s_isw_b, s_isw_t)
    return lp, old, adv, keep, ref, ent, isw


@triton.jit
def _policy_loss_fwd_kernel(
    # pointers
    LP, OLD, ADV, MASK, REF, ENT, ISW, PARTIALS,
    # shapes
    T,
    # strides ((b, t) for every (B, T) input; advantages of shape (B,) come with t-stride 0)
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t,
    s_ent_b, s_ent_t, s_isw_b, s_isw_t, s_part_k,
    # scalars
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg,
    # flags and tiles
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr,
    KL_KIND: tl.constexpr, SURROGATE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,)
    t_ok = t < T
    lp, old, adv, keep, ref, ent, isw = _load_policy_inputs(
        LP, OLD, ADV, MASK, REF, ENT, ISW, b, t, t_ok, s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b,
        s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t, s_ent_b, s_ent_t, s_isw_b, s_isw_t,
        HAS_REF, HAS_ENT, HAS_ISW)
    loss, _, clipped, ratio, approx_kl, kl = _policy_token(
        lp, old, adv, ref, ent, isw, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg,
        HAS_DUAL, HAS_REF, HAS_ENT, HAS_ISW, KL_KIND, SURROGATE)
    # masked positions contribute exactly 0 (tl.where: NaN/inf there cannot leak in)
    out = PARTIALS + (b * tl.num_programs(1) + tile)
    tl.store(out + 0 * s_part_k, tl.sum(tl.where(keep, loss, 0.0), axis=0))
    tl.store(out + 1 * s_part_k, tl.sum(keep.to(tl.float32), axis=0))
    tl.store(out + 2 * s_part_k, tl.sum((keep & clipped).to(tl.float32), axis=0))
    tl.store(out + 3 * s_part_k, tl.sum(tl.where(keep, ratio, 0.0), axis=0))
    tl.store(out + 4 * s_part_k, tl.sum(tl.where(keep, approx_kl, 0.0), axis=0))
    tl.store(out + 5 * s_part_k, tl.sum(tl.where(keep, kl, 0.0), axis=0))
    ent_sum = 0.0
    if HAS_ENT:
        ent_sum = tl.sum(tl.where(keep, ent, 0.0), axis=0)
    tl.store(out + 6 * s_part_k, ent_sum)


@triton.jit
def _policy_loss_bwd_kernel(
    # pointers
    LP, OLD, ADV, MASK, REF, ENT, ISW, COEF, DLP, DENT,
    # shapes
    T,
    # strides (d(logprobs), d(entropy) are contiguous (B, T))
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t,
    s_ent_b, s_ent_t, s_isw_b, s_isw_t,
    # scalars
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg,
    # flags and tiles
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr,
    KL_KIND: tl.constexpr, SURROGATE: tl.constexpr, WANT_DENT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    lp, old, adv, keep, ref, ent, isw = _load_policy_inputs(
        LP, OLD, ADV, MASK, REF, ENT, ISW, b, t, t_ok, s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b,
        s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t, s_ent_b, s_ent_t, s_isw_b, s_isw_t,
        HAS_REF, False, HAS_ISW)
    _, dloss, _, _, _, _ = _policy_token(
        lp, old, adv, ref, ent, isw, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg,
        HAS_DUAL, HAS_REF, False, HAS_ISW, KL_KIND, SURROGATE)
    coef = tl.load(COEF + b)  # upstream gradient * this sequence's aggregation weight
    tl.store(DLP + b * T + t, tl.where(keep, coef * dloss, 0.0).to(DLP.dtype.element_ty), mask=t_ok)
    if WANT_DENT:
        tl.store(DENT + b * T + t, tl.where(keep, -entropy_coef * coef, 0.0).to(DENT.dtype.element_ty),
                 mask=t_ok)


# ----------------------------------------------------------------------------------------
# launchers and torch.library custom ops (see linear_logprob.py)
# ----------------------------------------------------------------------------------------

BLOCK_T = 1024


def _strides(t, B, T):
    return (0, 0) if t is None else tuple(t.stride())


def _launch_opts(clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, surrogate, tau_pos, tau_neg,
                 ref, isw):
    """The kernels' scalar arguments and constexpr flags from the op's arguments."""
    scalars = (clip_low, clip_high, dual_clip or 0.0, kl_coef, entropy_coef, tau_pos, tau_neg)
    flags = dict(HAS_DUAL=dual_clip is not None, HAS_REF=ref is not None, HAS_ISW=isw is not None,
                 KL_KIND=kl_kind, SURROGATE=surrogate)
    return scalars, flags


@torch.library.custom_op("fastrlhf::policy_loss", mutates_args=())
def _policy_loss_op(logprobs: Tensor, entropy: Optional[Tensor], old: Tensor, adv: Tensor, mask: Tensor,
                    ref: Optional[Tensor], isw: Optional[Tensor], clip_low: float, clip_high: float,
                    dual_clip: Optional[float], kl_coef: float, kl_kind: int, entropy_coef: float,
                    surrogate: int, tau_pos: float, tau_neg: float, loss_agg: str,
                    max_len: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Every tensor (B, T) (advantages may be a stride-0 expand of (B,)) ->
    loss () fp32, the partial sums (K, B) fp32, the sequences' aggregation weights (B,) fp32."""
    B, T = logprobs.shape
    n_tiles = max(1, triton.cdiv(T, BLOCK_T))
    partials = torch.empty((_K, B, n_tiles), device=logprobs.device, dtype=torch.float32)
    args = _kernel_args(logprobs, old, adv, mask, ref, entropy, isw, B, T)
    scalars, flags = _launch_opts(clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, surrogate,
                                  tau_pos, tau_neg, ref, isw)
    if B:
        _policy_loss_fwd_kernel[(B, n_tiles)](
            *args["ptrs"], partials, T, *args["strides"], partials.stride(0), *scalars,
            **flags, HAS_ENT=entropy is not None, BLOCK_T=BLOCK_T)
    sums = partials.sum(dim=2)  # (K, B)
    w = row_weights(sums[1], loss_agg, max_len, T)  # (B,)
    return (w * sums[0]).sum(), sums, w


@_policy_loss_op.register_fake
def _(logprobs, entropy, old, adv, mask, ref, isw, clip_low, clip_high, dual_clip, kl_coef, kl_kind,
      entropy_coef, surrogate, tau_pos, tau_neg, loss_agg, max_len):
    B = logprobs.shape[0]
    return empty_f32(logprobs, ()), empty_f32(logprobs, (_K, B)), empty_f32(logprobs, B)


@torch.library.custom_op("fastrlhf::policy_loss_backward", mutates_args=())
def _policy_loss_backward_op(logprobs: Tensor, entropy: Optional[Tensor], old: Tensor, adv: Tensor,
                             mask: Tensor, ref: Optional[Tensor], isw: Optional[Tensor], coef: Tensor,
                             clip_low: float, clip_high: float, dual_clip: Optional[float], kl_coef: float,
                             kl_kind: int, entropy_coef: float, surrogate: int, tau_pos: float,
                             tau_neg: float, want_dent: bool) -> tuple[Tensor, Tensor]:
    """coef (B,): the upstream gradient times each sequence's weight -> d(logprobs) (B, T) in its
    dtype, d(entropy) (B, T) in its dtype (or (0,) unless want_dent)."""
    B, T = logprobs.shape
    dlp = torch.empty((B, T), device=logprobs.device, dtype=logprobs.dtype)
    dent = torch.empty((B, T) if want_dent else (0,), device=logprobs.device,
                       dtype=logprobs.dtype if entropy is None else entropy.dtype)
    args = _kernel_args(logprobs, old, adv, mask, ref, entropy, isw, B, T)
    scalars, flags = _launch_opts(clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, surrogate,
                                  tau_pos, tau_neg, ref, isw)
    if B:
        _policy_loss_bwd_kernel[(B, max(1, triton.cdiv(T, BLOCK_T)))](
            *args["ptrs"], coef.contiguous(), dlp, dent if want_dent else dlp, T, *args["strides"], *scalars,
            **flags, HAS_ENT=entropy is not None, WANT_DENT=want_dent, BLOCK_T=BLOCK_T)
    return dlp, dent


@_policy_loss_backward_op.register_fake
def _(logprobs, entropy, old, adv, mask, ref, isw, coef, clip_low, clip_high, dual_clip, kl_coef, kl_kind,
      entropy_coef, surrogate, tau_pos, tau_neg, want_dent):
    dent_dtype = logprobs.dtype if entropy is None else entropy.dtype
    return logprobs.new_empty(logprobs.shape), logprobs.new_empty(logprobs.shape if want_dent else (0,),
                                                                  dtype=dent_dtype)


def _setup_context(ctx, inputs, output):
    logprobs, entropy, old, adv, mask, ref, isw, *scalars, loss_agg, max_len = inputs
    _, sums, w = output
    ctx.save_for_backward(logprobs, entropy, old, adv, mask, ref, isw, w)
    ctx.scalars = scalars
    ctx.mark_non_differentiable(sums, w)


def _backward(ctx, g_loss, _g_sums, _g_w):
    logprobs, entropy, old, adv, mask, ref, isw, w = ctx.saved_tensors
    want_dent = entropy is not None and ctx.needs_input_grad[1]
    dlp, dent = _policy_loss_backward_op(logprobs, entropy, old, adv, mask, ref, isw, w * g_loss,
                                         *ctx.scalars, want_dent)
    return (dlp, dent if want_dent else None) + (None,) * 16


_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel_args(logprobs, old, adv, mask, ref, entropy, isw, B, T):
    dummy = logprobs  # never read: its HAS_* flag is off
    tensors = (logprobs, old, adv, mask, ref, entropy, isw)
    ptrs = tuple(dummy if t is None else t for t in tensors)
    strides = sum((_strides(t, B, T) for t in tensors), ())
    return {"ptrs": ptrs, "strides": strides}


def _metrics(sums: torch.Tensor) -> dict:
    """sums (K, B) -> detached token-mean metrics over all kept tokens."""
    tot = sums.sum(dim=1)  # (K,)
    n = tot[1].clamp(min=1.0)
    return {"clipfrac": tot[2] / n, "ratio_mean": tot[3] / n, "approx_kl": tot[4] / n,
            "kl": tot[5] / n, "entropy": tot[6] / n}


# ----------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.2,
                dual_clip=None, ref_logprobs=None, kl_coef=0.0, kl_kind="k3", entropy=None,
                entropy_coef=0.0, is_weights=None, loss_agg="token-mean", max_len=None,
                surrogate="clip", ratio_level="token", sapo_tau_pos=1.0, sapo_tau_neg=1.05, impl=None):
    """Clipped policy-gradient loss of the PPO / GRPO family (module docstring: the math).

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy being trained
            (e.g. from `linear_logprob`); gets the gradient.
        old_logprobs: (B, T) log-probs under the policy that collected the batch.
        advantages: (B, T) per token, or (B,) per sequence (GRPO).
        mask: (B, T) bool / integer / floating; nonzero = the token counts.
        clip_low, clip_high: the clip range [1 - clip_low, 1 + clip_high] of the ratio.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -A * c; None = off.
        ref_logprobs, kl_coef, kl_kind: KL-in-loss to a reference policy (k1 | k2 | k3).
        entropy, entropy_coef: per-token entropy (e.g. from `linear_logprob(...,
            return_entropy=True)`) and its bonus weight; gets the gradient -entropy_coef.
        is_weights: (B, T) importance weights multiplying the surrogate (e.g. truncated
            exp(old_logprobs - sampler_logprobs)); treated as constants.
        loss_agg: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
            "seq-mean-token-sum-norm"; max_len: the Dr.GRPO normaliser (default T).
        surrogate: "clip" (PPO's clipped surrogate) | "cispo" (the clipped IS weight as a
            constant times logprobs; clip_low may be 1: no lower bound; no dual_clip) | "sapo"
            (a soft gate instead of the clip; the clip range only defines clipfrac; no dual_clip).
        sapo_tau_pos, sapo_tau_neg: SAPO's gate temperatures (> 0) for A > 0 and A <= 0 (the
            paper's and TRL's defaults 1.0, 1.05).
        ratio_level: "token" | "sequence" (GSPO-token: each sequence's exp(mean log-ratio)).

    Returns:
        (loss, metrics): loss a float32 scalar; metrics a dict of detached float32 scalars
        clipfrac, approx_kl, ratio_mean, kl, entropy. No host synchronisation.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    B, T = logprobs.shape
    if advantages.dim() == 1:
        if advantages.shape[0] != B:
            raise ValueError(f"advantages of shape ({advantages.shape[0]},) do not match B={B}")
        advantages = advantages.unsqueeze(1).expand(B, T)
    check_token_tensors({"logprobs": logprobs, "old_logprobs": old_logprobs,
                         "advantages": advantages, "ref_logprobs": ref_logprobs,
                         "entropy": entropy, "is_weights": is_weights}, B, T, mask)
    check_loss_agg(loss_agg, max_len)
    kind_id = kl_kind_id(kl_kind)
    if kl_coef and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if entropy_coef and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")
    check_finite(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                 entropy_coef=entropy_coef)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if surrogate not in SURROGATES:
        raise ValueError(f"unknown surrogate {surrogate!r}; expected one of {SURROGATES}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected one of {RATIO_LEVELS}")
    low_ok = clip_low <= 1.0 if surrogate == "cispo" else clip_low < 1.0
    if not (0.0 <= clip_low and low_ok and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 (<= 1 for cispo) and clip_high >= 0, got {clip_low}, {clip_high}")
    if surrogate != "clip" and dual_clip is not None:
        raise ValueError(f"dual_clip bounds the clipped surrogate; {surrogate} has none to bound (use dual_clip=None)")
    check_finite(sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg)
    if not (sapo_tau_pos > 0 and sapo_tau_neg > 0):
        raise ValueError(f"sapo_tau_pos and sapo_tau_neg must be > 0, got {sapo_tau_pos}, {sapo_tau_neg}")
    if ratio_level == "sequence":
        old_logprobs = sequence_old_logprobs(logprobs, old_logprobs, mask)

    if resolve_impl(impl, logprobs) == "torch":
        return policy_loss_ref(logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                               clip_high=clip_high, dual_clip=dual_clip, ref_logprobs=ref_logprobs,
                               kl_coef=kl_coef, kl_kind=kl_kind, entropy=entropy,
                               entropy_coef=entropy_coef, is_weights=is_weights,
                               loss_agg=loss_agg, max_len=max_len, surrogate=surrogate,
                               sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg)
    loss, sums, _ = _policy_loss_op(logprobs, entropy, old_logprobs.detach(), advantages.detach(), mask,
                                    None if ref_logprobs is None else ref_logprobs.detach(),
                                    None if is_weights is None else is_weights.detach(), float(clip_low),
                                    float(clip_high), None if dual_clip is None else float(dual_clip),
                                    float(kl_coef), kind_id, float(entropy_coef), SURROGATES.index(surrogate),
                                    float(sapo_tau_pos), float(sapo_tau_neg), loss_agg, max_len)
    return loss, _metrics(sums.detach())


def sequence_old_logprobs(logprobs, old_logprobs, mask) -> torch.Tensor:
    """old' = sg(logprobs) - log s per token, s = exp(masked mean of logprobs - old over each
    sequence): with it the per-token ratio exp(logprobs - old') is s in value and has the
    token's own gradient (GSPO-token). float32 (float64 from float64) (B, T); 0 where masked."""
    keep = mask != 0
    dt = torch.promote_types(logprobs.dtype, torch.float32)  # float32, or float64 for the reference
    lp = torch.where(keep, logprobs.detach().to(dt), 0.0)
    log_ratio = torch.where(keep, lp - old_logprobs.detach().to(dt), 0.0)
    log_s = log_ratio.sum(dim=1) / keep.sum(dim=1).clamp(min=1)  # (B,)
    return torch.where(keep, lp - log_s[:, None], 0.0)


def policy_loss_ref(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.2,
                    dual_clip=None, ref_logprobs=None, kl_coef=0.0, kl_kind="k3", entropy=None,
                    entropy_coef=0.0, is_weights=None, loss_agg="token-mean", max_len=None,
                    surrogate="clip", sapo_tau_pos=1.0, sapo_tau_neg=1.05):
    """Pure torch, autograd-differentiated (the CPU path; in float64, the test reference).
    advantages must already be (B, T) here (a stride-0 expand of (B,) is fine); a sequence-level
    ratio arrives as old_logprobs from sequence_old_logprobs."""
    B, T = logprobs.shape
    keep = mask != 0
    dt = torch.promote_types(logprobs.dtype, torch.float32)
    # zero masked positions of every input first: garbage there (NaN, inf) must not reach
    # the values, nor the gradient through torch.where's backward (0 * NaN = NaN)
    f = lambda t: None if t is None else torch.where(keep, t.to(dt), 0.0)  # noqa: E731
    lp, old, adv = f(logprobs), f(old_logprobs).detach(), f(advantages).detach()
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    clamped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg1 = -adv * ratio
    pg2 = -adv * clamped
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if surrogate == "cispo":
        pg = -adv * clamped.detach() * lp
        clipped = clamped != ratio
    if surrogate == "sapo":
        tau = torch.where(adv > 0, sapo_tau_pos, sapo_tau_neg).to(dt)
        pg = -adv * torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
        clipped = clamped != ratio
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if is_weights is not None:
        pg = pg * f(is_weights).detach()
    loss_tok = pg
    kl = torch.zeros_like(lp)
    if ref_logprobs is not None:
        kl = kl_penalty_ref(lp, f(ref_logprobs).detach(), kl_kind)
        loss_tok = loss_tok + kl_coef * kl
    ent = torch.zeros_like(lp) if entropy is None else f(entropy)
    if entropy is not None:
        loss_tok = loss_tok - entropy_coef * ent
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    km = keep.to(lp.dtype)
    counts = km.sum(dim=1)  # (B,)
    loss = (row_weights(counts.float(), loss_agg, max_len, T).to(lp.dtype)
            * torch.where(keep, loss_tok, zero).sum(dim=1)).sum()
    n = counts.sum().clamp(min=1.0)
    with torch.no_grad():
        masked_mean = lambda x: torch.where(keep, x, zero).sum() / n  # noqa: E731
        metrics = {"clipfrac": masked_mean(clipped.to(lp.dtype)), "ratio_mean": masked_mean(ratio),
                   "approx_kl": masked_mean(ratio - 1.0 - log_ratio), "kl": masked_mean(kl),
                   "entropy": masked_mean(ent)}
    out = torch.float64 if lp.dtype == torch.float64 else torch.float32
    return loss.to(out), {k: v.to(out) for k, v in metrics.items()}
