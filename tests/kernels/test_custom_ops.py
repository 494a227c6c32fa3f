"""The ops as torch sees them: registered custom ops (torch.library), checked by opcheck, traced
whole by torch.compile(fullgraph=True) and torch.export, equal to eager in value and gradient.

Every call a public function makes to a fastrlhf:: op (forward and backward) is recorded below the
autograd layer and handed to torch.library.opcheck: its schema, its fake (meta) implementation
against the real one, its autograd registration and AOT dispatch with dynamic shapes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastrlhf import kernels as K
from tests.kernels.compile_sm90 import custom_ops

IMPLS = ("torch", "triton")


class _Recorder(TorchDispatchMode):
    """Records (op overload, args) of every fastrlhf:: op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastrlhf":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _inputs(seed=0, B=3, T=5, H=8, V=37):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = torch.rand(B, T, generator=g) > 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    return dict(h=r(B, T, H), w=r(V, H), b=r(V), labels=labels, logits=r(B, T, V), lp=r(B, T) - 2,
                old=r(B, T) - 2, ref=r(B, T) - 2, ent=r(B, T).abs(), isw=r(B, T).abs(), adv=r(B),
                adv_t=r(B, T), mask=mask, v=r(B, T), rew=r(B, T), pair=[r(4) - 3 for _ in range(4)],
                group=r(8))


def _grad(*ts):
    return [t.clone().requires_grad_() for t in ts]


def _every_op_call(impl):
    """Each public op's forward (and the backward of its loss), options on and off:
    (name, fn, leaves) with fn(*leaves) -> a scalar; the leaves that require grad get one."""
    x = _inputs()
    B, T = x["lp"].shape

    def ll(bias, ent, softcap, stats=()):
        def fn(h, w, b):
            lp, e, *st = K.linear_logprob(h, w, x["labels"], bias=b if bias else None, softcap=softcap,
                                          temperature=0.7, return_entropy=True, return_stats=stats, impl=impl)
            extra = sum(t.float().sum() for t in st[0].values()) if stats else 0.0  # no gradient
            return (lp * lp.detach()).sum() + (0.1 * e.sum() if ent else 0.0) + extra
        return fn, _grad(x["h"], x["w"], x["b"])

    def lfl(ent):
        def fn(z):
            lp, e = K.logprob_from_logits(z, x["labels"], temperature=0.7, return_entropy=True, impl=impl)
            return lp.sum() + (0.1 * e.sum() if ent else 0.0)
        return fn, _grad(x["logits"])

    def kl(kind):
        return (lambda a, b: K.kl_penalty(a, b, kind, impl=impl).sum()), _grad(x["lp"], x["ref"])

    def pl(full, **kw):
        def fn(lp, ent):
            opt = dict(ref_logprobs=x["ref"], kl_coef=0.1, entropy=ent, entropy_coef=0.01,
                       is_weights=x["isw"], loss_agg="seq-mean-token-sum-norm", max_len=T + 2) if full else {}
            return K.policy_loss(lp, x["old"], x["adv"] if full else x["adv_t"], x["mask"], impl=impl,
                                 **opt, **kw)[0]
        return fn, _grad(x["lp"], x["ent"])

    def vl():
        return (lambda v: K.value_loss(v, x["old"], x["rew"], x["mask"], clip=0.3, impl=impl)[0]), _grad(x["v"])

    def pref(loss_type):
        def fn(c, r, rc, rr):
            refs = (None, None) if loss_type == "simpo" else (rc, rr)
            return K.preference_loss(c, r, *refs, beta=0.2, loss_type=loss_type, impl=impl)[0]
        return fn, _grad(*x["pair"])

    def adv():
        def fn(rew, v, group):
            a, ret = K.gae(rew, v, x["mask"], gamma=0.99, lam=0.9, impl=impl)
            return a.sum() + ret.sum() + K.group_advantages(group, 4, impl=impl).sum()
        return fn, [x["rew"], x["v"], x["group"]]

    cases = [
        *((f"linear_logprob bias={b} ent={e} softcap={c}", ll(b, e, c))
          for b in (False, True) for e in (False, True) for c in (None, 5.0)),
        ("linear_logprob stats", ll(True, True, 5.0, ("mean_logits", "log_sum_sq_probs", "is_top1"))),
        ("linear_logprob is_top1", ll(False, False, None, ("is_top1",))),
        *((f"logprob_from_logits ent={e}", lfl(e)) for e in (False, True)),
        *((f"kl_penalty {k}", kl(k)) for k in ("k1", "k2", "k3")),
        ("policy_loss", pl(False)),
        ("policy_loss full", pl(True, dual_clip=3.0)),
        ("policy_loss cispo", pl(True, surrogate="cispo", clip_low=1.0, clip_high=3.0)),
        ("policy_loss gspo", pl(True, ratio_level="sequence")),
        ("policy_loss sapo", pl(True, surrogate="sapo", sapo_tau_neg=2.0)),
        ("value_loss", vl()),
        *((f"preference_loss {t}", pref(t)) for t in ("sigmoid", "ipo", "simpo")),
        ("gae + group_advantages", adv()),
    ]
    return [(name, fn, leaves) for name, (fn, leaves) in cases]


