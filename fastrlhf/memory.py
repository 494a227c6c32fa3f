"""Moving the training state off the accelerator while vLLM generates, and back.

One GPU holds both phases. During generation the trainer's state is dead weight: AdamW keeps
two fp32 moments per parameter (8 bytes / parameter: for a 7B model 56 GB), gradients are
already freed (zero_grad(set_to_none=True)), and the parameters themselves have been pushed to
vLLM. `offload` copies optimizer state (and optionally the parameters) into pinned host buffers
that are allocated once and reused every step (pinning is slow; copies from pinned memory run
at PCIe/NVLink-C2C speed and overlap with nothing else), then empties the CUDA cache so vLLM
can wake its KV cache into the space. `onload` copies them back before training.

On a CPU-only machine the state already lives in host memory: both calls keep their
bookkeeping and move nothing.
"""

from __future__ import annotations

import time

import torch


def tensor_bytes(tensors, device_type: str | None = None) -> int:
    """Total bytes of the tensors (only those on device_type when given)."""
    return sum(t.numel() * t.element_size() for t in tensors
               if device_type is None or t.device.type == device_type)


def training_state(model, optimizer):
    """Every tensor the trainer keeps between steps: parameters, gradients, optimizer state."""
    for p in model.parameters():
        yield p.data
        if p.grad is not None:
            yield p.grad
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class StateSwapper:
    """offload()/onload() of one model + optimizer; keeps the pinned buffers between steps."""

    def __init__(self, model, optimizer, device, *, offload_params: bool = False):
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        self.offload_params = offload_params
        # nothing to move where the state already lives in host memory (--fsdp_offload)
        self.active = self.device.type == "cuda" and next(model.parameters()).device.type == "cuda"
        self._host: dict[int, torch.Tensor] = {}  # id(tensor slot) -> pinned buffer

    def _to_host(self, key, t: torch.Tensor) -> torch.Tensor:
        buf = self._host.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._host[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        return buf.copy_(t, non_blocking=True)

    def _slots(self):
        """(key, getter, setter) for every tensor that moves."""
        for p in self.model.parameters():
            st = self.optimizer.state.get(p, {})
            for k in list(st):
                if isinstance(st[k], torch.Tensor) and st[k].dim() > 0:  # AdamW's step stays put
                    yield (id(p), k), (lambda st=st, k=k: st[k]), (lambda v, st=st, k=k: st.__setitem__(k, v))
            if self.offload_params:
                yield (id(p), "param"), (lambda p=p: p.data), (lambda v, p=p: setattr(p, "data", v))

    def offload(self) -> dict:
        """Training state to host memory; returns seconds and the bytes left on the device."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if self.active:
            for key, get, put in self._slots():
                put(self._to_host(key, get()))
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return {"memory/offload_s": time.perf_counter() - t0,
                "memory/train_state_device_mb_during_generate":
                    tensor_bytes(training_state(self.model, self.optimizer), "cuda") / 2**20}

    def onload(self) -> dict:
        """Training state back to the device."""
        t0 = time.perf_counter()
        if self.active:
            for _, get, put in self._slots():
                put(get().to(self.device, non_blocking=True))
            torch.cuda.synchronize()
        return {"memory/onload_s": time.perf_counter() - t0}

    def state_mb(self) -> float:
        """The training state's size on the training device (parameters, gradients, optimizer)."""
        return tensor_bytes(training_state(self.model, self.optimizer), self.device.type) / 2**20
