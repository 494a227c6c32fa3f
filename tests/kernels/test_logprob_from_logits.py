"""logprob_from_logits: Triton (interpreted on CPU) and torch paths against float64."""

import pytest
import torch

from fastrlhf.kernels import logprob_from_logits, logprob_from_logits_ref

from benchmarks.baselines import eager_logprob

from .helpers import assert_within_torch_error

IMPLS = ["triton", "torch"]


def _run(fn, logits, labels, g_lp, g_ent, **kw):
    z = logits.detach().clone().requires_grad_()
    logp, ent = fn(z, labels, return_entropy=True, **kw)
    (dz,) = torch.autograd.grad((logp * g_lp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum(), z)
    return logp, ent, dz


def _inputs(lead, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = -100
    return logits, labels, torch.randn(lead, generator=g), torch.randn(lead, generator=g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,V,temperature", [((3, 11), 203, 0.6), ((17,), 64, 1.0)])
def test_matches_float64(impl, dtype, lead, V, temperature, poison_empty):
    logits, labels, g_lp, g_ent = _inputs(lead, V, dtype)
    ours = _run(logprob_from_logits, logits, labels, g_lp, g_ent, impl=impl, temperature=temperature)
    ref = _run(logprob_from_logits_ref, logits.double(), labels, g_lp.double(), g_ent.double(),
               temperature=temperature)
    eager = _run(eager_logprob, logits, labels, g_lp, g_ent, temperature=temperature)
    assert ours[2].dtype == dtype  # gradient in the logits' dtype, no fp32 copy
    for name, o, r, e in zip(["logp", "entropy", "d_logits"], ours, ref, eager):
        assert_within_torch_error(o, r, e, name=name)
    ignored = labels == -100
    assert torch.all(ours[0][ignored] == 0) and torch.all(ours[1][ignored] == 0)
    assert torch.all(ours[2][ignored] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_logits_and_logp_only(impl):
    """A vocab slice of a wider tensor (row stride != V), gradient through logp alone."""
    wide, labels, g_lp, _ = _inputs((9,), 80, torch.float32)
    logits = wide[:, :70]
    labels = labels.clamp(max=69)
    z = logits.clone().requires_grad_()
    zs = torch.zeros(9, 80)
    zs[:, :70] = logits
    zs.requires_grad_()
    logp = logprob_from_logits(zs[:, :70], labels, impl=impl)
    (dz,) = torch.autograd.grad((logp * g_lp).sum(), zs)
    z64 = logits.double().requires_grad_()
    (dz_ref,) = torch.autograd.grad((logprob_from_logits_ref(z64, labels) * g_lp).sum(), z64)
    torch.testing.assert_close(dz[:, :70].double(), dz_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(dz[:, 70:] == 0)
    del z


@pytest.mark.parametrize("bad,match", [
    (dict(labels=torch.tensor([0, 7])), r"labels out of range \[0, 7\) at index \(1,\): 7"),
    (dict(labels=torch.tensor([0, 1, 2])), r"labels shape \(3,\) does not match"),
    (dict(logits=torch.zeros(2, 7, dtype=torch.float64)), r"logits must be float32, bfloat16 or float16"),
    (dict(temperature=-1.0), r"temperature must be > 0"),
])
def test_bad_input_names_the_problem(bad, match):
    args = dict(logits=torch.randn(2, 7), labels=torch.tensor([0, 6]), temperature=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        logprob_from_logits(args.pop("logits"), args.pop("labels"), **args)
