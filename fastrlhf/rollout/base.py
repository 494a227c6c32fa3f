"""What every rollout engine is: the Engine protocol, the Sample it returns, its error.

    engine.generate(prompt_ids, n=G, temperature=1.0, max_tokens=L, seed=s, top_p=1.0, indices=None)
        -> [[Sample] * G] * P, each with the sampler's own log-probs after temperature; prompt i
        sampled with a seed from (s, indices[i] or i): a rank's share of a global batch (torchrun)
        samples what one process sampling the whole batch would
    engine.update_weights(named_tensors)   the policy's current weights, pushed in place
    engine.sleep() / engine.wake_up(tags)  hand accelerator memory to training and back (tags:
                                           "weights", "kv_cache"; None: both)
    engine.close()                         release everything it holds (the run's end)
    engine.name                            "vllm" | "hf" (logged as rollout/engine)

The HF engine (hf.py) and in-process vLLM (vllm.py) implement it; another engine (SGLang) would
implement these six members and nothing else. Who calls them, and in which order around the
training state, is rollout.colocate.Colocated's business alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int  # index into the prompts passed to generate
    prompt_ids: list[int]
    completion_ids: list[int]  # the sampled tokens, EOS included when the sample stopped
    logprobs: list[float]  # the sampler's log-prob of each completion token (after temperature)
    finish_reason: str  # "stop" (EOS) or "length" (hit max_tokens: overlong)
    reward: float = 0.0
    info: dict = field(default_factory=dict)


class EngineError(RuntimeError):
    """The generation engine could not start or run; the message says which setting to change."""


class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                 seed: int, top_p: float = 1.0, indices: list[int] | None = None) -> list[list[Sample]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...

    def close(self) -> None: ...
