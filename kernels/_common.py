"""Pieces shared by the log-prob ops: backend choice, input checks, and the softmax-tile math.

Shape glossary (used in every file of this package):
    B batch, T sequence, N tokens (= B*T flattened), H hidden, V vocab, G group size,
    S vocabulary splits of the forward pass.

The log-prob math, for one token with (tempered) logits z over V classes and label y:
    lse     = log sum_j exp(z_j)
    logp    = z_y - lse
    entropy = lse - E_p[z],                     E_p[z] = sum_j p_j z_j
    d logp    / d z_j = onehot_j - p_j
    d entropy / d z_j = p_j * (E_p[z] - z_j)
Both the Triton kernels (tile by tile, `_online_update` / `_row_dlogits`) and the torch
path (chunk by chunk, `torch_stats` / `torch_dlogits`) implement exactly these lines.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is compiled or interpreted, so the
# environment variable must be set before fastrlhf.kernels is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_IMPLS = ("triton", "torch")

# Optional per-token statistics of the full distribution the log-prob ops compute in the same
# pass (none has a gradient): the mean tempered logit over the vocabulary, log sum_j p_j^2
# (WPO's weights) and whether the label is the most likely token (the first argmax).
STATS = ("mean_logits", "log_sum_sq_probs", "is_top1")
NO_STATS = (False, False, False)


def resolve_impl(impl: str | None, tensor: torch.Tensor) -> str:
    """The explicit backend switch: argument > FASTRLHF_KERNEL_IMPL > device default."""
    impl = impl or os.environ.get("FASTRLHF_KERNEL_IMPL") or None
    if impl is None:
        return "triton" if (tensor.is_cuda or INTERPRET) else "torch"
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    if impl == "triton" and not tensor.is_cuda and not INTERPRET:
        raise ValueError(
            "impl='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing fastrlhf.kernels, or use impl='torch'"
        )
    return impl


def no_autocast(t: torch.Tensor):
    """A context with autocast off on t's device: inside an op, the dtypes are the op's choice
    (under a caller's bf16 autocast, torch's matmuls of fp32 tensors would run in bf16)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def on_host(t: torch.Tensor) -> bool:
    """Whether t lives in host memory, where reading a value back costs no device sync."""
    return t.device.type == "cpu"


def tracing() -> bool:
    """Whether the op is being traced (torch.compile, torch.export) or captured in a CUDA graph:
    then a check that reads a value back (a host sync, a graph break) is skipped."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_labels(labels: torch.Tensor, lead_shape: torch.Size, vocab: int, ignore_index: int,
                 what: str, validate: bool | None = None) -> None:
    """labels must be int64 of shape lead_shape; with validate (None: unless tracing), every
    non-ignored value in [0, V)."""
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {what} {tuple(lead_shape)}")
    if validate is False or (validate is None and tracing()):
        return
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if not labels.numel():
        return
    if not on_host(labels):  # no host sync on an accelerator: a device-side assert (fails the next sync)
        torch._assert_async(~bad.any(), f"labels out of range [0, {vocab}) (ignore_index={ignore_index})")
        return
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels out of range [0, {vocab}) at index {first}: {int(labels[first])} "
            f"(ignore_index={ignore_index})"
        )


def empty_f32(like: torch.Tensor, n: int | tuple = 0) -> torch.Tensor:
    """A fresh float32 tensor of length (or shape) n on like's device: a fake implementation's
    output, or a custom op's (0,) stand-in for an absent one."""
    return like.new_empty(n, dtype=torch.float32)


def check_finite(**scalars) -> None:
    """Every scalar setting a finite number: a NaN coefficient would silently poison a loss."""
    for name, v in scalars.items():
        if v is not None and not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # tokens (rows) per tile
    block_v: int  # vocab columns per tile
    block_d: int  # hidden slice per tl.dot (0 where there is no matmul)
    num_warps: int
    num_stages: int


def config_key(t: torch.Tensor) -> str:
    """Which row of a launch-configuration table applies: "16bit" | "fp32" | "interpret"."""
    if not t.is_cuda:
        return "interpret"
    return "fp32" if t.dtype == torch.float32 else "16bit"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls follow torch's own switch: TF32 only when the user allowed it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------
# Triton tile math
# ----------------------------------------------------------------------------------------


