"""The rank-aware seam: which process this is. Everything that writes (metrics, samples,
checkpoints, final/) asks `is_main()`; world size 1 until FSDP2 + torchrun (then the default
process group answers)."""

from __future__ import annotations

import torch


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0
