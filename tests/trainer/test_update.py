"""The online step's tensors and update: the rollout batch stays on the training device (KL,
GRPO's group advantages, REINFORCE++'s and PPO's GAE run there: shown on `meta`, where a tensor
taken to the host or mixed with a host tensor fails), and the shared update reads values back
to the host once per optimiser step (every .item() / .tolist() / float() / int() / bool() on a
tensor from fastrlhf's own code and kernels is counted, the kernels taking their accelerator
path), with the same result as the eager formula."""

import sys
from pathlib import Path

import pytest
import torch

import fastrlhf
import fastrlhf.kernels
import fastrlhf.kernels._common as kernel_common
from fastrlhf import models, optim
from fastrlhf.algos import grpo, ppo
from fastrlhf.algos.batch import RolloutBatch
from fastrlhf.algos.update import update
from fastrlhf.logs import DeviceMetrics
from fastrlhf.rollout import Sample
from fastrlhf.tasks import arithmetic as ar

OURS = (str(Path(fastrlhf.__file__).parent), str(Path(fastrlhf.kernels.__file__).parent))
READ_BACKS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def read_backs(monkeypatch):
    """Every tensor -> host read-back made by our code: [(method, file, line)]."""
    calls = []
    for name in READ_BACKS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(OURS):
                calls.append((_name, Path(frame.f_code.co_filename).name, frame.f_lineno))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(kernel_common, "on_host", lambda t: False)  # the kernels' accelerator path
    return calls