# Two bugs of Triton 3.9's interpreter with bfloat16, worked around only when INTERPRET is
# set (a constexpr: the compiled GPU code is the plain tl.dot / .to()):
#   - tl.dot on bf16 tiles returns garbage (errors ~1e10 on a 16x16 product; fp16 is right).
#     Upcasting to fp32 first is exact: a bf16*bf16 product fits in fp32, as in the GPU MMA.
#   - fp32 -> bf16 casts truncate (and its "rtne" mode has no carry), which biases sums of
#     many rounded values. We round to nearest even on the bits instead, as the GPU does.


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) -> dtype, rounding to nearest even."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tanh(x):
    """tanh from one exp, stable at any |x| (no overflow: exp of a non-positive number)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _init_stats(LABELS, rows, row_ok, ignore_index, BLOCK_N: tl.constexpr):
    """Labels of the rows and empty running statistics (m, s, t, zl) for `_online_update`."""
    labels = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    return labels, m, zero, zero, zero


@triton.jit
def _online_update(m, s, t, zl, z, cols, col_ok, labels, ENTROPY: tl.constexpr):
    """Fold one logit tile z (BLOCK_N, BLOCK_V) fp32 into the running row statistics.

    m  running max, s = sum exp(z - m), t = sum exp(z - m) * z (for the entropy),
    zl the label's logit (0 until its tile is seen). Invalid columns must not count.
    """
    z = tl.where(col_ok[None, :], z, 0.0)  # finite everywhere
    z_max = tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1)
    m_new = tl.maximum(m, z_max)
    alpha = tl.exp(m - m_new)
    p = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)  # (BLOCK_N, BLOCK_V)
    s = s * alpha + tl.sum(p, axis=1)
    if ENTROPY:
        t = t * alpha + tl.sum(p * z, axis=1)
    is_label = (cols[None, :] == labels[:, None]) & col_ok[None, :]
    zl += tl.sum(tl.where(is_label, z, 0.0), axis=1)
    return m_new, s, t, zl, p, alpha


@triton.jit
def _stats_update(zsum, sq, mb, z, p, alpha, cols, col_ok, labels,
                  MEAN: tl.constexpr, SQ: tl.constexpr, TOP1: tl.constexpr):
    """Fold the same tile into the optional statistics (`STATS`), with `_online_update`'s
    p = exp(z - m_new) and alpha = exp(m_old - m_new):
    zsum = sum_j z_j (mean logit), sq = sum_j exp(2 (z_j - m)) (log sum p^2),
    mb = max of z over the columns before the label (the label is the first argmax iff
    z_label >= max z and z_label > mb, torch.argmax's tie rule)."""
    if MEAN:
        zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    if SQ:
        sq = sq * alpha * alpha + tl.sum(p * p, axis=1)
    if TOP1:
        before = (cols[None, :] < labels[:, None]) & col_ok[None, :]
        mb = tl.maximum(mb, tl.max(tl.where(before, z, float("-inf")), axis=1))
    return zsum, sq, mb


@triton.jit
def _row_dlogits(z, cols, col_ok, LABELS, LSE, EZ, G_LP, G_ENT, rows, row_ok, ignore_index,
                 inv_temp, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr):
    """d(loss)/d(raw logits) for a tile of tempered logits z (BLOCK_N, BLOCK_V):
    (g_lp*(onehot - p) [+ g_ent*p*(E[z] - z)]) / T, exactly 0 on ignored rows and invalid columns.
    Loads the per-row labels, lse, E[z] and upstream gradients itself."""
    labels = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(G_LP + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    dz = g_lp[:, None] * (onehot - p)
    if ENTROPY:
        ez = tl.load(EZ + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(G_ENT + rows, mask=row_ok, other=0.0)
        dz += g_ent[:, None] * p * (ez[:, None] - z)
    keep = (row_ok & (labels != ignore_index))[:, None] & col_ok[None, :]
    return tl.where(keep, dz * inv_temp, 0.0)


def combine_splits(m, s, t, zl, valid, want_entropy, extra=None, want=NO_STATS):
    """Merge per-split statistics (S, N) into logp, entropy, lse, E[z] (N,), all fp32, and the
    `STATS` asked for in want from extra = (zsum, sq, mb) (S, N) and the vocabulary size:
    mean_logits, log_sum_sq_probs (fp32), is_top1 (bool); None where not asked for.

    This is the log-sum-exp of log-sum-exps; it costs O(S*N) and is exact.
    """
    mx = m.max(dim=0).values  # (N,)
    w = torch.exp(m - mx)  # (S, N); 0 for empty splits
    s_tot = (s * w).sum(dim=0)
    lse = mx + torch.log(s_tot)
    z_label = zl.sum(dim=0)  # 0 in every split but the label's
    logp = torch.where(valid, z_label - lse, 0.0)
    entropy = ez = None
    if want_entropy:
        ez = (t * w).sum(dim=0) / s_tot
        entropy = torch.where(valid, lse - ez, 0.0)
    mean = lss = top1 = None
    if any(want):
        zsum, sq, mb, vocab = extra
        if want[0]:
            mean = torch.where(valid, zsum.sum(dim=0) / vocab, 0.0)
        if want[1]:  # sum_j p_j^2 = sum exp(2 (z - mx)) / (sum exp(z - mx))^2
            lss = torch.where(valid, torch.log((sq * w * w).sum(dim=0)) - 2 * torch.log(s_tot), 0.0)
        if want[2]:
            top1 = valid & (z_label >= mx) & (z_label > mb.max(dim=0).values)
    return logp, entropy, lse, ez, mean, lss, top1


# ----------------------------------------------------------------------------------------
# torch path: the same math on a (chunk, V) fp32 block
# ----------------------------------------------------------------------------------------


def torch_stats(z: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, want_entropy: bool,
                work: torch.Tensor | None = None, want=NO_STATS):
    """z (n, V) fp32 tempered logits -> logp, entropy | None, lse, E[z] | None, and the `STATS`
    asked for in want (else None): mean_logits, log_sum_sq_probs, is_top1, each (n,).
    work: an (n, V) fp32 scratch buffer to reuse (else one is allocated)."""
    zl = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # as the kernel does: shift by the max, normalise E[z] by the sum actually accumulated
    m = z.amax(dim=-1, keepdim=True)  # (n, 1)
    e = torch.sub(z, m, out=work).exp_() if work is not None else torch.sub(z, m).exp_()  # (n, V)
    s = e.sum(dim=-1)
    lse = m.squeeze(-1) + torch.log(s)
    mean = lss = top1 = None
    if want[0]:
        mean = torch.where(valid, z.sum(dim=-1) / z.shape[-1], 0.0)
    if want[1]:  # before e is overwritten; the norm needs no (n, V) temporary
        lss = torch.where(valid, 2 * (torch.log(torch.linalg.vector_norm(e, dim=-1)) - torch.log(s)), 0.0)
    if want[2]:
        top1 = valid & (z.argmax(dim=-1) == labels)  # the first maximum, as the kernel decides ties
    entropy = ez = None
    if want_entropy:
        ez = e.mul_(z).sum(dim=-1) / s
        entropy = torch.where(valid, lse - ez, 0.0)
    return torch.where(valid, zl - lse, 0.0), entropy, lse, ez, mean, lss, top1


def torch_dlogits(z, labels, valid, lse, ez, g_lp, g_ent, inv_temp, out: torch.Tensor | None = None):
    """Gradient w.r.t. the raw logits of a (n, V) fp32 chunk; rows that are not valid get 0.
    out: an (n, V) fp32 buffer to write it into. z is overwritten when g_ent is given and out is
    (no further (n, V) temporary)."""
    dz = torch.sub(z, lse.unsqueeze(-1), out=out) if out is not None else torch.sub(z, lse.unsqueeze(-1))
    dz.exp_()  # (n, V) p, then d(logits) in place
    if g_ent is None:
        dz.mul_(-g_lp.unsqueeze(-1))
    else:
        t = z.neg_() if out is not None else z.neg()  # (E[z] - z) g_ent - g_lp, in z's memory
        dz.mul_(t.add_(ez.unsqueeze(-1)).mul_(g_ent.unsqueeze(-1)).sub_(g_lp.unsqueeze(-1)))
    dz.scatter_add_(-1, labels.clamp(min=0).unsqueeze(-1), g_lp.unsqueeze(-1))
    dz.mul_(inv_temp)
    return dz.masked_fill_(~valid.unsqueeze(-1), 0.0)


def cat_stats(parts, like: torch.Tensor, want_entropy: bool, want=NO_STATS):
    """Concatenate per-chunk `torch_stats` tuples; empty inputs give empty outputs."""
    if not parts:  # distinct tensors: a custom op's outputs may not alias each other
        logp, lse = empty_f32(like), empty_f32(like)
        entropy, ez = (empty_f32(like), empty_f32(like)) if want_entropy else (None, None)
        mean, lss = (empty_f32(like) if w else None for w in want[:2])
        top1 = like.new_empty(0, dtype=torch.bool) if want[2] else None
        return logp, entropy, lse, ez, mean, lss, top1
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def logprob_ref(logits, labels, temperature, ignore_index, return_entropy):
    """float64 materialised log-softmax reference shared by both ops' `*_ref` (for tests)."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)  # (..., V)
    valid = labels != ignore_index
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
