"""gae, group_advantages, preference_loss: hand-derived cases and float64 references;
and the composition of preference_loss with linear_logprob against materialised DPO."""

import importlib
import math

import pytest
import torch

from fastrlhf.kernels import (gae, gae_ref, group_advantages, group_advantages_ref, linear_logprob,
                              preference_loss, preference_loss_ref)

IMPLS = ["triton", "torch"]

# ---------------------------------------------------------------- gae


@pytest.mark.parametrize("impl", IMPLS)
def test_gae_by_hand(impl):
    # r = [0, 0, 1], V = [0.5, 0.5, 0.5], 4th position padding (V there must not leak in).
    # gamma = lam = 1: A_t = sum of future rewards - V_t = 0.5 each; returns = 1.
    # gamma = 1, lam = 0: A_t = delta_t = r_t + V_{t+1} - V_t = [0, 0, 0.5]; returns = A + V.
    r = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    v = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0, impl=impl)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.0, impl=impl)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.5, 1.0, 0.0]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_gae_skips_masked_observation_tokens(impl):
    # tokens 0, 2 are the response, 1 is a masked tool observation: it is skipped entirely
    # (its value and reward unused), so the result equals the 2-token sequence [0, 2].
    r = torch.tensor([[0.3, 5.0, 1.0]])
    v = torch.tensor([[0.2, 9.0, 0.4]])
    adv, ret = gae(r, v, torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.8, impl=impl)
    adv2, ret2 = gae(r[:, [0, 2]], v[:, [0, 2]], torch.ones(1, 2), gamma=0.9, lam=0.8, impl=impl)
    torch.testing.assert_close(adv[:, [0, 2]], adv2)
    torch.testing.assert_close(ret[:, [0, 2]], ret2)
    assert adv[0, 1] == 0 and ret[0, 1] == 0


