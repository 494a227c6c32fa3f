"""logprob_from_logits: per-token log-probs (and entropy) for callers that already have logits.

    logp[n] = z[n, label[n]] - logsumexp(z[n]),   z = logits / temperature
    ent[n]  = logsumexp(z[n]) - sum_j softmax(z[n])_j z[n, j]

The memory argument. The op is bandwidth-bound: the logits (N, V) are read once forward
(N*V*2 B in bf16) and the backward reads them once and writes d(logits) once in the logits'
dtype. Eager torch (`log_softmax(logits.float()).gather`) writes an fp32 (N, V) copy and an
fp32 (N, V) log-softmax in the forward, keeps the latter for autograd, and in the backward
writes fp32 and then bf16 gradients: about 5x the bytes and 2 extra fp32 (N, V) tensors.
  forward   grid (N / BLOCK_N,): each program streams its rows in (BLOCK_N, BLOCK_V) tiles
            with the online log-sum-exp; writes 2-4 floats per row.
  backward  grid (N / BLOCK_N, V / BLOCK_V): each program reads one tile, writes
            (g_lp*(onehot - p) + g_ent*p*(E[z] - z)) / T for it.
It stops scaling only at the memory bandwidth; rows are independent.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    INTERPRET,
    TileConfig,
    _cast,
    _init_stats,
    _online_update,
    _row_dlogits,
    check_float,
    check_labels,
    cat_stats,
    check_temperature,
    combine_splits,
    config_key,
    empty_f32,
    logprob_ref,
    resolve_impl,
    torch_dlogits,
    torch_stats,
)

# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _logprob_fwd_kernel(
    # pointers
    Z, LABELS, STATS,
    # shapes
    N, V,
    # strides
    stride_zn, stride_zv, stride_stat,
    # scalars
    inv_temp, ignore_index,
    # flags and tiles
    ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    row_ok = rows < N
    labels, m, s, t, zl = _init_stats(LABELS, rows, row_ok, ignore_index, BLOCK_N)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        z = tl.load(Z + rows[:, None] * stride_zn + cols[None, :] * stride_zv,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        m, s, t, zl, _, _ = _online_update(m, s, t, zl, z * inv_temp, cols, col_ok, labels, ENTROPY)
    tl.store(STATS + rows, m, mask=row_ok)
    tl.store(STATS + stride_stat + rows, s, mask=row_ok)
    if ENTROPY:
        tl.store(STATS + 2 * stride_stat + rows, t, mask=row_ok)
    tl.store(STATS + 3 * stride_stat + rows, zl, mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(
    # pointers
    Z, LABELS, LSE, EZ, G_LP, G_ENT, DZ,
    # shapes
    N, V,
    # strides
    stride_zn, stride_zv, stride_dn, stride_dv,
    # scalars
    inv_temp, ignore_index,
    # flags and tiles
    ENTROPY: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # (BLOCK_V,)
    row_ok = rows < N
    col_ok = cols < V
    tile_ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load(Z + rows[:, None] * stride_zn + cols[None, :] * stride_zv, mask=tile_ok,
                other=0.0).to(tl.float32) * inv_temp
    dz = _row_dlogits(z, cols, col_ok, LABELS, LSE, EZ, G_LP, G_ENT, rows, row_ok, ignore_index,
                      inv_temp, ENTROPY, BLOCK_N)
    tl.store(DZ + rows[:, None] * stride_dn + cols[None, :] * stride_dv,
             _cast(dz, DZ.dtype.element_ty, INTERPRET), mask=tile_ok)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------

# block_d, num_stages unused (no matmul); key from _common.config_key
ROW_CONFIGS = {
    "16bit": TileConfig(4, 2048, 0, 8, 1),
    "fp32": TileConfig(4, 1024, 0, 8, 1),
    "interpret": TileConfig(4, 64, 0, 1, 1),
}
BWD_CONFIGS = {
    "16bit": TileConfig(8, 1024, 0, 4, 1),
    "fp32": TileConfig(8, 512, 0, 4, 1),
    "interpret": TileConfig(4, 64, 0, 1, 1),
}


def _fwd_triton(z, labels, inv_temp, ignore_index, want_entropy):
    N, V = z.shape
    if N == 0:
        return cat_stats([], z, want_entropy)[:4]
    cfg = ROW_CONFIGS[config_key(z)]
    stats = torch.empty((4, 1, N), device=z.device, dtype=torch.float32)  # m, s, t, zl
    _logprob_fwd_kernel[(triton.cdiv(N, cfg.block_n),)](
        z, labels, stats,
        N, V,
        z.stride(0), z.stride(1), stats.stride(0),
        inv_temp, ignore_index,
        ENTROPY=want_entropy, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return combine_splits(*stats.unbind(0), labels != ignore_index, want_entropy)[:4]


def _bwd_triton(z, labels, lse, ez, g_lp, g_ent, inv_temp, ignore_index):
    N, V = z.shape
    cfg = BWD_CONFIGS[config_key(z)]
    dz = torch.empty((N, V), device=z.device, dtype=z.dtype)
    if N == 0:
        return dz
    entropy = g_ent is not None
    _logprob_bwd_kernel[(triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v))](
        z, labels, lse, ez if entropy else lse, g_lp, g_ent if entropy else g_lp, dz,
        N, V,
        z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        inv_temp, ignore_index,
        ENTROPY=entropy, INTERPRET=INTERPRET, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dz


TORCH_CHUNK_ELEMS = 1 << 22  # rows are upcast to fp32 this many elements at a time


def _torch_chunks(N: int, V: int):
    rows = max(1, TORCH_CHUNK_ELEMS // max(V, 1))
    return [slice(i, i + rows) for i in range(0, N, rows)]


def _fwd_torch(z, labels, inv_temp, ignore_index, want_entropy):
    valid = labels != ignore_index
    chunks = _torch_chunks(*z.shape)
    rows = chunks[0].stop - chunks[0].start if chunks else 0
    z_buf, e_buf = (torch.empty((rows, z.shape[1]), dtype=torch.float32, device=z.device) for _ in range(2))
    parts = []
    for sl in chunks:  # the two (chunk, V) fp32 buffers are reused by every chunk
        zc = z_buf[: len(range(*sl.indices(z.shape[0])))].copy_(z[sl]).mul_(inv_temp)  # in fp32
        parts.append(torch_stats(zc, labels[sl], valid[sl], want_entropy, work=e_buf[: zc.shape[0]]))
    return cat_stats(parts, z, want_entropy)[:4]


def _bwd_torch(z, labels, lse, ez, g_lp, g_ent, inv_temp, ignore_index):
    valid = labels != ignore_index
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)  # (N, V)
    chunks = _torch_chunks(*z.shape)
    rows = chunks[0].stop - chunks[0].start if chunks else 0
    z_buf, d_buf = (torch.empty((rows, z.shape[1]), dtype=torch.float32, device=z.device) for _ in range(2))
    for sl in chunks:
        n = len(range(*sl.indices(z.shape[0])))
        zc = z_buf[:n].copy_(z[sl]).mul_(inv_temp)
        dz[sl] = torch_dlogits(zc, labels[sl], valid[sl], lse[sl], None if ez is None else ez[sl], g_lp[sl],
                               None if g_ent is None else g_ent[sl], inv_temp, out=d_buf[:n])
    return dz


# ----------------------------------------------------------------------------------------
# torch.library custom ops (see linear_logprob.py): forward, backward, fake, autograd
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("fastrlhf::logprob_from_logits", mutates_args=())
def _logprob_from_logits_op(logits: Tensor, labels: Tensor, inv_temp: float, ignore_index: int,
                            return_entropy: bool, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits (N, V), labels (N,) -> logp (N,), entropy (N,) | (0,), lse (N,), E[z] (N,) | (0,), fp32."""
    fwd = _fwd_triton if impl == "triton" else _fwd_torch
    logp, entropy, lse, ez = fwd(logits, labels, inv_temp, ignore_index, return_entropy)
    if not return_entropy:
        entropy, ez = empty_f32(logits), empty_f32(logits)
    return logp, entropy, lse, ez


