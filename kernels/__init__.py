"""fastrlhf.kernels: fused Triton ops for RLHF losses. Needs only torch and triton.

Every op runs its Triton kernel on CUDA; on CPU it runs the same kernel under
TRITON_INTERPRET=1 or the pure-torch implementation (impl="torch"); the README lists their API.
"""

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