def _run(fn, leaves):
    """fn(*leaves) and the gradients of its value w.r.t. the leaves that require grad."""
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    if out.requires_grad:
        out.backward()
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _record(impl):
    calls = []
    for _, fn, leaves in _every_op_call(impl):
        with _Recorder() as rec:
            _run(fn, leaves)
        calls += rec.calls
    return calls


def test_every_op_is_registered_and_called():
    """Every fastrlhf:: op is reached by the triton path of a public function; the torch path of
    the two log-prob ops goes through theirs too (the loss ops' torch path is plain torch)."""
    triton_ops = {f._opname for f, _, _ in _record("triton")}
    assert triton_ops == set(custom_ops()), set(custom_ops()) ^ triton_ops
    assert {f._opname for f, _, _ in _record("torch")} == {
        "linear_logprob", "linear_logprob_backward", "logprob_from_logits", "logprob_from_logits_backward"}


@pytest.mark.parametrize("impl", [pytest.param(i, marks=pytest.mark.slow) if i == "triton" else i for i in IMPLS])
def test_opcheck_every_call(impl):
    """torch.library.opcheck on each recorded call: schema, fake vs real metadata, autograd
    registration, AOT dispatch with dynamic shapes. A forward op's differentiable inputs keep
    requires_grad; the backward ops are not differentiable (no double backward)."""
    seen = set()
    for func, args, kwargs in _record(impl):
        key = (func._opname, tuple(a.requires_grad if isinstance(a, torch.Tensor) else a for a in args
                                   if not isinstance(a, torch.Tensor) or a.is_floating_point()))
        if key in seen:
            continue
        seen.add(key)
        grad = not func._opname.endswith("_backward")  # no double backward: its inputs are constants
        args = tuple(a.detach().clone().requires_grad_(grad and a.requires_grad) if isinstance(a, torch.Tensor)
                     else a for a in args)
        result = torch.library.opcheck(func, args, kwargs)
        assert set(result.values()) == {"SUCCESS"}, (func, result)
    assert len(seen) >= {"torch": 15, "triton": 30}[impl], len(seen)