@pytest.mark.parametrize("T,block", [(45, 16), (64, 64), (1, 16)])
def test_gae_matches_float64(T, block, monkeypatch, poison_empty):
    monkeypatch.setattr(importlib.import_module("fastrlhf.kernels.gae"), "BLOCK_T", block)
    g = torch.Generator().manual_seed(4)
    B = 5
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([T, T // 2, 0, 1, T - 1]):
        mask[b, :n] = True
    mask[0, T // 3: T // 3 + 2] = False
    adv, ret = gae(r, v, mask, gamma=0.99, lam=0.95, impl="triton")
    adv64, ret64 = gae_ref(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)


def test_gae_bad_input():
    with pytest.raises(ValueError, match=r"values must have shape \(2, 3\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"gamma and lam must be in \[0, 1\]"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), lam=1.5)


# ---------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_by_hand(impl):
    # group [1, 2, 3]: mean 2, unbiased std 1 -> GRPO (r - 2) / (1 + 1e-6);
    # Dr.GRPO r - 2; RLOO r_i - mean(others) = [1 - 2.5, 2 - 2, 3 - 1.5] = [-1.5, 0, 1.5].
    # group [4, 4, 4]: all zero (no NaN from a zero std).
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    grpo = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-6)
    torch.testing.assert_close(group_advantages(r, 3, impl=impl), grpo)
    torch.testing.assert_close(group_advantages(r, 3, scale="none", impl=impl),
                               torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(r, 3, scale="none", leave_one_out=True, impl=impl),
                               torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("G,n_groups", [(5, 7), (16, 3), (2, 1)])
@pytest.mark.parametrize("scale,loo", [("std", False), ("none", False), ("none", True), ("std", True)])
def test_group_advantages_matches_float64(G, n_groups, scale, loo, poison_empty):
    r = torch.randn(G * n_groups, generator=torch.Generator().manual_seed(G))
    out = group_advantages(r, G, scale=scale, leave_one_out=loo, impl="triton")
    ref = group_advantages_ref(r.double(), G, scale=scale, leave_one_out=loo)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="rewards length 7 is not a multiple of group_size=3"):
        group_advantages(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="group_size=1: a standard deviation"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="unknown scale 'batch'"):
        group_advantages(torch.zeros(4), 2, scale="batch")


# ---------------------------------------------------------------- preference_loss

LOSS_TYPES = ["sigmoid", "robust", "ipo", "hinge", "simpo"]


@pytest.mark.parametrize("impl", IMPLS)
def test_preference_by_hand(impl):
    # chosen = rejected and ref equal: m = 0.
    #   sigmoid: -logsig(0) = log 2;  ipo (beta = 0.1): (0 - 5)^2 = 25;  hinge: relu(1) = 1
    #   sigmoid with eps = 0.1: log 2 (symmetric);  robust eps = 0.1: 0.8 log 2 / 0.8 = log 2
    #   simpo, beta 2, gamma 1, chosen - rejected = 1: -logsig(2 - 1) = log(1 + e^-1)
    z = torch.zeros(4)
    assert preference_loss(z, z, z, z, impl=impl)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert preference_loss(z, z, z, z, loss_type="ipo", impl=impl)[0].item() == pytest.approx(25.0, rel=1e-6)
    assert preference_loss(z, z, z, z, loss_type="hinge", impl=impl)[0].item() == pytest.approx(1.0, rel=1e-6)
    assert preference_loss(z, z, z, z, label_smoothing=0.1, impl=impl)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert preference_loss(z, z, z, z, loss_type="robust", label_smoothing=0.1,
                           impl=impl)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    simpo = preference_loss(z + 1, z, beta=2.0, gamma=1.0, loss_type="simpo", impl=impl)[0]
    assert simpo.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_preference_metrics_by_hand():
    # beta 0.5: r_c = 0.5 * ([-1, -2] - [-2, -2]) = [0.5, 0];  r_r = 0.5 * ([-3, -1] - [-2, -2]) = [-0.5, 0.5]
    loss, m = preference_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
                              torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx(0.25)
    assert m["rewards/rejected"].item() == pytest.approx(0.0)
    assert m["rewards/margin"].item() == pytest.approx(0.25)  # mean of [1.0, -0.5]
    assert m["rewards/accuracy"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss_type,eps", [(t, e) for t in LOSS_TYPES for e in (0.0, 0.1)
                                          if not (e and t in ("ipo", "hinge"))])
def test_preference_matches_float64(loss_type, eps, poison_empty):
    g = torch.Generator().manual_seed(5)
    c, r, rc, rr = (torch.randn(37, generator=g) * 4 - 20 for _ in range(4))
    refs = () if loss_type == "simpo" else (rc, rr)
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps, gamma=0.7)
    c1, r1 = c.clone().requires_grad_(), r.clone().requires_grad_()
    loss, _ = preference_loss(c1, r1, *refs, impl="triton", **kw)
    g1 = torch.autograd.grad(loss, (c1, r1))
    c64, r64 = c.double().requires_grad_(), r.double().requires_grad_()
    loss64 = preference_loss_ref(c64, r64, *(t.double() for t in refs), **kw)
    g64 = torch.autograd.grad(loss64, (c64, r64))
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="kto"), r"unknown loss_type 'kto'"),
    (dict(loss_type="simpo"), r"simpo' uses no reference model"),
    (dict(refs=()), r"loss_type='sigmoid' needs ref_chosen_logps"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), r"not defined for loss_type='ipo'"),
    (dict(rejected=torch.zeros(3)), r"rejected_logps must be \(B,\) like chosen_logps \(4,\)"),
    (dict(beta=0.0), r"beta must be a finite number > 0"),
])
def test_preference_bad_input(bad, match):
    z = torch.zeros(4)
    refs = bad.pop("refs", (z, z))
    rejected = bad.pop("rejected", z)
    with pytest.raises(ValueError, match=match):
        preference_loss(z, rejected, *refs, **bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_dpo_composed_with_linear_logprob_matches_materialised_float64(impl):
    """preference_loss on sequence sums of linear_logprob == float64 DPO on full logits."""
    g = torch.Generator().manual_seed(6)
    P, T, H, V = 3, 9, 32, 97  # pairs, response length, hidden, vocab
    hidden = torch.randn(2 * P, T, H, generator=g)  # chosen rows then rejected rows
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[torch.rand(2 * P, T, generator=g) < 0.25] = -100  # prompt / padding positions
    ref_logps = torch.randn(2 * P, generator=g) * 3 - 30

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    seq = linear_logprob(h1, w1, labels, impl=impl).sum(-1)  # (2P,)
    loss, _ = preference_loss(seq[:P], seq[P:], ref_logps[:P], ref_logps[P:], beta=0.1, impl=impl)
    loss.backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp_all = torch.log_softmax(h64 @ w64.t(), dim=-1)  # (2P, T, V)
    tok = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    s64 = tok.sum(-1)
    m = (s64[:P] - ref_logps[:P].double()) - (s64[P:] - ref_logps[P:].double())
    loss64 = -torch.nn.functional.logsigmoid(0.1 * m).mean()
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
