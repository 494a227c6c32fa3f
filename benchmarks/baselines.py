"""The eager-torch baselines the kernels are measured and tested against.

What a user writes by hand: materialise the logits in the input dtype, log_softmax over an
fp32 upcast, gather. The tests also use these as the "torch in the same dtype" leg of the
three-way comparison.
"""

import torch


def eager_logprob(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V) fp32
    valid = labels != ignore_index
    logp = torch.where(valid, logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)


def eager_linear_logprob(hidden, weight, labels, *, bias=None, logit_scale=1.0, softcap=None, **kw):
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (..., V), as HF's lm_head
    if logit_scale != 1.0:
        logits = logits * logit_scale  # Cohere / Granite
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap  # Gemma 2, in the logits' dtype as HF does
    return eager_logprob(logits, labels, **kw)
