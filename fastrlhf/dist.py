"""The rank-aware seam: which process this is, and the few collectives the trainers need.

One process (`fastrlhf <cmd>`): world size 1, every function a no-op. Under torchrun
(`torchrun --nproc_per_node N -m fastrlhf <cmd>`, which sets RANK / WORLD_SIZE / LOCAL_RANK)
`setup` creates the default process group (gloo on CPU, NCCL on CUDA, each rank on its own
GPU) and the model is sharded with FSDP2 (models.shard). Everything that writes (metrics,
samples, checkpoints, final/) asks `is_main()`; the data of a step is split with `share`, and
sums over the global batch go through `all_reduce_sum`."""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return launched_size() > 1


def launched_size() -> int:
    """How many processes torchrun started (1 without it), known before setup."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device, host_collectives: bool = False) -> torch.device:
    """Under torchrun: the default process group (before anything else makes one: vLLM would
    make its own world of one) and this rank's device (cuda:LOCAL_RANK on CUDA). Else `device`.
    host_collectives (FSDP2's CPU offload: shards, gradients and their norm in host memory): on
    CUDA the group has a gloo backend beside NCCL for collectives on host tensors."""
    if not launched():
        return device
    dist = torch.distributed
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl" if host_collectives else "nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def teardown() -> None:
    """The end of a run on several processes: every rank waits for the others (whatever they
    still write is written). The group is not destroyed: destroying it, like the process exit's
    own destructors, aborts a gloo rank now and then; `python -m fastrlhf` leaves without them
    (os._exit). One process: nothing (the group an in-process vLLM makes for itself is vLLM's)."""
    if launched() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value: a sharded one (an FSDP2 DTensor: a parameter, a gradient norm)
    gathered from every rank (a collective: all ranks call it), any other as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def share(items: list, of_rank: int | None = None) -> list:
    """This rank's part of a global batch (round-robin: ranks differ by at most one item)."""
    r = rank() if of_rank is None else of_rank
    return items[r::world_size()]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (world size 1: t)."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def max_over_ranks(n: int) -> int:
    """The largest of a host integer over the ranks (so every rank runs as many collectives)."""
    if world_size() == 1:
        return n
    return int(max_over_ranks_tensor(torch.tensor([float(n)], device=_device()))[0])


def max_over_ranks_tensor(t: torch.Tensor) -> torch.Tensor:
    """The elementwise largest over the ranks, in place, on the tensor's device (no host sync)."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def _device() -> torch.device:
    """Where a tensor for a collective lives: the rank's GPU under NCCL, else the host."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Host numbers summed over the ranks (one collective; world size 1: the numbers)."""
    if world_size() == 1:
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=_device())).tolist()


def on_main(fn):
    """fn() in the main process only (what writes files: the base model, checkpoints set aside),
    its result given to every rank; an error there is raised on every rank."""
    if world_size() == 1:
        return fn()
    result = [None, None]
    if is_main():
        try:
            result = [fn(), None]
        except Exception as e:  # noqa: BLE001 - handed to every rank, raised there
            result = [None, e]
    torch.distributed.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise result[1]
    return result[0]


def gather_shares(local: torch.Tensor, total: int) -> torch.Tensor:
    """The global batch's values (total,) from every rank's share of it (local: this rank's,
    in dist.share's round-robin order), differentiable: every rank then computes the same loss
    of the whole batch, and the backward hands each rank the gradient of its own share (the ranks'
    sum, which FSDP's average over the ranks turns back into the one-process gradient)."""
    n = world_size()
    if n == 1:
        return local
    from torch.distributed.nn.functional import all_gather

    size = -(-total // n)
    padded = torch.cat([local, local.new_zeros(size - local.shape[0])])
    return torch.stack(all_gather(padded), dim=1).reshape(-1)[:total]  # [k * n + r] = rank r's k-th
