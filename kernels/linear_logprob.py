"""linear_logprob: per-token log-probabilities (and entropy) straight from hidden states.

    u       = logit_scale * (hidden @ weight.T + bias)              (N, V), never stored
    u       = softcap * tanh(u / softcap)                           when softcap is given
    logits  = u / temperature
    logp[n] = logits[n, label[n]] - logsumexp(logits[n])
    ent[n]  = logsumexp(logits[n]) - sum_j softmax(logits[n])_j * logits[n, j]

The output transforms are those real architectures apply after the lm_head matmul: an output
bias (Phi), a logit scale (Cohere's logit_scale; Granite's 1 / logits_scaling) and final-logit
softcapping (Gemma 2 / 3). They are applied to each tile in registers, so they cost no memory;
the backward chains through them: d u / d raw = logit_scale * (1 - (u / softcap)^2).

The memory argument. Eager torch materialises the logits: at N=16384 tokens, V=152064, bf16
that is N*V*2 B = 5.0 GB, and the fp32 log_softmax on top of it 10 GB more, and autograd
keeps them for the backward. Here:
  forward   one kernel, grid (N tiles, S vocab splits). Each program streams its vocab
            range in (BLOCK_N x BLOCK_V) logit tiles computed with tl.dot over H, and folds
            each tile into running (max, sum exp, sum exp*z, label logit). It writes 4*S*N
            floats. Reads: weight once per N tile (from L2), hidden once per vocab tile.
            FLOPs 2*N*H*V; no (N, V) tensor exists at any point.
  backward  processes the vocabulary in chunks of Vc columns (N*Vc <= 2^26 elements on GPU):
            (1) _dlogits kernel recomputes the (N, Vc) logit chunk tile by tile and writes
                d(logits) for that chunk only, (g_lp*(onehot - p) + g_ent*p*(E[z]-z)) / T;
            (2) d(weight)[chunk] = dlogits.T @ hidden, one GEMM over all N tokens with fp32
                accumulation in registers, stored once in the weight's dtype: no fp32 (V, H)
                buffer and no per-chunk (V, H) temporaries;
            (3) d(hidden) += dlogits @ weight[chunk], accumulated in an fp32 (N, H) buffer
                (written straight into d(hidden) when there is a single chunk or fp32 input).
            FLOPs 6*N*H*V (recompute + two GEMMs): 8*N*H*V for forward+backward, the cost
            of a composable op whose upstream gradient is only known in the backward.
            Extra memory: the (N, Vc) chunk (<= 128 MB in bf16) + the fp32 (N, H) buffer
            (268 MB at N=16k, H=4096) against eager's ~15 GB.
  where it stops scaling: the forward is a GEMM with a reduction epilogue; with few tokens
  (N < BLOCK_N * #SMs) the vocab splits keep the GPU busy, and below a few hundred tokens the
  op is bound by reading the weight (V*H*2 B, 1.25 GB at V=152064, H=4096) like any lm_head.

The torch path (impl="torch") is the same algorithm in chunks of tokens, so it too never
holds more than a (chunk, V) block of logits; it is the CPU path and the readable reference
of the algorithm. `linear_logprob_ref` is the float64 materialised version for tests.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    NO_STATS,
    STATS,
    TileConfig,
    _cast,
    _dot,
    _init_stats,
    _row_dlogits,
    _online_update,
    _stats_update,
    _tanh,
    check_float,
    check_labels,
    cat_stats,
    check_temperature,
    combine_splits,
    config_key,
    dot_precision,
    empty_f32,
    logprob_ref,
    no_autocast,
    resolve_impl,
    torch_dlogits,
    torch_stats,
)

# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(H, W, BIAS, rows, row_ok, cols, col_ok, D, stride_hn, stride_hd, stride_wv,
                 stride_wd, scale, softcap, inv_temp, HAS_BIAS: tl.constexpr,
                 SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """softcap(scale * (hidden[rows] @ weight[cols].T + bias[cols])) / T as an fp32
    (BLOCK_N, BLOCK_V) tile."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = H + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd  # (BLOCK_N, BLOCK_D)
    w_ptrs = W + cols[None, :] * stride_wv + offs_d[:, None] * stride_wd  # (BLOCK_D, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(h, w, acc, PRECISION, INTERPRET)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc * inv_temp


