"""group_advantages: critic-free advantages from G samples of the same prompt.

rewards (B,) hold B / G consecutive groups of G samples each. Per group, with mean mu and
unbiased (Bessel) standard deviation sigma of its G rewards:
    baseline = mu                                   GRPO, Dr.GRPO
    baseline = (sum - r_i) / (G - 1)                leave_one_out: RLOO
    scale="std":  A_i = (r_i - baseline) / (sigma + 1e-6)     GRPO (TRL, verl)
    scale="none": A_i =  r_i - baseline                       Dr.GRPO, RLOO
A group whose rewards are all equal gets A = 0 (no learning signal), never a NaN.

The memory argument: one read of B rewards and one write of B advantages; eager torch does
view/mean/std/repeat_interleave/sub/div, ~8 launches over tiny tensors, which on a GPU costs
launch latency rather than bandwidth. Not differentiable: advantages are constants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import empty_f32, resolve_impl

SCALES = ("std", "none")
EPS = 1e-6


@triton.jit
def _group_advantages_kernel(
    R, OUT,
    n_groups, G,
    eps,
    SCALE_STD: tl.constexpr, LEAVE_ONE_OUT: tl.constexpr,
    GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)  # (GROUPS,) group index
    cols = tl.arange(0, BLOCK_G)  # (BLOCK_G,) sample within the group
    ok = (rows < n_groups)[:, None] & (cols < G)[None, :]
    offs = rows.to(tl.int64)[:, None] * G + cols[None, :]
    r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)  # (GROUPS, BLOCK_G)
    total = tl.sum(r, axis=1)
    mean = total / G
    if LEAVE_ONE_OUT:
        adv = r - (total[:, None] - r) / (G - 1)
    else:
        adv = r - mean[:, None]
    if SCALE_STD:
        diff = tl.where(ok, r - mean[:, None], 0.0)
        std = tl.sqrt(tl.sum(diff * diff, axis=1) / (G - 1))
        adv = adv / (std[:, None] + eps)
    tl.store(OUT + offs, adv, mask=ok)


@torch.library.custom_op("fastrlhf::group_advantages", mutates_args=())
def _group_advantages_op(rewards: Tensor, group_size: int, scale_std: bool, leave_one_out: bool) -> Tensor:
    """rewards (B,) contiguous -> advantages (B,) fp32 (constants: no autograd)."""
    B = rewards.shape[0]
    out = torch.empty(B, device=rewards.device, dtype=torch.float32)
    n_groups = B // group_size
    block_g = triton.next_power_of_2(group_size)
    groups = max(1, min(triton.next_power_of_2(max(n_groups, 1)), 4096 // block_g))
    if B:
        _group_advantages_kernel[(triton.cdiv(n_groups, groups),)](
            rewards, out, n_groups, group_size, EPS,
            SCALE_STD=scale_std, LEAVE_ONE_OUT=leave_one_out, GROUPS=groups, BLOCK_G=block_g)
    return out


@_group_advantages_op.register_fake
def _(rewards, group_size, scale_std, leave_one_out):
    return empty_f32(rewards, rewards.shape)


def group_advantages(rewards, group_size, *, scale="std", leave_one_out=False, impl=None):
    """rewards (B,) of B / group_size consecutive groups -> advantages (B,) float32."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,), got shape {tuple(rewards.shape)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {list(SCALES)}")
    B = rewards.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"rewards length {B} is not a multiple of group_size={group_size}")
    if group_size < 2 and (scale == "std" or leave_one_out):
        raise ValueError(f"group_size={group_size}: a standard deviation or leave-one-out "
                         "baseline needs at least 2 samples per group")
    if resolve_impl(impl, rewards) == "torch":
        return group_advantages_ref(rewards.float(), group_size, scale=scale,
                                    leave_one_out=leave_one_out)
    return _group_advantages_op(rewards.detach().contiguous(), group_size, scale == "std", leave_one_out)


def group_advantages_ref(rewards, group_size, *, scale="std", leave_one_out=False):
    """Pure torch (the CPU path; in float64, the test reference)."""
    r = rewards.view(-1, group_size)  # (B / G, G)
    mean = r.mean(dim=1, keepdim=True)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1) if leave_one_out else mean
    adv = r - baseline
    if scale == "std":
        adv = adv / (r.std(dim=1, keepdim=True) + EPS)
    return adv.reshape(-1)