def _samples(tok, n: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a, b = torch.randint(0, 99, (2,), generator=g).tolist()
        prompt = tok(f"{a}+{b}=")["input_ids"]
        length = int(torch.randint(1, 5, (1,), generator=g))
        completion = torch.randint(4, len(ar.VOCAB), (length,), generator=g).tolist()
        out.append(Sample(i // 4, prompt, completion, [0.0] * length, "stop", reward=float(i % 3 == 0)))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = ar.save_base_model(tmp_path_factory.mktemp("update") / "base", **ar.MODEL_SIZES["tiny"])
    return d, models.load_tokenizer(d)


def _grpo_step(tiny, **overrides):
    d, tok = tiny
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=8, max_len=64, tokens_per_micro_batch=40, ppo_epochs=2,
                          minibatches=2, kl_coef=0.1, lr=1e-3, device="cpu", **overrides)
    torch.manual_seed(0)
    policy, ref = models.load_trained(d, cfg, "cpu"), models.load_frozen(d, device="cpu", dtype=torch.float32)
    samples = _samples(tok, 16)
    batch = RolloutBatch.build(samples, "cpu", train=list(range(16)))
    with torch.no_grad():
        lp = batch.logprobs(policy, 40, 1.0)
    for s, row, n in zip(samples, lp, batch.lengths):  # the sampler's log-probs: the trainer's, a little off
        s.logprobs = (row[:n] + 0.01).tolist()
    batch = RolloutBatch.build(samples, "cpu", train=list(range(16)))
    batch.old, batch.ref = batch.logprobs(policy, 40, 1.0), batch.logprobs(ref, 40, 1.0)
    batch.advantages = grpo.advantages(cfg, batch)
    opt = optim.make_optimizer(policy.parameters(), cfg.lr, 0.0)
    sched = optim.make_schedule(opt, 0, 10, "constant")
    return cfg, policy, opt, sched, batch


def test_the_update_reads_back_once_per_optimiser_step(tiny, read_backs):
    cfg, policy, opt, sched, batch = _grpo_step(tiny)
    stats = DeviceMetrics()
    stats.maximum("rollout/logprob_diff_max", batch.sampler_gap(batch.old))
    assert len(batch.micro_batches(list(range(8)), cfg.tokens_per_micro_batch)) > 1  # several per minibatch
    before = [p.detach().clone() for p in policy.parameters()]
    read_backs.clear()
    metrics = update(cfg, batch, policy, opt, sched, optim.Precision("float32", "cpu"), {}, stats,
                     seed=0, kl_coef=cfg.kl_coef)
    steps = cfg.ppo_epochs * cfg.minibatches
    assert stats.syncs == steps
    assert [c[:2] for c in read_backs] == [("tolist", "logs.py")] * steps, read_backs
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))  # it did train
    for key in ("loss/policy", "clipfrac", "ratio_mean", "approx_kl", "kl", "entropy", "grad_norm"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert stats.values["rollout/logprob_diff_max"] == pytest.approx(0.01, abs=1e-4)


@pytest.mark.parametrize("variant", [{}, {"surrogate": "cispo", "ratio_level": "sequence"},
                                     {"surrogate": "sapo", "sapo_tau_pos": 0.8, "sapo_tau_neg": 2.0}],
                         ids=["clip", "cispo-seq", "sapo"])
def test_the_update_equals_the_minibatch_loss_written_out(tiny, monkeypatch, variant):
    """One epoch, one minibatch over several micro-batches: the accumulated gradient is the
    gradient of policy_loss over the whole batch at once (the micro-batch shares sum it back)."""
    from fastrlhf.kernels import policy_loss

    cfg, policy, opt, sched, batch = _grpo_step(tiny, loss_agg="seq-mean-token-mean", **variant)
    cfg.ppo_epochs = cfg.minibatches = 1  # on-policy: old = the forward's own
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # keeps the weights: compare the gradients
    grads = {}
    real_step = optim.apply_step

    def keep_grads(opt_, *a, **k):
        grads.update({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
        return real_step(opt_, *a, **k)

    monkeypatch.setattr(optim, "apply_step", keep_grads)
    metrics = update(cfg, batch, policy, opt, sched, optim.Precision("float32", "cpu"), {}, DeviceMetrics(), seed=0,
                     kl_coef=cfg.kl_coef)
    policy.zero_grad()
    mb = batch.micro_batches(list(range(16)), 10_000)[0]  # the whole batch in one forward
    lp, ent = models.token_logprobs(policy, mb.inputs, temperature=1.0, return_entropy=True)
    lp, ent = mb.rows(lp), mb.rows(ent)
    loss, _ = policy_loss(lp, lp.detach(), mb.view(batch.advantages), mb.view(batch.mask),
                          ref_logprobs=mb.view(batch.ref),
                          kl_coef=cfg.kl_coef, entropy=ent,
                          is_weights=torch.exp(lp.detach() - mb.view(batch.sampler)).clamp(max=2.0),
                          loss_agg=cfg.loss_agg, **variant)
    loss.backward()
    assert metrics["loss/policy"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)  # cispo's value is -A w log p
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def _meta_batch(tok, monkeypatch, n=8):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")  # the interpreter copies its arguments to the host
    batch = RolloutBatch.build(_samples(tok, n), "meta")
    batch.old, batch.ref = torch.randn(batch.mask.shape, device="meta"), torch.randn(batch.mask.shape, device="meta")
    batch.values = torch.randn(batch.mask.shape, device="meta")
    return batch


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_grpo_advantages_run_on_the_batch_device(tiny, advantage, read_backs, monkeypatch):
    batch = _meta_batch(tiny[1], monkeypatch)
    cfg = grpo.GRPOConfig(advantage=advantage, group_size=4, kl_coef=0.1)
    adv = grpo.advantages(cfg, batch)
    assert adv.device.type == "meta" and adv.shape == batch.mask.shape
    assert read_backs == []


def test_ppo_rewards_and_gae_run_on_the_batch_device(tiny, read_backs, monkeypatch):
    batch = _meta_batch(tiny[1], monkeypatch)
    stats = DeviceMetrics()
    ppo.advantages_and_returns(ppo.PPOConfig(), batch, 0.05, stats)
    assert batch.advantages.device.type == "meta" and batch.returns.device.type == "meta"
    assert stats.syncs == 0 and read_backs == []


def test_ppo_advantages_by_hand():
    """Two samples; on-policy (the KL reward takes the sampler's log-probs)."""
    samples = [Sample(0, [1], [5, 2], [-1.0, -2.0], "stop", reward=1.0),
               Sample(1, [1], [6, 7, 2], [-1.0, -1.0, -1.0], "stop", reward=0.0)]
    batch = RolloutBatch.build(samples, "cpu")
    batch.ref = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -0.5, -1.0]])
    batch.values = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    stats = DeviceMetrics()
    ppo.advantages_and_returns(ppo.PPOConfig(gamma=1.0, lam=1.0), batch, 0.5, stats)
    # k1 = sampler - ref: [0.5, 0] and [0, -0.5, 0]; rewards -0.5 * k1 + score at the end:
    # [-0.25, 1] and [0, 0.25, 0]; gamma = lam = 1: returns = rewards-to-go [0.75, 1], [0.25, 0.25, 0]
    assert batch.returns[batch.mask].tolist() == pytest.approx([0.75, 1.0, 0.25, 0.25, 0.0])
    adv = torch.tensor([0.25, 0.5, 0.25, 0.25, 0.0])  # returns - values
    assert batch.advantages[batch.mask].tolist() == pytest.approx(((adv - adv.mean()) / adv.std()).tolist(), abs=1e-6)
    stats.fetch()
    assert stats.values["kl"] == pytest.approx((0.5 - 0.5) / 2)  # per-sample sums 0.5 and -0.5