@triton.jit
def _linear_logprob_fwd_kernel(
    # pointers
    H, W, BIAS, LABELS, STATS,
    # shapes
    N, V, D, v_per_split,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_stat, stride_split,
    # scalars
    scale, softcap, inv_temp, ignore_index,
    # flags and tiles
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
    MEAN: tl.constexpr, SQ: tl.constexpr, TOP1: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    row_ok = rows < N
    labels, m, s, t, zl = _init_stats(LABELS, rows, row_ok, ignore_index, BLOCK_N)
    zsum, sq = t, t  # zeros; the optional statistics (MEAN, SQ, TOP1), see _stats_update
    mb = m  # -inf

    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # (BLOCK_V,)
        col_ok = cols < v_end
        z = _logits_tile(H, W, BIAS, rows, row_ok, cols, col_ok, D, stride_hn, stride_hd,
                         stride_wv, stride_wd, scale, softcap, inv_temp, HAS_BIAS, SOFTCAP,
                         PRECISION, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_D)
        m, s, t, zl, p, alpha = _online_update(m, s, t, zl, z, cols, col_ok, labels, ENTROPY)
        if MEAN or SQ or TOP1:
            zsum, sq, mb = _stats_update(zsum, sq, mb, z, p, alpha, cols, col_ok, labels, MEAN, SQ, TOP1)

    out = STATS + split * stride_split + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + stride_stat, s, mask=row_ok)
    if ENTROPY:
        tl.store(out + 2 * stride_stat, t, mask=row_ok)
    tl.store(out + 3 * stride_stat, zl, mask=row_ok)
    if MEAN:
        tl.store(out + 4 * stride_stat, zsum, mask=row_ok)
    if SQ:
        tl.store(out + 5 * stride_stat, sq, mask=row_ok)
    if TOP1:
        tl.store(out + 6 * stride_stat, mb, mask=row_ok)