@pytest.mark.parametrize("impl", IMPLS)
def test_compile_fullgraph_equals_eager(impl):
    """Each public call compiled whole (dynamo + AOTAutograd, fullgraph=True: a graph break is an
    error) gives eager's loss and gradients."""
    torch._dynamo.reset()
    for name, fn, leaves in _every_op_call(impl):
        want, want_grads = _run(fn, leaves)
        # each case is a closure of one of a few functions: more variants of one than dynamo's default 8
        with torch._dynamo.config.patch(recompile_limit=32):
            got, got_grads = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), leaves)
        assert len(got_grads) == len(want_grads) and (want_grads or name.startswith("gae")), name
        for a, b in zip([got, *got_grads], [want, *want_grads]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def _grpo_loss(h, w, labels, old, adv, mask, impl, validate_labels=None):
    lp, ent = K.linear_logprob(h, w, labels, return_entropy=True, impl=impl, validate_labels=validate_labels)
    loss, m = K.policy_loss(lp, old, adv, mask, entropy=ent, entropy_coef=0.01, ref_logprobs=old.detach(),
                            kl_coef=0.05, impl=impl)
    return loss, m["clipfrac"]


def _grpo_inputs():
    x = _inputs(seed=1)
    h, w = _grad(x["h"], x["w"])
    return h, w, x["labels"], x["old"], x["adv"], x["mask"]


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_loss_compiled_by_inductor(impl):
    """A user's GRPO loss (fused log-probs + entropy, policy loss with KL and entropy bonus) through
    the default backend, inductor: value, metric and both gradients as in eager."""
    torch._dynamo.reset()
    h, w, labels, old, adv, mask = _grpo_inputs()
    loss, clipfrac = _grpo_loss(h, w, labels, old, adv, mask, impl)
    loss.backward()
    want = (loss.detach(), clipfrac, h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    got_loss, got_clip = torch.compile(_grpo_loss, fullgraph=True)(h, w, labels, old, adv, mask, impl)
    got_loss.backward()
    for name, a, b in zip(("loss", "clipfrac", "d hidden", "d weight"), (got_loss.detach(), got_clip,
                                                                         h.grad, w.grad), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_export_keeps_the_ops():
    """torch.export traces the fused ops as single nodes, and the exported program computes eager's
    value."""
    class Head(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(w)

        def forward(self, h, labels, old, adv, mask):
            lp = K.linear_logprob(h, self.weight, labels, impl="torch")
            return K.policy_loss(lp, old, adv, mask, impl="torch")[0]

    h, w, labels, old, adv, mask = _grpo_inputs()
    model = Head(w.detach())
    args = (h.detach(), labels, old, adv, mask)
    ep = torch.export.export(model, args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fastrlhf.linear_logprob.default" in targets, targets
    torch.testing.assert_close(ep.module()(*args), model(*args), rtol=1e-6, atol=1e-6)


def test_label_check_on_in_eager_off_under_compile():
    """The label-range check reads the labels back: on in eager (an out-of-range label is named),
    off when asked, skipped under torch.compile (no graph break); validate_labels=True forces it,
    which under fullgraph=True compile is refused as the graph break it is."""
    h, w, labels, old, adv, mask = _grpo_inputs()
    bad = labels.clone()
    bad[1, 2] = w.shape[0]
    with pytest.raises(ValueError, match=r"labels out of range \[0, 37\) at index \(1, 2\): 37"):
        K.linear_logprob(h, w, bad, impl="triton")
    K.linear_logprob(h, w, bad, impl="triton", validate_labels=False)  # the caller vouches for them
    with pytest.raises(ValueError, match="out of range"):
        K.logprob_from_logits(torch.randn(3, 5, 37), bad)
    torch._dynamo.reset()
    compiled = torch.compile(_grpo_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h, w, labels, old, adv, mask, "triton")[0],
                               _grpo_loss(h, w, labels, old, adv, mask, "triton")[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|Unsupported"):
        compiled(h, w, labels, old, adv, mask, "triton", True)


def test_a_top_level_kernels_import_is_the_same_module(tmp_path):
    """From a checkout's root `kernels` is importable as a top-level package, and transformers
    imports that name when it probes for the Hub's `kernels`: it must get fastrlhf.kernels itself
    (a second copy re-registered every custom op, and the first registration's handles dangled:
    random segfaults and bad_alloc in op calls), and no version, so transformers does not take it
    for the Hub package."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels, fastrlhf.kernels as k, torch; "
            "from transformers.utils import import_utils as u; "
            "print(kernels is k, u.is_kernels_available(), "
            "','.join(sorted(n for n in dir(torch.ops.fastrlhf) if not n.startswith('_') and n != 'name')))")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.split() == ["True", "False", ",".join(sorted(custom_ops()))], out.stdout + out.stderr
