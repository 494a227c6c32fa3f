"""fastrlhf.kernels: fused Triton ops for RLHF losses. Needs only torch and triton.

Every op runs its Triton kernel on CUDA; on CPU it runs the same kernel under
TRITON_INTERPRET=1 or the pure-torch implementation (impl="torch"). See DESIGN.md.
"""

from .linear_logprob import linear_logprob, linear_logprob_ref
from .logprob_from_logits import logprob_from_logits, logprob_from_logits_ref

__all__ = [
    "linear_logprob",
    "linear_logprob_ref",
    "logprob_from_logits",
    "logprob_from_logits_ref",
]
