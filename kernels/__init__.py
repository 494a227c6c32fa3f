"""fastrlhf.kernels: fused Triton ops for RLHF losses. Needs only torch and triton.

Every op runs its Triton kernel on CUDA; on CPU it runs the same kernel under
TRITON_INTERPRET=1 or the pure-torch implementation (impl="torch"); the README lists their API.
"""

if __name__ != "fastrlhf.kernels":
    # Imported from a checkout's root as a top-level `kernels` (transformers probes for the Hub's
    # `kernels` package by importing that name): hand back the one real module. A second copy
    # would register every fastrlhf:: custom op again, and the dispatcher's handles to the first
    # registration dangle once either copy is collected (random crashes inside op calls).
    import importlib as _importlib
    import sys as _sys

    _sys.modules[__name__] = _importlib.import_module("fastrlhf.kernels")
else:
    from .gae import gae, gae_ref
    from .group_advantages import group_advantages, group_advantages_ref
    from .kl_penalty import kl_penalty, kl_penalty_ref
    from .linear_logprob import linear_logprob, linear_logprob_ref
    from .logprob_from_logits import logprob_from_logits, logprob_from_logits_ref
    from .policy_loss import policy_loss, policy_loss_ref
    from .preference_loss import preference_loss, preference_loss_ref
    from .value_loss import value_loss, value_loss_ref

__all__ = [
    "gae",
    "gae_ref",
    "group_advantages",
    "group_advantages_ref",
    "kl_penalty",
    "kl_penalty_ref",
    "linear_logprob",
    "linear_logprob_ref",
    "logprob_from_logits",
    "logprob_from_logits_ref",
    "policy_loss",
    "policy_loss_ref",
    "preference_loss",
    "preference_loss_ref",
    "value_loss",
    "value_loss_ref",
]