@_logprob_from_logits_op.register_fake
def _(logits, labels, inv_temp, ignore_index, return_entropy, impl):
    N, n_ent = logits.shape[0], logits.shape[0] if return_entropy else 0
    return empty_f32(logits, N), empty_f32(logits, n_ent), empty_f32(logits, N), empty_f32(logits, n_ent)


@torch.library.custom_op("fastrlhf::logprob_from_logits_backward", mutates_args=())
def _logprob_from_logits_backward_op(logits: Tensor, labels: Tensor, lse: Tensor, ez: Tensor, g_lp: Tensor,
                                     g_ent: Optional[Tensor], inv_temp: float, ignore_index: int,
                                     impl: str) -> Tensor:
    """-> d(logits) (N, V) in the logits' dtype."""
    bwd = _bwd_triton if impl == "triton" else _bwd_torch
    return bwd(logits, labels, lse, None if g_ent is None else ez, g_lp, g_ent, inv_temp, ignore_index)


@_logprob_from_logits_backward_op.register_fake
def _(logits, labels, lse, ez, g_lp, g_ent, inv_temp, ignore_index, impl):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, return_entropy, impl = inputs
    _, _, lse, ez = output
    ctx.save_for_backward(logits, labels, lse, ez)
    ctx.args = (inv_temp, ignore_index, impl)
    ctx.return_entropy = return_entropy
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, ez)


