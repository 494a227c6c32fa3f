"""gae: generalised advantage estimation as a reverse scan per sequence.

For each sequence, walking t = T-1 .. 0 (as verl's `compute_gae_advantage_return`), with
mask m (nonzero = a response token; right padding and masked observation tokens alike):
    nv_t    = the value of the next response token after t (0 past the end)
    delta_t = r_t + gamma * nv_t - V_t
    L_t     = delta_t + gamma * lam * L_{t+1}   on response tokens; L_t = L_{t+1} elsewhere
    advantages_t = L_t,  returns_t = L_t + V_t on response tokens; both 0 elsewhere.
No whitening here (PPO whitens advantages over the batch itself).

Both recurrences are linear, x_t = a_t * x_{t+1} + b_t, so a tile of BLOCK_T steps is one
`tl.associative_scan` (parallel, log-depth) instead of BLOCK_T dependent steps; tiles run
right to left and hand over the state at their first element. The next-valid value nv is the
same scan on inputs shifted by one (a = 1 - m_{t+1}, b = m_{t+1} V_{t+1}), loaded from memory.
The memory argument: one read of rewards, values and mask (plus the shifted re-read, from
cache) and one write of each output. verl's loop launches ~10 kernels per time step.
Not differentiable: advantages and returns are targets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import empty_f32, resolve_impl


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # compose two steps of x = a * x_next + b (the order tl.associative_scan uses with reverse=True)
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _gae_kernel(
    REW, VAL, MASK, ADV, RET,
    T,
    s_r_b, s_r_t, s_v_b, s_v_t, s_m_b, s_m_t,
    gamma, lam,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_T)
    nv_carry = tl.zeros((), tl.float32)  # nv at the first element of the tile to the right
    l_carry = tl.zeros((), tl.float32)  # L at the first element of the tile to the right
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(n_tiles):
        t = ((n_tiles - 1 - i) * BLOCK_T + idx).to(tl.int64)
        ok = t < T
        r = tl.load(REW + b * s_r_b + t * s_r_t, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(VAL + b * s_v_b + t * s_v_t, mask=ok, other=0.0).to(tl.float32)
        m = (tl.load(MASK + b * s_m_b + t * s_m_t, mask=ok, other=0) != 0).to(tl.float32)
        ok1 = (t + 1) < T
        v1 = tl.load(VAL + b * s_v_b + (t + 1) * s_v_t, mask=ok1, other=0.0).to(tl.float32)
        m1 = (tl.load(MASK + b * s_m_b + (t + 1) * s_m_t, mask=ok1, other=0) != 0).to(tl.float32)
        # nv_t = (1 - m_{t+1}) nv_{t+1} + m_{t+1} V_{t+1}   (tl.where, not m * x: a NaN value or
        # reward at a masked position must not reach the kept ones, and 0 * NaN = NaN)
        a_nv, b_nv = tl.associative_scan((1.0 - m1, tl.where(m1 != 0.0, v1, 0.0)), 0, _linear_combine,
                                         reverse=True)
        nv = a_nv * nv_carry + b_nv
        delta = r + gamma * nv - v
        # L_t = (m_t gamma lam + 1 - m_t) L_{t+1} + m_t delta_t
        a_l, b_l = tl.associative_scan((m * (gamma * lam) + (1.0 - m), tl.where(m != 0.0, delta, 0.0)), 0,
                                       _linear_combine, reverse=True)
        gl = a_l * l_carry + b_l
        keep = m != 0.0
        tl.store(ADV + b * T + t, tl.where(keep, gl, 0.0), mask=ok)
        tl.store(RET + b * T + t, tl.where(keep, gl + v, 0.0), mask=ok)
        nv_carry = tl.sum(tl.where(idx == 0, nv, 0.0), axis=0)
        l_carry = tl.sum(tl.where(idx == 0, gl, 0.0), axis=0)


BLOCK_T = 1024


@torch.library.custom_op("fastrlhf::gae", mutates_args=())
def _gae_op(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(B, T) each -> advantages, returns (B, T) fp32 (constants: no autograd)."""
    B, T = rewards.shape
    adv = torch.empty((B, T), device=rewards.device, dtype=torch.float32)
    ret = torch.empty((B, T), device=rewards.device, dtype=torch.float32)
    if B and T:
        _gae_kernel[(B,)](rewards, values, mask, adv, ret, T, *rewards.stride(), *values.stride(),
                          *mask.stride(), gamma, lam, BLOCK_T=min(BLOCK_T, triton.next_power_of_2(T)))
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam):
    return empty_f32(rewards, rewards.shape), empty_f32(rewards, rewards.shape)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, impl=None):
    """rewards, values, mask (B, T) -> (advantages, returns), each (B, T) float32."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, T), got shape {tuple(rewards.shape)}")
    for name, t in (("values", values), ("mask", mask)):
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must have shape {tuple(rewards.shape)} like rewards, "
                             f"got {tuple(t.shape)}")
    if not rewards.is_floating_point() or not values.is_floating_point():
        raise ValueError(f"rewards and values must be floating, got {rewards.dtype}, {values.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or floating, got {mask.dtype}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
    if resolve_impl(impl, rewards) == "torch":
        return gae_ref(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    return _gae_op(rewards.detach(), values.detach(), mask, float(gamma), float(lam))


def gae_ref(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """The sequential loop, vectorised over the batch (the CPU path; float64: the reference)."""
    B, T = rewards.shape
    keep = mask != 0
    # masked positions hold anything (NaN included): zero them first, so 0 * NaN never happens
    rewards, values = torch.where(keep, rewards, 0.0), torch.where(keep, values, 0.0)
    m = keep.to(rewards.dtype)
    nv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    last = torch.zeros_like(nv)
    adv = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * nv - values[:, t]
        cur = delta + gamma * lam * last
        adv[:, t] = cur * m[:, t]
        nv = values[:, t] * m[:, t] + (1 - m[:, t]) * nv
        last = cur * m[:, t] + (1 - m[:, t]) * last
    return adv, (adv + values) * m