@triton.jit
def _linear_logprob_dlogits_kernel(
    # pointers
    H, W, BIAS, LABELS, LSE, EZ, G_LP, G_ENT, DZ,
    # shapes
    N, Vc, D, v_offset,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_zn, stride_zv,
    # scalars
    scale, softcap, inv_temp, ignore_index,
    # flags and tiles
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    row_ok = rows < N
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # column within the chunk
    col_ok = local < Vc
    cols = v_offset + local  # column in the vocabulary
    z = _logits_tile(H, W, BIAS, rows, row_ok, cols, col_ok, D, stride_hn, stride_hd, stride_wv,
                     stride_wd, scale, softcap, inv_temp, HAS_BIAS, SOFTCAP, PRECISION, INTERPRET,
                     BLOCK_N, BLOCK_V, BLOCK_D)
    dz = _row_dlogits(z, cols, col_ok, LABELS, LSE, EZ, G_LP, G_ENT, rows, row_ok, ignore_index,
                      inv_temp, ENTROPY, BLOCK_N)  # d / d u (after the softcap, before 1 / T)
    if SOFTCAP:
        c = z / (inv_temp * softcap)  # tanh(scale * raw / softcap)
        dz = dz * (1.0 - c * c)
    dz = dz * scale  # d / d raw = hidden @ weight.T + bias
    z_ptrs = DZ + rows[:, None] * stride_zn + local[None, :] * stride_zv
    tl.store(z_ptrs, _cast(dz, DZ.dtype.element_ty, INTERPRET), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _matmul_kernel(
    # pointers (LABELS: read only with MASK_K)
    A, B, C, LABELS,
    # shapes: C (M, N) [+]= A (M, K) @ B (K, N)
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # scalars
    ignore_index,
    # flags and tiles
    ACCUMULATE: tl.constexpr, MASK_K: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The two backward GEMMs: fp32 accumulation, optional load-add-store into an fp32 C.
    MASK_K (d(weight) = d(logits).T @ hidden, K = tokens): B's rows of ignored tokens read as 0,
    so a NaN hidden state at an ignored position cannot reach d(weight) (its d(logits) is 0,
    and 0 * NaN = NaN)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share their B columns in L2
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok[:, None] & (rn < N)[None, :]
        if MASK_K:
            keep = tl.load(LABELS + k0 + rk, mask=k_ok, other=ignore_index) != ignore_index
            if B.dtype.element_ty == tl.float32:  # (a where on the fp32 tile spills registers on sm_90)
                b = tl.load(b_ptrs, mask=b_ok & keep[:, None], other=0.0)
            else:  # a where after the plain load keeps the 16-bit tile's async-copy pipeline (4 stages)
                b = tl.where(keep[:, None], tl.load(b_ptrs, mask=b_ok, other=0.0), 0.0)
        else:
            b = tl.load(b_ptrs, mask=b_ok, other=0.0)
        acc = _dot(a, b, acc, PRECISION, INTERPRET)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, _cast(acc, C.dtype.element_ty, INTERPRET), mask=c_mask)


# ----------------------------------------------------------------------------------------
# launch configurations (one table; the sm_90 compile test checks these at V=152064, H=4096)
# ----------------------------------------------------------------------------------------


# key: "16bit" | "fp32" | "interpret"
LOGITS_CONFIGS = {
    "16bit": TileConfig(128, 128, 64, 8, 3),
    "fp32": TileConfig(64, 128, 32, 8, 3),
    "interpret": TileConfig(16, 32, 16, 1, 1),  # small tiles so CPU tests cross every loop
}
# the forward with the optional STATS: in fp32 two pipeline stages, not three (with all three
# statistics and the entropy, three stages need 255 registers and spill on sm_90; two: 204, none)
LOGITS_STATS_CONFIGS = {**LOGITS_CONFIGS, "fp32": TileConfig(64, 128, 32, 8, 2)}
MATMUL_CONFIGS = {
    "16bit": TileConfig(128, 128, 64, 8, 4),
    "fp32": TileConfig(64, 128, 32, 8, 3),
    "interpret": TileConfig(16, 32, 16, 1, 1),
}
GROUP_M = 8
# Backward vocab chunk: N * Vc elements of d(logits) live at once.
CHUNK_ELEMS = {"gpu": 1 << 26, "interpret": 2048}
# SMs assumed by the interpreter when choosing vocab splits (so CPU tests cover S > 1).
_INTERPRET_SMS = 4


def _num_splits(device: torch.device, n_tiles: int, v_tiles: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else _INTERPRET_SMS
    return max(1, min(v_tiles, triton.cdiv(2 * sms, n_tiles)))


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool,
            labels: torch.Tensor | None = None, ignore_index: int = -100) -> None:
    """c[...] (+)= a @ b with fp32 accumulation; any strides. labels (K,): rows of b whose
    label is ignore_index read as 0."""
    M, K = a.shape
    N = b.shape[1]
    cfg = MATMUL_CONFIGS[config_key(a)]
    grid = (triton.cdiv(M, cfg.block_n) * triton.cdiv(N, cfg.block_v),)
    _matmul_kernel[grid](
        a, b, c, a if labels is None else labels,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ignore_index,
        ACCUMULATE=accumulate, MASK_K=labels is not None, PRECISION=dot_precision(a.dtype),
        INTERPRET=INTERPRET,
        BLOCK_M=cfg.block_n, BLOCK_N=cfg.block_v, BLOCK_K=cfg.block_d, GROUP_M=GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


class LogitTransform(NamedTuple):
    """What turns raw logits (hidden @ weight.T + bias) into the sampled distribution's logits:
    softcap * tanh(scale * raw / softcap) * inv_temp (no tanh when softcap is None)."""

    scale: float = 1.0
    softcap: float | None = None
    inv_temp: float = 1.0

    def kernel_args(self) -> dict:
        return dict(scale=self.scale, softcap=self.softcap or 1.0, inv_temp=self.inv_temp)


def _fwd_triton(h, w, bias, labels, xf: LogitTransform, ignore_index, want_entropy, want=NO_STATS):
    N, D = h.shape
    V = w.shape[0]
    if N == 0:
        return cat_stats([], h, want_entropy, want)
    cfg = (LOGITS_STATS_CONFIGS if any(want) else LOGITS_CONFIGS)[config_key(h)]
    n_tiles, v_tiles = triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v)
    v_per_split = triton.cdiv(v_tiles, _num_splits(h.device, n_tiles, v_tiles)) * cfg.block_v
    splits = triton.cdiv(V, v_per_split)
    # m, s, t, zl [, zsum, sq, mb]
    stats = torch.empty((7 if any(want) else 4, splits, N), device=h.device, dtype=torch.float32)
    _linear_logprob_fwd_kernel[(n_tiles, splits)](
        h, w, bias, labels, stats,
        N, V, D, v_per_split,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), stats.stride(0), stats.stride(1),
        **xf.kernel_args(), ignore_index=ignore_index,
        HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None, ENTROPY=want_entropy,
        MEAN=want[0], SQ=want[1], TOP1=want[2],
        PRECISION=dot_precision(h.dtype),
        INTERPRET=INTERPRET,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    m, s, t, zl, *extra = stats.unbind(0)
    return combine_splits(m, s, t, zl, labels != ignore_index, want_entropy, (*extra, V), want)


def _bwd_triton(h, w, bias, labels, lse, ez, g_lp, g_ent, xf: LogitTransform, ignore_index, needs):
    N, D = h.shape
    V = w.shape[0]
    need_dh, need_dw, need_db = needs
    if N == 0:  # no tokens: zero gradients of the right shapes
        return (torch.zeros_like(h) if need_dh else None, torch.zeros_like(w) if need_dw else None,
                torch.zeros(V, device=h.device, dtype=torch.float32) if need_db else None)
    key = config_key(h)
    cfg = LOGITS_CONFIGS[key]
    vc = max(cfg.block_v, CHUNK_ELEMS["interpret" if key == "interpret" else "gpu"] // max(N, 1))
    vc = min(vc // cfg.block_v * cfg.block_v, triton.cdiv(V, cfg.block_v) * cfg.block_v)
    n_chunks = triton.cdiv(V, vc)

    dz = torch.empty((N, vc), device=h.device, dtype=h.dtype)  # (N, Vc) d(logits) chunk
    direct = n_chunks == 1 or h.dtype == torch.float32
    dh = torch.empty((N, D), device=h.device, dtype=h.dtype if direct else torch.float32) \
        if need_dh else None
    dw = torch.empty(w.shape, device=w.device, dtype=w.dtype) if need_dw else None
    db = torch.empty(V, device=h.device, dtype=torch.float32) if need_db else None
    entropy = g_ent is not None
    for c in range(n_chunks):
        v0 = c * vc
        vlen = min(vc, V - v0)
        dz_c = dz[:, :vlen]  # (N, vlen)
        _linear_logprob_dlogits_kernel[(triton.cdiv(N, cfg.block_n), triton.cdiv(vlen, cfg.block_v))](
            h, w, bias, labels, lse, ez if entropy else lse, g_lp, g_ent if entropy else g_lp, dz_c,
            N, vlen, D, v0,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), dz_c.stride(0), dz_c.stride(1),
            **xf.kernel_args(), ignore_index=ignore_index,
            HAS_BIAS=bias is not None, SOFTCAP=xf.softcap is not None, ENTROPY=entropy,
            PRECISION=dot_precision(h.dtype),
            INTERPRET=INTERPRET,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if need_dw:
            _matmul(dz_c.t(), h, dw[v0:v0 + vlen], accumulate=False, labels=labels,
                    ignore_index=ignore_index)  # (vlen, D), K = N
        if need_dh:
            _matmul(dz_c, w[v0:v0 + vlen], dh, accumulate=c > 0)  # (N, D), K = vlen
        if need_db:
            db[v0:v0 + vlen] = dz_c.sum(dim=0, dtype=torch.float32)
    if dh is not None:
        dh = dh.to(h.dtype)
    return dh, dw, db


# ----------------------------------------------------------------------------------------
# torch path: chunks of tokens, at most (chunk, V) fp32 logits at a time
# ----------------------------------------------------------------------------------------

TORCH_CHUNK_ELEMS = 1 << 22  # 16 MB of fp32 logits per chunk


def _torch_rows(V: int) -> int:
    return max(1, TORCH_CHUNK_ELEMS // V)


def _torch_logits(h32, w32, b32, xf: LogitTransform, out):
    """The transformed, tempered logits of a chunk of tokens, written into out (n, V) fp32."""
    if b32 is None:
        torch.matmul(h32, w32.t(), out=out)
    else:
        torch.addmm(b32, h32, w32.t(), out=out)
    if xf.softcap is None:
        return out.mul_(xf.scale * xf.inv_temp)
    return out.mul_(xf.scale / xf.softcap).tanh_().mul_(xf.softcap * xf.inv_temp)


def _workspace(n: int, V: int, count: int, device) -> list[torch.Tensor]:
    """count (n, V) fp32 buffers allocated once per call and reused by every chunk: the peak is
    the working set whatever the allocator (a fresh (chunk, V) block per chunk let glibc's heap
    grow to ~1.3 GB at N=4096, V=65536 in a default process)."""
    return [torch.empty((n, V), dtype=torch.float32, device=device) for _ in range(count)]


def _fwd_torch(h, w, bias, labels, xf: LogitTransform, ignore_index, want_entropy, want=NO_STATS):
    N, V = h.shape[0], w.shape[0]
    w32, b32 = w.float(), None if bias is None else bias.float()
    valid = labels != ignore_index
    rows = min(_torch_rows(V), max(N, 1))
    z_buf, e_buf = _workspace(rows, V, 2, h.device)
    parts = []
    for i in range(0, N, rows):
        sl = slice(i, i + rows)
        n = len(range(*sl.indices(N)))
        z = _torch_logits(h[sl].float(), w32, b32, xf, z_buf[:n])
        parts.append(torch_stats(z, labels[sl], valid[sl], want_entropy, work=e_buf[:n], want=want))
    return cat_stats(parts, h, want_entropy, want)


def _bwd_torch(h, w, bias, labels, lse, ez, g_lp, g_ent, xf: LogitTransform, ignore_index, needs):
    N, D = h.shape
    V = w.shape[0]
    need_dh, need_dw, need_db = needs
    w32, b32 = w.float(), None if bias is None else bias.float()
    valid = labels != ignore_index
    dh = torch.empty((N, D), dtype=h.dtype, device=h.device) if need_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=h.device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if need_db else None
    rows = min(_torch_rows(V), max(N, 1))
    z_buf, dz_buf, *c_buf = _workspace(rows, V, 3 if xf.softcap is not None else 2, h.device)
    dh_buf = torch.empty((rows, D), dtype=torch.float32, device=h.device) if need_dh else None
    for i in range(0, N, rows):
        sl = slice(i, i + rows)
        n = len(range(*sl.indices(N)))
        h32 = torch.where(valid[sl, None], h[sl].float(), 0.0)  # a NaN at an ignored row stays out of d(weight)
        z = _torch_logits(h32, w32, b32, xf, z_buf[:n])
        chain = None
        if xf.softcap is not None:  # 1 - tanh^2, before torch_dlogits reuses z's memory
            chain = torch.mul(z, 1.0 / (xf.inv_temp * xf.softcap), out=c_buf[0][:n]).square_().neg_().add_(1.0)
        dz = torch_dlogits(z, labels[sl], valid[sl], lse[sl], None if ez is None else ez[sl], g_lp[sl],
                           None if g_ent is None else g_ent[sl], xf.inv_temp, out=dz_buf[:n])  # (n, V)
        if chain is not None:  # d / d u (after the softcap) -> d / d raw
            dz.mul_(chain)
        if xf.scale != 1.0:
            dz.mul_(xf.scale)
        if need_dh:
            dh[sl] = torch.matmul(dz, w32, out=dh_buf[:n])
        if need_dw:
            dw.addmm_(dz.t(), h32)
        if need_db:
            db += dz.sum(dim=0)
    return dh, None if dw is None else dw.to(w.dtype), db


# ----------------------------------------------------------------------------------------
# torch.library custom ops: forward, backward, fake (meta) implementations and autograd
# ----------------------------------------------------------------------------------------
# Registered ops are opaque to torch.compile / torch.export (no graph break, no tracing into
# the chunk loops) and dispatch like aten ops. Outputs are never None: an absent one is an empty
# (0,) tensor of the right dtype, as the schema needs.


@torch.library.custom_op("fastrlhf::linear_logprob", mutates_args=())
def _linear_logprob_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                       logit_scale: float, softcap: Optional[float], inv_temp: float, ignore_index: int,
                       return_entropy: bool, mean_logits: bool, log_sum_sq_probs: bool, is_top1: bool,
                       impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) ->
    logp (N,), entropy (N,) | (0,), lse (N,), E[z] (N,) | (0,), all fp32, then the STATS asked for:
    mean_logits (N,) | (0,), log_sum_sq_probs (N,) | (0,) fp32, is_top1 (N,) | (0,) bool."""
    xf = LogitTransform(logit_scale, softcap, inv_temp)
    fwd = _fwd_triton if impl == "triton" else _fwd_torch
    want = (mean_logits, log_sum_sq_probs, is_top1)
    with no_autocast(hidden):  # the torch path's fp32 matmuls stay fp32 under a caller's autocast
        logp, entropy, lse, ez, *stats = fwd(hidden, weight, bias, labels, xf, ignore_index, return_entropy, want)
    if not return_entropy:
        entropy, ez = empty_f32(hidden), empty_f32(hidden)
    mean, lss, top1 = stats
    mean = empty_f32(hidden) if mean is None else mean
    lss = empty_f32(hidden) if lss is None else lss
    top1 = hidden.new_empty(0, dtype=torch.bool) if top1 is None else top1
    return logp, entropy, lse, ez, mean, lss, top1


@_linear_logprob_op.register_fake
def _(hidden, weight, bias, labels, logit_scale, softcap, inv_temp, ignore_index, return_entropy, mean_logits,
      log_sum_sq_probs, is_top1, impl):
    N = hidden.shape[0]
    n_ent = N if return_entropy else 0
    return (empty_f32(hidden, N), empty_f32(hidden, n_ent), empty_f32(hidden, N), empty_f32(hidden, n_ent),
            empty_f32(hidden, N if mean_logits else 0), empty_f32(hidden, N if log_sum_sq_probs else 0),
            hidden.new_empty(N if is_top1 else 0, dtype=torch.bool))


@torch.library.custom_op("fastrlhf::linear_logprob_backward", mutates_args=())
def _linear_logprob_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                lse: Tensor, ez: Tensor, g_lp: Tensor, g_ent: Optional[Tensor],
                                logit_scale: float, softcap: Optional[float], inv_temp: float,
                                ignore_index: int, impl: str, need_dh: bool, need_dw: bool,
                                need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> d(hidden) (N, H), d(weight) (V, H), d(bias) (V,) in their inputs' dtypes; (0,) where not needed."""
    xf = LogitTransform(logit_scale, softcap, inv_temp)
    bwd = _bwd_triton if impl == "triton" else _bwd_torch
    with no_autocast(hidden):
        dh, dw, db = bwd(hidden, weight, bias, labels, lse, None if g_ent is None else ez, g_lp, g_ent, xf,
                         ignore_index, (need_dh, need_dw, need_db))
    return (hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw,
            hidden.new_empty(0) if db is None else db.to(bias.dtype))


@_linear_logprob_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, ez, g_lp, g_ent, logit_scale, softcap, inv_temp, ignore_index,
      impl, need_dh, need_dw, need_db):
    return (hidden.new_empty(hidden.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            hidden.new_empty(0) if not need_db else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, logit_scale, softcap, inv_temp, ignore_index, return_entropy, *_, impl = inputs
    _, _, lse, ez, *stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ez)
    ctx.args = (logit_scale, softcap, inv_temp, ignore_index, impl)
    ctx.return_entropy = return_entropy
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros, no work
    ctx.mark_non_differentiable(lse, ez, *stats)


def _backward(ctx, g_lp, g_ent, *_):
    hidden, weight, bias, labels, lse, ez = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    if (g_lp is None and g_ent is None) or not any(needs):
        return (None,) * 13
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
    g_ent = g_ent.float().contiguous() if g_ent is not None and ctx.return_entropy else None
    dh, dw, db = _linear_logprob_backward_op(hidden, weight, bias, labels, lse, ez, g_lp, g_ent, *ctx.args,
                                             *needs)
    return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None) + (None,) * 10


_linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------


def linear_logprob(hidden, weight, labels, *, bias=None, logit_scale=1.0, softcap=None,
                   temperature=1.0, ignore_index=-100, return_entropy=False, return_stats=(), impl=None,
                   validate_labels=None):
    """Log-probabilities of `labels` under softmax(z / temperature), with the raw logits
    r = hidden @ weight.T + bias and z = softcap * tanh(logit_scale * r / softcap)
    (z = logit_scale * r without softcap).

    Args:
        hidden: (..., H) float32 / bfloat16 / float16, e.g. the last hidden state (B, T, H).
        weight: (V, H), the lm_head weight, same dtype and device as hidden.
        labels: (...) int64, the token whose log-prob is wanted at each position;
            positions equal to ignore_index give 0 and no gradient.
        bias: optional (V,), e.g. Phi's lm_head bias.
        logit_scale: multiplies the raw logits (Cohere's logit_scale, Granite's
            1 / logits_scaling); a finite number != 0.
        softcap: final-logit softcapping cap > 0 (Gemma 2's final_logit_softcapping), or None.
        temperature: the sampling temperature (> 0); logits are divided by it.
        return_entropy: also return the entropy of the full distribution at each position.
        return_stats: names from STATS, statistics of the full distribution computed in the same
            pass, without gradient (0 / False at ignored positions): "mean_logits" (the mean of
            the tempered logits over the vocabulary), "log_sum_sq_probs" (log sum_j p_j^2, WPO's
            weight), "is_top1" (bool: the label is the most likely token, ties to the first).
        impl: "triton" | "torch" | None (triton on CUDA or under TRITON_INTERPRET=1, else torch;
            the environment variable FASTRLHF_KERNEL_IMPL overrides the default).
        validate_labels: check that every label is in [0, V) or ignore_index. None (default):
            in eager mode, skipped under torch.compile / torch.export and CUDA-graph capture
            (a CPU check reads the labels back; on CUDA it is an asynchronous device assert).

    Returns:
        logprobs (...) float32 [, entropy (...) float32] [, {name: (...) tensor} for
        return_stats]; differentiable w.r.t. hidden, weight and bias through the log-probs and
        the entropy. The (..., V) logits are never materialised. The op is
        the registered custom op torch.ops.fastrlhf.linear_logprob (with its backward op).
    """
    if not (math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite nonzero number, got {logit_scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be (..., H) and weight (V, H); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    check_float(hidden, "hidden")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    V, D = weight.shape
    if V == 0 or D == 0:
        raise ValueError(f"weight {tuple(weight.shape)}: the vocabulary (V) and hidden size (H) must be > 0")
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} has H="
                         f"{hidden.shape[-1]} but weight {tuple(weight.shape)} has H={D}")
    if bias is not None:
        check_float(bias, "bias")
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        tensors["bias"] = bias
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")
    check_labels(labels, hidden.shape[:-1], V, ignore_index, "hidden's leading dims", validate_labels)
    check_temperature(temperature)
    unknown = [name for name in return_stats if name not in STATS]
    if isinstance(return_stats, str) or unknown:
        raise ValueError(f"return_stats must be a tuple of names from {STATS}, got {return_stats!r}")
    impl = resolve_impl(impl, hidden)

    lead = labels.shape
    # labels and bias are read as contiguous vectors (an expanded or column-view labels tensor
    # was read with the wrong strides); hidden and weight go in with their own strides
    logp, entropy, _, _, *stats = _linear_logprob_op(
        hidden.reshape(-1, D), weight, None if bias is None else bias.contiguous(),
        labels.reshape(-1).contiguous(), float(logit_scale), None if softcap is None else float(softcap),
        1.0 / float(temperature), int(ignore_index), bool(return_entropy),
        *(name in return_stats for name in STATS), impl)
    out = (logp.view(lead),) + ((entropy.view(lead),) if return_entropy else ())
    if return_stats:
        out += ({name: stat.view(lead) for name, stat in zip(STATS, stats) if name in return_stats},)
    return out if len(out) > 1 else out[0]


def linear_logprob_ref(hidden, weight, labels, *, bias=None, logit_scale=1.0, softcap=None,
                       temperature=1.0, ignore_index=-100, return_entropy=False, return_stats=()):
    """float64, materialised-logits reference (for tests)."""
    logits = hidden.double() @ weight.double().t()  # (..., V)
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    out = logprob_ref(logits, labels, temperature, ignore_index, return_entropy)
    if not return_stats:
        return out
    z, valid = logits / temperature, labels != ignore_index
    p = torch.softmax(z, dim=-1)
    stats = {"mean_logits": torch.where(valid, z.mean(-1), 0.0),
             "log_sum_sq_probs": torch.where(valid, torch.log((p * p).sum(-1)), 0.0),
             "is_top1": valid & (z.argmax(-1) == labels)}
    return (*(out if return_entropy else (out,)), {k: stats[k] for k in return_stats})
