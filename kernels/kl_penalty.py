"""kl_penalty: per-token estimates of KL(pi || ref) from sampled tokens' log-probs.

With x = logprobs (policy) and y = ref_logprobs at tokens sampled from pi, and d = y - x:
    k1 = x - y                      unbiased, high variance, can be negative
    k2 = 0.5 * (x - y)^2            biased, low variance (its gradient is that of KL to 2nd order)
    k3 = exp(d) - d - 1             unbiased and always >= 0 (Schulman, "Approximating KL
                                    divergence", 2020): E_pi[exp(d)] = 1, so E[k3] = E[-d] = KL
Gradients (w.r.t. x; w.r.t. y it is the negative, all three depend on x - y only):
    dk1/dx = 1,   dk2/dx = x - y,   dk3/dx = 1 - exp(d)
k3 is exact here: no clamping of d (verl's "low_var_kl" clamps d to [-20, 20] and the
estimate to [-10, 10]; clamp the inputs yourself if you want that).

The memory argument: eager torch materialises d, exp(d) and the sum as three (N,) fp32
temporaries and their autograd graph; the kernel reads x and y once and writes the (N,)
result (and in the backward reads them again and writes both gradients): 3 passes of
memory instead of ~8. It is purely bandwidth-bound; in a real loss it is fused into
`policy_loss` (which calls the same `_kl_token` below) and costs nothing extra.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_float, resolve_impl

KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}


def kl_kind_id(kind: str) -> int:
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {list(KL_KINDS)}")
    return KL_KINDS[kind]


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _kl_token(x, y, KIND: tl.constexpr):
    """(k, dk/dx) for fp32 tiles x = logprobs, y = ref_logprobs."""
    if KIND == 1:
        k = x - y
        dk = tl.full(x.shape, 1.0, tl.float32)
    elif KIND == 2:
        k = 0.5 * (x - y) * (x - y)
        dk = x - y
    else:
        d = y - x
        e = tl.exp(d)
        k = e - d - 1.0
        dk = 1.0 - e
    return k, dk


@triton.jit
def _kl_fwd_kernel(X, Y, OUT, N, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
    k, _ = _kl_token(x, y, KIND)
    tl.store(OUT + offs, k, mask=ok)


@triton.jit
def _kl_bwd_kernel(X, Y, G, DX, DY, N, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    _, dk = _kl_token(x, y, KIND)
    tl.store(DX + offs, (g * dk).to(DX.dtype.element_ty), mask=ok)
    tl.store(DY + offs, (-g * dk).to(DY.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------
# launchers and torch.library custom ops (see linear_logprob.py)
# ----------------------------------------------------------------------------------------

BLOCK = 1024


@torch.library.custom_op("fastrlhf::kl_penalty", mutates_args=())
def _kl_penalty_op(x: Tensor, y: Tensor, kind_id: int) -> Tensor:
    """x, y (N,) contiguous -> (N,) fp32."""
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    N = x.numel()
    if N:
        _kl_fwd_kernel[(triton.cdiv(N, BLOCK),)](x, y, out, N, KIND=kind_id, BLOCK=BLOCK)
    return out


@_kl_penalty_op.register_fake
def _(x, y, kind_id):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("fastrlhf::kl_penalty_backward", mutates_args=())
def _kl_penalty_backward_op(x: Tensor, y: Tensor, g: Tensor, kind_id: int) -> tuple[Tensor, Tensor]:
    """-> d(x), d(y) (N,) in x's and y's dtypes."""
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    N = x.numel()
    if N:
        _kl_bwd_kernel[(triton.cdiv(N, BLOCK),)](x, y, g.contiguous(), dx, dy, N, KIND=kind_id, BLOCK=BLOCK)
    return dx, dy


@_kl_penalty_backward_op.register_fake
def _(x, y, g, kind_id):
    return x.new_empty(x.shape), y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    x, y, kind_id = inputs
    ctx.save_for_backward(x, y)
    ctx.kind_id = kind_id


def _backward(ctx, g):
    x, y = ctx.saved_tensors
    dx, dy = _kl_penalty_backward_op(x, y, g, ctx.kind_id)
    return dx, dy, None


_kl_penalty_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------


def kl_penalty(logprobs, ref_logprobs, kind="k3", *, impl=None):
    """Per-token KL(pi || ref) estimate; see the module docstring for k1 / k2 / k3.

    Args:
        logprobs, ref_logprobs: same shape (e.g. (B, T)), float32/bfloat16/float16.
        kind: "k1" | "k2" | "k3".
    Returns:
        float32 tensor of that shape, differentiable w.r.t. both inputs. Masking is the
        caller's (or `policy_loss`'s) business.
    """
    kind_id = kl_kind_id(kind)
    check_float(logprobs, "logprobs")
    check_float(ref_logprobs, "ref_logprobs")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} must have the same shape")
    if logprobs.device != ref_logprobs.device:
        raise ValueError(f"logprobs on {logprobs.device} but ref_logprobs on {ref_logprobs.device}")
    if resolve_impl(impl, logprobs) == "torch":
        return kl_penalty_ref(logprobs.float(), ref_logprobs.float(), kind)
    out = _kl_penalty_op(logprobs.reshape(-1).contiguous(), ref_logprobs.reshape(-1).contiguous(), kind_id)
    return out.view(logprobs.shape)


def kl_penalty_ref(logprobs, ref_logprobs, kind="k3"):
    """Pure torch (the CPU path; in float64, the test reference)."""
    kl_kind_id(kind)
    x, y = logprobs, ref_logprobs
    if kind == "k1":
        return x - y
    if kind == "k2":
        return 0.5 * (x - y) ** 2
    d = y - x
    return torch.exp(d) - d - 1.0
