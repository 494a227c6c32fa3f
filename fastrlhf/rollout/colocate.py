"""Colocated: the one owner of the phase switch between training and generation on one device.

Every generation a trainer does, a training rollout or an evaluation, goes through
`with colocated.generating() as engine:`, which in this order
    1. moves the training state off the device (memory.StateSwapper.offload: AdamW moments, the
       parameters if asked; gradients freed; the CUDA cache emptied),
    2. wakes the engine's weights, pushes the policy's current weights into it in place (each
       parameter once, in the engine's dtype; a sharded model's gathered parameter by parameter;
       LoRA: each adapted weight merged, W + scale * B @ A, the trained modules untouched),
       wakes its KV cache,
    3. yields the engine for any number of generate() calls,
    4. puts the engine to sleep (its weights and KV cache released on CUDA) and brings the
       training state back,
and records seconds and memory per phase; `with Colocated(...) as colocated:` (or close())
releases the engine at the end. No other code wakes, pushes or sleeps an engine, so
an evaluation can no more wake the KV cache beside resident optimiser state than a rollout can.
"""

from __future__ import annotations

import contextlib
import time

from fastrlhf import models
from fastrlhf.rollout.base import Engine


class Colocated:
    def __init__(self, engine: Engine, model, swappers=()):
        self.engine, self.model, self.swappers = engine, model, list(swappers)
        self.metrics: dict = {}  # of the last generating() phase

    @property
    def name(self) -> str:
        return self.engine.name

    def close(self) -> None:
        """The end of the run's generation: the engine releases everything it holds."""
        self.engine.close()

    def __enter__(self) -> Colocated:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add(self, stats: dict) -> None:
        for k, v in stats.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    @contextlib.contextmanager
    def generating(self):
        self.metrics = {}
        for sw in self.swappers:
            self._add(sw.offload())
        try:
            t0 = time.perf_counter()
            self.engine.wake_up(["weights"])
            # a sharded model's parameters gathered one at a time as the engine takes them (never all at once)
            self.engine.update_weights(models.engine_weights(self.model))
            self.engine.wake_up(["kv_cache"])
            self.metrics["time/weight_sync_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            yield self.engine
            self.metrics["time/generate_s"] = time.perf_counter() - t0
        finally:
            self.engine.sleep()
            for sw in self.swappers:
                self._add(sw.onload())