def _backward(ctx, g_lp, g_ent, _g_lse, _g_ez):
    logits, labels, lse, ez = ctx.saved_tensors
    if (g_lp is None and g_ent is None) or not ctx.needs_input_grad[0]:
        return (None,) * 6
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
    g_ent = g_ent.float().contiguous() if g_ent is not None and ctx.return_entropy else None
    dz = _logprob_from_logits_backward_op(logits, labels, lse, ez, g_lp, g_ent, *ctx.args)
    return dz, None, None, None, None, None


_logprob_from_logits_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------


def logprob_from_logits(logits, labels, *, temperature=1.0, ignore_index=-100,
                        return_entropy=False, impl=None, validate_labels=None):
    """Log-probabilities of `labels` under softmax(logits / temperature).

    Args:
        logits: (..., V) float32 / bfloat16 / float16.
        labels: (...) int64; positions equal to ignore_index give 0 and no gradient.
        temperature, return_entropy, impl, validate_labels: as in `linear_logprob`.

    Returns:
        logprobs (...) float32 [, entropy (...) float32], differentiable w.r.t. logits
        (the gradient has the logits' dtype). No fp32 copy of the logits is made.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must be (..., V), got shape {tuple(logits.shape)}")
    check_float(logits, "logits")
    if labels.device != logits.device:
        raise ValueError(f"labels on {labels.device} but logits on {logits.device}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"logits {tuple(logits.shape)}: the vocabulary (V) must be > 0")
    check_labels(labels, logits.shape[:-1], V, ignore_index, "logits' leading dims", validate_labels)
    check_temperature(temperature)
    impl = resolve_impl(impl, logits)
    lead = labels.shape
    logp, entropy, _, _ = _logprob_from_logits_op(logits.reshape(-1, V), labels.reshape(-1).contiguous(),
                                                  1.0 / float(temperature), int(ignore_index),
                                                  bool(return_entropy), impl)
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)


def logprob_from_logits_ref(logits, labels, *, temperature=1.0, ignore_index=-100,
                            return_entropy=False):
    """float64 reference (for tests)."""
    return logprob_ref(logits, labels, temperature, ignore_index, return_entropy)
