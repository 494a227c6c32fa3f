"""linear_logprob: Triton (interpreted on CPU) and torch paths against the float64 reference.

Three-way comparison as in flash-attention's tests: kernel vs float64, and the kernel's error
must stay within a small multiple of eager torch's own error in the same dtype.
"""

import importlib

import pytest
import torch

from fastrlhf.kernels import linear_logprob, linear_logprob_ref

from benchmarks.baselines import eager_linear_logprob

from .helpers import assert_within_torch_error

ll = importlib.import_module("fastrlhf.kernels.linear_logprob")
common = importlib.import_module("fastrlhf.kernels._common")

IMPLS = ["triton", "torch"]


def _inputs(lead, H, V, dtype, device, *, bias=True, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(device=device, dtype=dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(device=device, dtype=dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels.to(device)


def _run(fn, hidden, weight, bias, labels, g_lp, g_ent, **kw):
    """Values and gradients of sum(g_lp*logp + g_ent*entropy) w.r.t. hidden, weight, bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    logp, ent = fn(*leaves, labels, bias=b, return_entropy=True, **kw)
    loss = (logp * g_lp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves + ([b] if b is not None else []))
    return (logp, ent) + tuple(grads)


def _ref(hidden, weight, bias, labels, g_lp, g_ent, **kw):
    """The float64 reference: float64 leaves, so its gradients are float64 too."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return _run(linear_logprob_ref, d(hidden), d(weight), d(bias), labels, d(g_lp), d(g_ent), **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,H,V,bias,temperature", [
    ((37,), 48, 200, True, 0.7),    # odd sizes: 3 token tiles, 3 hidden tiles, 7 vocab tiles
    ((2, 19), 64, 131, False, 1.0),  # leading dims (B, T), V not a multiple of the tile
])
def test_matches_float64(impl, dtype, lead, H, V, bias, temperature, device, poison_empty):
    hidden, weight, b, labels = _inputs(lead, H, V, dtype, device, bias=bias)
    g_lp, g_ent = torch.randn(lead).to(device), torch.randn(lead).to(device)
    kw = dict(temperature=temperature)
    ours = _run(linear_logprob, hidden, weight, b, labels, g_lp, g_ent, impl=impl, **kw)
    ref = _ref(hidden, weight, b, labels, g_lp, g_ent, **kw)
    eager = _run(eager_linear_logprob, hidden, weight, b, labels, g_lp, g_ent, **kw)
    names = ["logp", "entropy", "d_hidden", "d_weight", "d_bias"]
    assert ours[0].dtype == ours[1].dtype == torch.float32
    for name, o, r, e in zip(names, ours, ref, eager):
        assert o.dtype == e.dtype, name
        assert_within_torch_error(o, r, e, name=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale,softcap,temperature", [
    (1.0, 1.5, 1.0),    # Gemma 2's final-logit softcapping, binding (|raw| ~ 3)
    (0.25, None, 0.7),  # Cohere's logit_scale (Granite: 1 / logits_scaling), with temperature
    (2.0, 3.0, 0.8),    # both, the scale applied first
])
def test_output_transforms_match_float64(impl, dtype, logit_scale, softcap, temperature, device,
                                         poison_empty):
    """Softcapping and logit scales inside the kernel, values and all three gradients (the
    backward chains through tanh), against float64 and eager torch in the same dtype."""
    hidden, weight, b, labels = _inputs((37,), 48, 200, dtype, device)
    g_lp, g_ent = torch.randn(37).to(device), torch.randn(37).to(device)
    kw = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    ours = _run(linear_logprob, hidden, weight, b, labels, g_lp, g_ent, impl=impl, **kw)
    ref = _ref(hidden, weight, b, labels, g_lp, g_ent, **kw)
    eager = _run(eager_linear_logprob, hidden, weight, b, labels, g_lp, g_ent, **kw)
    plain = _ref(hidden, weight, b, labels, g_lp, g_ent, temperature=temperature)
    assert (plain[0] - ref[0]).abs().max() > 0.3  # the transform matters at these sizes
    for name, o, r, e in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], ours, ref, eager):
        assert_within_torch_error(o, r, e, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_callers_autocast_does_not_change_the_op(impl, device):
    """Trainers run forward passes under bf16 autocast; inside the op the dtypes are its own
    (the torch path's fp32 matmuls ran in bf16 and crashed in scatter_add before)."""
    hidden, weight, b, labels = _inputs((19,), 32, 90, torch.float32, device)
    g = torch.randn(19)
    plain = _run(linear_logprob, hidden, weight, b, labels, g, g, impl=impl, softcap=3.0)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        under = _run(linear_logprob, hidden, weight, b, labels, g, g, impl=impl, softcap=3.0)
    for x, y in zip(plain, under):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_softcap_by_hand():
    """One token, V = 2, raw logits (0, 4), cap 2: z = 2 tanh((0, 2)) = (0, 1.928...);
    logp(label 1) = z1 - log(1 + e^z1); d logp / d raw1 = (1 - p1) (1 - tanh(2)^2)."""
    import math

    hidden, weight = torch.tensor([[1.0]]), torch.tensor([[0.0], [4.0]])
    h = hidden.clone().requires_grad_()
    logp = linear_logprob(h, weight, torch.tensor([1]), softcap=2.0, impl="torch")
    z1 = 2 * math.tanh(2.0)
    p1 = 1 / (1 + math.exp(-z1))
    assert logp.item() == pytest.approx(z1 - math.log(1 + math.exp(z1)), abs=1e-6)
    logp.sum().backward()  # d raw1 / d h = 4, d raw0 / d h = 0
    assert h.grad.item() == pytest.approx(4 * (1 - p1) * (1 - math.tanh(2.0) ** 2), abs=1e-6)
    tri = linear_logprob(hidden, weight, torch.tensor([1]), softcap=2.0, impl="triton")
    assert tri.item() == pytest.approx(logp.item(), abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_positions_are_exactly_zero(impl, device):
    hidden, weight, b, labels = _inputs((29,), 32, 96, torch.float32, device, ignore_frac=0.4)
    ignored = labels == -100
    assert ignored.any() and (~ignored).any()
    logp, ent, dh, dw, db = _run(linear_logprob, hidden, weight, b, labels,
                                 torch.randn(29), torch.randn(29), impl=impl)
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(dh[ignored] == 0)
    # the weight gradient is that of the kept positions alone
    keep = ~ignored
    g_lp, g_ent = torch.randn(29), torch.randn(29)
    _, _, _, dw_all, _ = _run(linear_logprob, hidden, weight, b, labels, g_lp, g_ent, impl=impl)
    _, _, _, dw_kept, _ = _run(linear_logprob, hidden[keep], weight, b, labels[keep], g_lp[keep],
                               g_ent[keep], impl=impl)
    torch.testing.assert_close(dw_all, dw_kept, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_output_gradients(impl, device):
    """Gradient through logp alone (entropy unused) and through the entropy alone."""
    hidden, weight, b, labels = _inputs((23,), 32, 80, torch.float32, device)
    h = hidden.clone().requires_grad_()
    logp = linear_logprob(h, weight, labels, bias=b, impl=impl)  # no entropy requested
    g = torch.randn(23)
    (dh,) = torch.autograd.grad((logp * g).sum(), h)
    h64 = hidden.double().requires_grad_()
    (dh_ref,) = torch.autograd.grad((linear_logprob_ref(h64, weight, labels, bias=b) * g).sum(), h64)
    torch.testing.assert_close(dh.double(), dh_ref, rtol=1e-4, atol=1e-5)

    _, ent = linear_logprob(h, weight, labels, bias=b, return_entropy=True, impl=impl)
    (dh,) = torch.autograd.grad((ent * g).sum(), h)
    _, ent_ref = linear_logprob_ref(h64, weight, labels, bias=b, return_entropy=True)
    (dh_ref,) = torch.autograd.grad((ent_ref * g).sum(), h64)
    torch.testing.assert_close(dh.double(), dh_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl, device):
    hidden, weight, b, labels = _inputs((21,), 40, 70, torch.float32, device)
    hidden_t = hidden.t().contiguous().t()  # (N, H) with strides (1, N)
    weight_big = torch.randn(70, 55)
    weight_big[:, :40] = weight
    weight_s = weight_big[:, :40]  # (V, H) with row stride 55
    assert not hidden_t.is_contiguous() and not weight_s.is_contiguous()
    g_lp, g_ent = torch.randn(21), torch.randn(21)
    ours = _run(linear_logprob, hidden_t, weight_s, b, labels, g_lp, g_ent, impl=impl)
    ref = _ref(hidden, weight, b, labels, g_lp, g_ent)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_over_64k(impl, device, monkeypatch):
    """V = 65600 (> 2^16, not a power of two), labels above 65535."""
    if impl == "triton":  # wider interpreter tiles keep this test fast; the loops are the same
        monkeypatch.setitem(ll.LOGITS_CONFIGS, "interpret", common.TileConfig(16, 1024, 16, 1, 1))
        monkeypatch.setitem(ll.MATMUL_CONFIGS, "interpret", common.TileConfig(1024, 16, 256, 1, 1))
        monkeypatch.setitem(ll.CHUNK_ELEMS, "interpret", 6 * 16384)
    V = 65600
    hidden, weight, _, labels = _inputs((6,), 16, V, torch.float32, device, bias=False,
                                        ignore_frac=0.0)
    labels[:3] = torch.tensor([65535, 65599, 65536])
    g_lp, g_ent = torch.randn(6), torch.randn(6)
    ours = _run(linear_logprob, hidden, weight, None, labels, g_lp, g_ent, impl=impl)
    ref = _ref(hidden, weight, None, labels, g_lp, g_ent)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sms,chunk", [(1, 1 << 20), (64, 2048)])
def test_triton_split_and_chunk_paths(sms, chunk, monkeypatch, poison_empty):
    """One vocab split + one backward chunk (bf16 d(hidden) written directly), and many
    splits + many chunks (fp32 accumulation of d(hidden)) give the same answer."""
    monkeypatch.setattr(ll, "_INTERPRET_SMS", sms)
    monkeypatch.setitem(ll.CHUNK_ELEMS, "interpret", chunk)
    hidden, weight, b, labels = _inputs((33,), 32, 150, torch.bfloat16, "cpu")
    g_lp, g_ent = torch.randn(33), torch.randn(33)
    ours = _run(linear_logprob, hidden, weight, b, labels, g_lp, g_ent, impl="triton")
    ref = _ref(hidden, weight, b, labels, g_lp, g_ent)
    eager = _run(eager_linear_logprob, hidden, weight, b, labels, g_lp, g_ent)
    for name, o, r, e in zip(["logp", "entropy", "dh", "dw", "db"], ours, ref, eager):
        assert_within_torch_error(o, r, e, name=name)


def test_default_impl_and_env_switch(monkeypatch):
    x = torch.zeros(1)
    assert common.resolve_impl(None, x) == "triton"  # CPU under TRITON_INTERPRET=1
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    assert common.resolve_impl(None, x) == "torch"
    assert common.resolve_impl("triton", x) == "triton"  # the argument wins
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.delenv("FASTRLHF_KERNEL_IMPL")
    assert common.resolve_impl(None, x) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        common.resolve_impl("triton", x)


STAT_NAMES = ("mean_logits", "log_sum_sq_probs", "is_top1")


def test_stats_by_hand():
    """Raw logits (2, 2, 0) at T = 0.5 -> z = (4, 4, 0): mean 8/3, sum p^2 = (2 e^8 + 1) / (2 e^4 + 1)^2;
    the tie goes to the first maximum (label 0 is top-1, label 1 is not); an ignored position
    gives 0 / False."""
    import math

    hidden, weight = torch.ones(4, 1), torch.tensor([[2.0], [2.0], [0.0]])
    labels = torch.tensor([0, 1, 2, -100])
    want = math.log((2 * math.exp(8) + 1) / (2 * math.exp(4) + 1) ** 2)
    for impl in IMPLS:
        _, st = linear_logprob(hidden, weight, labels, temperature=0.5, return_stats=STAT_NAMES, impl=impl)
        assert st["mean_logits"].tolist() == pytest.approx([8 / 3] * 3 + [0], abs=1e-6)
        assert st["log_sum_sq_probs"].tolist() == pytest.approx([want] * 3 + [0], abs=1e-6)
        assert st["is_top1"].tolist() == [True, False, False, False]
        assert st["is_top1"].dtype == torch.bool and st["mean_logits"].dtype == torch.float32


@pytest.mark.parametrize("impl,sms", [("torch", 1), ("triton", 1), ("triton", 64)])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 0.7)])
def test_stats_match_float64_and_leave_the_log_probs_alone(impl, sms, softcap, temperature, monkeypatch,
                                                           poison_empty):
    """The three statistics against the float64 reference, one vocab split and three (sms=64:
    the label's split, the max's split and the tie-break cross split boundaries); asking for
    them changes neither the log-probs, the entropy nor any gradient (bit for bit)."""
    monkeypatch.setattr(ll, "_INTERPRET_SMS", sms)
    hidden, weight, b, labels = _inputs((5, 7), 32, 150, torch.float32, "cpu")
    # the same largest logit at columns 2 and 140 for three tokens, exact in fp32 (small integers)
    v = torch.randint(-2, 3, (32,), generator=torch.Generator().manual_seed(1)).float()
    hidden[0, :3], weight[2], weight[140], b[2], b[140] = v, v, v, 0.0, 0.0
    labels[1:3] = (hidden[1:3].double() @ weight.double().t() + b.double()).argmax(-1)  # more top-1 labels
    labels[0, :3] = torch.tensor([2, 140, 3])  # first argmax, tied later, below
    g_lp, g_ent = torch.randn(5, 7), torch.randn(5, 7)
    kw = dict(softcap=softcap, temperature=temperature)
    with_stats = lambda *a, **k: linear_logprob(*a, return_stats=STAT_NAMES, **k)  # noqa: E731
    ours = _run(lambda *a, **k: with_stats(*a, **k)[:2], hidden, weight, b, labels, g_lp, g_ent, impl=impl, **kw)
    plain = _run(linear_logprob, hidden, weight, b, labels, g_lp, g_ent, impl=impl, **kw)
    for o, p in zip(ours, plain):
        torch.testing.assert_close(o, p, rtol=0, atol=0)
    _, _, st = with_stats(hidden, weight, labels, bias=b, return_entropy=True, impl=impl, **kw)
    *_, ref = linear_logprob_ref(hidden, weight, labels, bias=b, return_entropy=True, return_stats=STAT_NAMES, **kw)
    assert ref["is_top1"][0, :3].tolist() == [True, False, False]
    assert torch.equal(st["is_top1"], ref["is_top1"]) and ref["is_top1"].sum() >= 10
    for name in ("mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(st[name].double(), ref[name], rtol=1e-5, atol=1e-5)
    assert not any(t.requires_grad for t in st.values())


def test_stats_names_are_checked():
    args = (torch.randn(4, 8), torch.randn(50, 8), torch.tensor([0, 1, -100, 49]))
    for bad in (("argmax",), "is_top1"):
        with pytest.raises(ValueError, match="return_stats must be a tuple of names from"):
            linear_logprob(*args, return_stats=bad)


@pytest.mark.parametrize("bad,match", [
    (dict(hidden=torch.randn(4, 9)), r"hidden size mismatch.*H=9.*H=8"),
    (dict(labels=torch.tensor([0, 1, 50, 2])), r"labels out of range \[0, 50\) at index \(2,\): 50"),
    (dict(labels=torch.tensor([0, 1, -5, 2])), r"out of range"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), r"labels must be int64, got torch.int32"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), r"labels shape \(5,\) does not match"),
    (dict(weight=torch.randn(50, 8, dtype=torch.bfloat16)), r"weight dtype torch.bfloat16 does not match"),
    (dict(hidden=torch.zeros(4, 8, dtype=torch.int64)), r"hidden must be float32, bfloat16 or float16"),
    (dict(bias=torch.randn(49)), r"bias must have shape \(50,\)"),
    (dict(weight=torch.randn(50, 8, device="meta")), r"different devices"),
    (dict(temperature=0.0), r"temperature must be > 0"),
    (dict(softcap=0.0), r"softcap must be a finite number > 0"),
    (dict(softcap=float("nan")), r"softcap must be a finite number > 0"),
    (dict(logit_scale=float("inf")), r"logit_scale must be a finite nonzero"),
    (dict(impl="cuda"), r"impl must be one of"),
])
def test_bad_input_names_the_problem(bad, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(50, 8),
                labels=torch.tensor([0, 1, -100, 49]), bias=None, temperature=1.0, impl=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        linear_logprob(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_parity_with_liger_fused_linear_cross_entropy():
    """Liger's FLCE with reduction='none' is -logp; compare values and gradients."""
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy")
    hidden, weight, _, labels = _inputs((24,), 32, 120, torch.float32, "cpu", bias=False)
    loss_fn = liger.LigerFusedLinearCrossEntropyLoss(reduction="none")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    liger_loss = loss_fn(w1, h1, labels)
    liger_loss.sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprob(h2, w2, labels, impl="triton")
    (-logp).sum().backward()
    torch.testing.assert_close(-logp, liger_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-5)
