"""kl_penalty, policy_loss, value_loss: hand-derived cases, float64 references, Liger parity."""

import importlib
import math

import pytest
import torch

from fastrlhf.kernels import (kl_penalty, kl_penalty_ref, logprob_from_logits, policy_loss,
                              policy_loss_ref, value_loss, value_loss_ref)

IMPLS = ["triton", "torch"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


# ---------------------------------------------------------------- kl_penalty


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_hand_values(impl):
    # x = -1, y = -2:  k1 = 1,  k2 = 0.5,  k3 = e^-1 - (-1) - 1 = e^-1
    #   dk1/dx = 1,  dk2/dx = x - y = 1,  dk3/dx = 1 - e^(y-x) = 1 - e^-1
    for kind, val, grad in [("k1", 1.0, 1.0), ("k2", 0.5, 1.0), ("k3", math.exp(-1), 1 - math.exp(-1))]:
        x = torch.tensor([-1.0], requires_grad=True)
        y = torch.tensor([-2.0], requires_grad=True)
        k = kl_penalty(x, y, kind, impl=impl)
        k.sum().backward()
        assert k.item() == pytest.approx(val, rel=1e-6)
        assert x.grad.item() == pytest.approx(grad, rel=1e-6)
        assert y.grad.item() == pytest.approx(-grad, rel=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_matches_float64(kind, dtype, poison_empty):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 301, generator=g) - 3).to(dtype).requires_grad_()
    y = (x.detach().float() + torch.randn(7, 301, generator=g) * 0.5).to(dtype).requires_grad_()
    up = torch.randn(7, 301, generator=g)
    k = kl_penalty(x, y, kind, impl="triton")
    dx, dy = torch.autograd.grad((k * up).sum(), (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    k64 = kl_penalty_ref(x64, y64, kind)
    dx64, dy64 = torch.autograd.grad((k64 * up.double()).sum(), (x64, y64))
    assert k.dtype == torch.float32 and dx.dtype == dtype
    torch.testing.assert_close(k.double(), k64, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx.double(), dx64, **tol)
    torch.testing.assert_close(dy.double(), dy64, **tol)


def test_kl_bad_input():
    with pytest.raises(ValueError, match="unknown KL estimator kind 'k4'"):
        kl_penalty(torch.zeros(3), torch.zeros(3), "k4")
    with pytest.raises(ValueError, match=r"logprobs \(3,\) and ref_logprobs \(4,\)"):
        kl_penalty(torch.zeros(3), torch.zeros(4))


# ---------------------------------------------------------------- policy_loss: by hand


@pytest.mark.parametrize("impl", IMPLS)
def test_ppo_clip_by_hand(impl):
    # ratio r = [1.5, 0.5, 1.0], A = [1, -1, 2], clip 0.2:
    #   t0: -A r = -1.5, -A clamp(r) = -1.2 -> max -1.2, clipped, grad 0
    #   t1: -A r =  0.5, -A clamp(r) =  0.8 -> max  0.8, clipped, grad 0
    #   t2: -A r = -2.0, -A clamp(r) = -2.0 -> -2.0, not clipped, grad -A r = -2
    # token-mean: (-1.2 + 0.8 - 2) / 3 = -0.8;  clipfrac 2/3;  d/dlp = [0, 0, -2/3]
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    loss, m = policy_loss(lp, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]),
                          torch.ones(1, 3, dtype=torch.bool), impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx(-0.8, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, -2 / 3]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_dual_clip_and_clip_higher_by_hand(impl):
    # A = -1 everywhere. clip_low 0.2, clip_high 0.28, dual_clip 3:
    #   t0: r = 5:   -A r = 5,   -A clamp(r) = 1.28 -> 5;   dual: min(5, 3) = 3, grad 0
    #   t1: r = 2:   -A r = 2,   -A clamp(r) = 1.28 -> 2;   dual: 3 > 2, keeps 2, grad -A r = 2
    #   t2: r = 0.5: -A r = 0.5, -A clamp(r) = 0.8  -> 0.8 (clipped at 1 - 0.2), grad 0
    # token-mean: (3 + 2 + 0.8) / 3;  d/dlp = [0, 2/3, 0];  clipfrac = 1/3 (t2 only)
    lp = torch.log(torch.tensor([[5.0, 2.0, 0.5]])).requires_grad_()
    loss, m = policy_loss(lp, torch.zeros(1, 3), -torch.ones(1), torch.ones(1, 3), clip_high=0.28,
                          dual_clip=3.0, impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx(5.8 / 3, abs=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 2 / 3, 0.0]]))
    assert m["clipfrac"].item() == pytest.approx(1 / 3, abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("agg,expected,row_w", [
    # ratio 1 so the per-token loss is -A: seq0 [1, 2, (3)], seq1 [4, (5), (6)] (masked in ())
    ("token-mean", 7 / 3, [1 / 3, 1 / 3]),               # (1 + 2 + 4) / 3 tokens
    ("seq-mean-token-mean", 2.75, [1 / 4, 1 / 2]),       # mean(3/2, 4/1)
    ("seq-mean-token-sum", 3.5, [1 / 2, 1 / 2]),         # mean(3, 4)
    ("seq-mean-token-sum-norm", 7 / 8, [1 / 8, 1 / 8]),  # (3 + 4) / (B=2 * max_len=4)
])
def test_aggregations_by_hand(impl, agg, expected, row_w):
    lp = torch.zeros(2, 3, requires_grad=True)
    adv = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = policy_loss(lp, torch.zeros(2, 3), adv, mask, loss_agg=agg,
                          max_len=4 if agg.endswith("norm") else None, impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # d loss / d lp = -A r * w_b on kept tokens (r = 1)
    expect_grad = -adv * torch.tensor(row_w)[:, None] * mask
    torch.testing.assert_close(lp.grad, expect_grad)


def test_dr_grpo_max_len_defaults_to_T():
    lp = torch.zeros(2, 3, requires_grad=True)
    adv = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = policy_loss(lp, torch.zeros(2, 3), adv, mask, loss_agg="seq-mean-token-sum-norm",
                          impl="triton")
    assert loss.item() == pytest.approx(7 / 6, abs=1e-6)  # (3 + 4) / (2 * T=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_cispo_by_hand(impl):
    # ratio r = [1.5, 0.5, 1.0], A = [1, -1, 2], clip 0.2: the IS weight w = clamp(r) = [1.2, 0.8, 1.0]
    # is a constant, the loss -A w logp: [-1.2 ln 1.5, 0.8 ln 0.5, 0] -> token-mean -1.041076 / 3;
    # every token keeps its gradient -A w / 3 = [-0.4, 0.8 / 3, -2 / 3]; clipfrac: w != r on 2 of 3
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    loss, m = policy_loss(lp, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]),
                          torch.ones(1, 3, dtype=torch.bool), surrogate="cispo", impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 * math.log(1.5) + 0.8 * math.log(0.5)) / 3, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.4, 0.8 / 3, -2 / 3]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_sapo_by_hand(impl):
    # SAPO: pg = -(4/tau) sigmoid(tau (r - 1)) A, tau = 1 for A > 0, 1.05 for A <= 0; its gradient
    # w.r.t. logp is -A 4 s (1 - s) r. r = [1.5, 0.5, 1.0], A = [1, -1, 2]:
    #   s0 = sigmoid(0.5), s1 = sigmoid(-0.525), s2 = sigmoid(0) = 1/2
    #   pg = [-4 s0, (4 / 1.05) s1, -4], token-mean / 3
    #   grad = [-6 s0 (1 - s0), 2 s1 (1 - s1), -2] / 3: at r = 1 PPO's -A (token 2)
    # clipfrac: r outside [0.8, 1.2] on 2 of 3 tokens (the gate does not clip; the metric says where a clip would)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    s0, s1 = sig(0.5), sig(-0.525)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    loss, m = policy_loss(lp, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]),
                          torch.ones(1, 3, dtype=torch.bool), surrogate="sapo", impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx((-4 * s0 + 4 / 1.05 * s1 - 4) / 3, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[-6 * s0 * (1 - s0), 2 * s1 * (1 - s1), -2.0]]) / 3)
    # other temperatures: tau_neg = 2 on the negative token, tau_pos = 0.5 on the positives
    loss2, _ = policy_loss(lp.detach(), torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]),
                           torch.ones(1, 3, dtype=torch.bool), surrogate="sapo", sapo_tau_pos=0.5,
                           sapo_tau_neg=2.0, impl=impl)
    assert loss2.item() == pytest.approx((-8 * sig(0.25) + 2 * sig(-1.0) - 16 * 0.5) / 3, abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_level_ratio_by_hand(impl):
    # GSPO-token. seq0: log-ratios [ln 2, 0] -> s = exp(ln 2 / 2) = sqrt 2, A = 1: clipped at 1.2,
    # pg = -1.2 on both tokens, no gradient. seq1: [ln 1.1, ln 0.9, (masked)] -> s = sqrt(0.99),
    # A = -1: pg = s on both, unclipped, each token's gradient -A s. token-mean over 4 tokens.
    s1 = math.sqrt(0.99)
    old = torch.zeros(2, 3)
    lp = torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.1, 0.9, 5.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, m = policy_loss(lp, old, torch.tensor([1.0, -1.0]), mask, ratio_level="sequence", impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 * 2 + s1 * 2) / 4, abs=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 4, s1 / 4, 0.0]]))
    assert m["clipfrac"].item() == pytest.approx(0.5, abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx((2 * math.sqrt(2) + 2 * s1) / 4, abs=1e-6)


def _trl_grpo_loss(lp, old, adv, mask, *, loss_type, level, eps_low, eps_high, beta=0.0, ref=None, max_len=None):
    """TRL 1.16's GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py), its formulas copied for
    the policy part (no vLLM IS ratio, no entropy mask, one accumulation step), in float64:
    importance_sampling_level "token" | "sequence" (GSPO: coef_1 = exp(masked mean log-ratio) per
    sequence, its gradient through the mean), loss_type grpo | bnpo | dr_grpo | dapo (dapo's
    normaliser: the batch's token count, one process) | cispo | sapo (its default temperatures)."""
    log_ratio = lp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
    elif loss_type == "sapo":
        temperatures = torch.where(adv > 0, 1.0, 1.05)
        per_token = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta:
        per_token = per_token + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # bnpo, dapo and cispo (one process)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trl_type,agg,level,ours", [
    ("grpo", "seq-mean-token-mean", "sequence", {}),        # GSPO as TRL recommends it
    ("dapo", "token-mean", "sequence", {}),
    ("dr_grpo", "seq-mean-token-sum-norm", "sequence", {}),
    ("cispo", "token-mean", "token", dict(surrogate="cispo", clip_low=1.0, clip_high=4.0)),  # epsilon_high 5
    ("cispo", "token-mean", "sequence", dict(surrogate="cispo", clip_low=1.0, clip_high=4.0)),
    ("sapo", "seq-mean-token-mean", "token", dict(surrogate="sapo")),
    ("sapo", "seq-mean-token-mean", "sequence", dict(surrogate="sapo")),
])
def test_parity_with_trl_loss_formulas(impl, trl_type, agg, level, ours):
    g = torch.Generator().manual_seed(5)
    B, T = 4, 9
    lp0 = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 2
    old = lp0 + torch.randn(B, T, generator=g, dtype=torch.float64) * (0.15 if trl_type in ("grpo", "dapo", "dr_grpo")
                                                                       else 0.6)  # far off-policy: the gates act
    ref = lp0 + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)  # per sequence, as GRPO's
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    eps = (0.2, 0.28) if trl_type != "cispo" else (None, 5.0)
    a = lp0.clone().requires_grad_()
    theirs = _trl_grpo_loss(a, old, adv[:, None], mask, loss_type=trl_type, level=level, eps_low=eps[0],
                            eps_high=eps[1], beta=0.04, ref=ref, max_len=T)
    theirs.backward()
    b = lp0.float().clone().requires_grad_()
    kw = dict(clip_low=0.2, clip_high=0.28) | ours
    loss, _ = policy_loss(b, old.float(), adv.float(), mask, ref_logprobs=ref.float(), kl_coef=0.04, kl_kind="k3",
                          loss_agg=agg, max_len=T, ratio_level=level, impl=impl, **kw)
    loss.backward()
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(b.grad.double(), a.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- policy_loss: vs float64


def _policy_inputs(B, T, dtype, seed=0, adv_1d=False):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g) * 0.5 - 2).to(dtype)
    old = (lp.float() + torch.randn(B, T, generator=g) * 0.3).to(dtype)
    ref = (lp.float() + torch.randn(B, T, generator=g) * 0.3).to(dtype)
    adv = torch.randn(B, generator=g) if adv_1d else torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # an empty sequence
    ent = (torch.rand(B, T, generator=g) * 3).to(dtype)
    isw = (torch.rand(B, T, generator=g) + 0.5).to(dtype)
    return lp, old, ref, adv, mask, ent, isw


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("adv_1d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_float64(agg, adv_1d, dtype, monkeypatch, poison_empty):
    pl = importlib.import_module("fastrlhf.kernels.policy_loss")
    monkeypatch.setattr(pl, "BLOCK_T", 16)  # several tiles per sequence
    lp, old, ref, adv, mask, ent, isw = _policy_inputs(5, 37, dtype, adv_1d=adv_1d)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_kind="k3",
              entropy_coef=0.01, loss_agg=agg)
    lp1, ent1 = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, m = policy_loss(lp1, old, adv.to(dtype), mask, ref_logprobs=ref, entropy=ent1,
                          is_weights=isw, impl="triton", **kw)
    d_lp, d_ent = torch.autograd.grad(loss, (lp1, ent1))
    lp64, ent64 = lp.double().requires_grad_(), ent.double().requires_grad_()
    adv64 = adv.to(dtype).double()
    adv64 = adv64[:, None].expand(5, 37) if adv_1d else adv64
    loss64, m64 = policy_loss_ref(lp64, old.double(), adv64, mask, ref_logprobs=ref.double(),
                                  entropy=ent64, is_weights=isw.double(), **kw)
    d_lp64, d_ent64 = torch.autograd.grad(loss64, (lp64, ent64))
    assert loss.dtype == torch.float32 and d_lp.dtype == dtype
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    for k in ("clipfrac", "ratio_mean", "approx_kl", "kl", "entropy"):
        torch.testing.assert_close(m[k].double(), m64[k], rtol=1e-5, atol=1e-6, msg=k)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(d_lp.double(), d_lp64, **tol)
    torch.testing.assert_close(d_ent.double(), d_ent64, **tol)
    assert torch.all(d_lp[~mask] == 0) and torch.all(d_ent[~mask] == 0)


@pytest.mark.parametrize("surrogate,level", [("cispo", "token"), ("clip", "sequence"), ("cispo", "sequence"),
                                             ("sapo", "token"), ("sapo", "sequence")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_variants_match_float64(surrogate, level, dtype, monkeypatch, poison_empty):
    pl = importlib.import_module("fastrlhf.kernels.policy_loss")
    monkeypatch.setattr(pl, "BLOCK_T", 16)  # several tiles per sequence
    lp, old, ref, adv, mask, ent, isw = _policy_inputs(5, 37, dtype)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-mean",
              surrogate=surrogate, ratio_level=level)
    lp1 = lp.t().contiguous().t().requires_grad_()  # a column-major (B, T) layout
    old_t = old.t().contiguous().t()
    loss, m = policy_loss(lp1, old_t, adv.to(dtype), mask, ref_logprobs=ref, entropy=ent, is_weights=isw,
                          impl="triton", **kw)
    g = torch.tensor(0.37)  # an upstream gradient other than 1
    (d_lp,) = torch.autograd.grad(loss, (lp1,), grad_outputs=g)
    lp64 = lp.double().requires_grad_()
    loss64, m64 = policy_loss(lp64, old.double(), adv.to(dtype).double(), mask, ref_logprobs=ref.double(),
                              entropy=ent.double(), is_weights=isw.double(), impl="torch", **kw)
    (d_lp64,) = torch.autograd.grad(loss64, (lp64,), grad_outputs=g.double())
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    for k in ("clipfrac", "ratio_mean", "approx_kl", "kl", "entropy"):
        torch.testing.assert_close(m[k].double(), m64[k], rtol=1e-5, atol=1e-6, msg=k)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(d_lp.double(), d_lp64, **tol)
    assert torch.all(d_lp[~mask] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_garbage_does_not_leak(impl):
    lp, old, _, adv, mask, _, _ = _policy_inputs(4, 20, torch.float32)
    lp = lp.clone()
    lp[~mask] = float("nan")
    old = old.clone()
    old[~mask] = float("inf")
    lp.requires_grad_()
    loss, m = policy_loss(lp, old, adv, mask, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert torch.all(lp.grad[~mask] == 0) and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("bad,match", [
    (dict(mask=torch.ones(2, 4)), r"mask must have shape \(2, 3\)"),
    (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), r"mask must be bool, integer or floating"),
    (dict(advantages=torch.ones(3)), r"advantages of shape \(3,\) do not match B=2"),
    (dict(old_logprobs=torch.ones(2, 4)), r"old_logprobs must have shape \(2, 3\)"),
    (dict(loss_agg="mean"), r"unknown loss_agg 'mean'"),
    (dict(kl_kind="k9", ref_logprobs=torch.zeros(2, 3)), r"unknown KL estimator kind 'k9'"),
    (dict(kl_coef=0.1), r"kl_coef=0.1 needs ref_logprobs"),
    (dict(entropy_coef=0.1), r"entropy_coef=0.1 needs entropy"),
    (dict(dual_clip=0.5), r"dual_clip must be > 1"),
    (dict(surrogate="ppo"), r"unknown surrogate 'ppo'"),
    (dict(surrogate="sapo", dual_clip=3.0), r"sapo has none to bound"),
    (dict(surrogate="sapo", sapo_tau_neg=0.0), r"sapo_tau_pos and sapo_tau_neg must be > 0"),
    (dict(ratio_level="group"), r"unknown ratio_level 'group'"),
    (dict(surrogate="cispo", dual_clip=3.0), r"cispo has none to bound"),
    (dict(clip_low=1.0), r"need 0 <= clip_low < 1 \(<= 1 for cispo\)"),
])
def test_policy_loss_bad_input(bad, match):
    args = dict(logprobs=torch.zeros(2, 3), old_logprobs=torch.zeros(2, 3),
                advantages=torch.zeros(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        policy_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"),
                    args.pop("mask"), **args)


@pytest.mark.parametrize("liger_type,agg,liger_kw,ours", [
    ("grpo", "seq-mean-token-mean", {}, {}), ("dapo", "token-mean", {}, {}), ("bnpo", "token-mean", {}, {}),
    ("dr_grpo", "seq-mean-token-sum-norm", {}, {}),
    ("grpo", "seq-mean-token-mean", dict(importance_sampling_level="sequence"), dict(ratio_level="sequence")),
    ("cispo", "token-mean", dict(eps_high=5.0), dict(surrogate="cispo", clip_low=1.0, clip_high=4.0)),
    ("sapo", "seq-mean-token-mean", dict(sapo_temperature_pos=0.9, sapo_temperature_neg=1.3),
     dict(surrogate="sapo", sapo_tau_pos=0.9, sapo_tau_neg=1.3)),
    ("dapo", "token-mean", dict(vllm_is_ratio=True), dict(is_weights=True)),  # TIS weights
], ids=["grpo", "dapo", "bnpo", "dr_grpo", "gspo", "cispo", "sapo", "tis"])
def test_parity_with_liger_grpo_loss(liger_type, agg, liger_kw, ours):
    """Liger's fused GRPO loss from logits (0.8.5: GSPO's sequence level, CISPO, SAPO, vLLM IS
    ratios) == logprob_from_logits + policy_loss (k3 KL)."""
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    g = torch.Generator().manual_seed(3)
    B, L, V, temp, beta = 3, 10, 40, 0.9, 0.04
    logits = torch.randn(B, L + 1, V, generator=g)
    ids = torch.randint(0, V, (B, L), generator=g)
    with torch.no_grad():
        lp0 = logprob_from_logits(logits[:, :-1], ids, temperature=temp, impl="torch")
    old = lp0 + torch.randn(B, L, generator=g) * 0.2
    ref = lp0 + torch.randn(B, L, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, L)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    isw = torch.rand(B, L, generator=g) + 0.5
    if liger_kw.get("vllm_is_ratio"):
        liger_kw, ours = dict(liger_kw, vllm_is_ratio=isw), dict(ours, is_weights=isw)
    z1 = logits.clone().requires_grad_()
    liger_loss, liger_metrics = liger.triton_grpo_loss(
        z1, old, ref, ids, adv, mask, **(dict(temperature=temp, beta=beta, eps_low=0.2, eps_high=0.28, inplace=False,
                                              loss_type=liger_type, max_completion_length=L, reduce=True) | liger_kw))
    liger_loss.backward()
    z2 = logits.clone().requires_grad_()
    lp = logprob_from_logits(z2[:, :-1], ids, temperature=temp, impl="triton")
    loss, m = policy_loss(lp, old, adv, mask, **(dict(clip_low=0.2, clip_high=0.28) | ours), ref_logprobs=ref,
                          kl_coef=beta, kl_kind="k3", loss_agg=agg, max_len=L, impl="triton")
    loss.backward()
    torch.testing.assert_close(loss, liger_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-4, atol=1e-6)
    if "surrogate" not in ours:  # Liger's clip ratio: 0 for sapo, A > 0 only for cispo; ours is documented above
        torch.testing.assert_close(m["clipfrac"], liger_metrics[-1].float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- value_loss


@pytest.mark.parametrize("impl", IMPLS)
def test_value_loss_by_hand(impl):
    # clip 0.2, R = 0:
    #   t0: v = 1.0, v_old = 0.5 -> v_clip = 0.7: max(1.0, 0.49) / 2 = 0.5,    grad v - R = 1.0
    #   t1: v = 0.0, v_old = 1.0 -> v_clip = 0.8: max(0, 0.64) / 2 = 0.32,     clipped, |v - v_old| > clip: grad 0
    #   t2: v = 0.9, v_old = 1.0 -> v_clip = 0.9: equal, 0.405,                  grad 0.9
    # token-mean: (0.5 + 0.32 + 0.405) / 3;  clipfrac 1/3;  d/dv = [1.0, 0, 0.9] / 3
    v = torch.tensor([[1.0, 0.0, 0.9]], requires_grad=True)
    loss, m = value_loss(v, torch.tensor([[0.5, 1.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3),
                         clip=0.2, impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx((0.5 + 0.32 + 0.405) / 3, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(1 / 3, abs=1e-6)
    torch.testing.assert_close(v.grad, torch.tensor([[1.0, 0.0, 0.9]]) / 3)


@pytest.mark.parametrize("agg", AGGS)
def test_value_loss_matches_float64(agg, monkeypatch, poison_empty):
    vl = importlib.import_module("fastrlhf.kernels.value_loss")
    monkeypatch.setattr(vl, "BLOCK_T", 16)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(6, 41, generator=g)
    old = v + torch.randn(6, 41, generator=g) * 0.3
    ret = torch.randn(6, 41, generator=g)
    mask = torch.rand(6, 41, generator=g) > 0.25
    v1 = v.clone().requires_grad_()
    loss, m = value_loss(v1, old, ret, mask, clip=0.2, loss_agg=agg, impl="triton")
    (dv,) = torch.autograd.grad(loss, v1)
    v64 = v.double().requires_grad_()
    loss64, m64 = value_loss_ref(v64, old.double(), ret.double(), mask, clip=0.2, loss_agg=agg)
    (dv64,) = torch.autograd.grad(loss64, v64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dv.double(), dv64, rtol=1e-5, atol=1e-7)
    for k in m:
        torch.testing.assert_close(m[k].double(), m64[k], rtol=1e-5, atol=1e-6)
