"""Online RL pieces: completion rows, micro-batch loss shares, importance weights, rewards and
their failures, REINFORCE++ returns, the adaptive KL controller, the state swapper, and the
rollout engines' sampling log-probs against the trainer's."""

import math
import random
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf import data, models
from fastrlhf.algos import batch as batch_mod
from fastrlhf.algos import grpo, online, ppo, update
from fastrlhf.kernels import policy_loss
from fastrlhf.memory import StateSwapper, training_state, tensor_bytes
from fastrlhf.rollout import Colocated, Sample
from fastrlhf.rollout.hf import HFEngine
from fastrlhf.tasks import arithmetic as ar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _sample(p, c, lp=None, i=0):
    return Sample(i, list(p), list(c), lp or [0.0] * len(c), "stop")


def test_completion_rows_put_each_completion_in_its_row():
    samples = [_sample([1, 5, 6], [7, 8, 2]), _sample([1, 4], [9, 2]), _sample([1, 5, 5, 5], [2])]
    mb = batch_mod.micro_batches(samples, [0, 1, 2], 64, "cpu")[0]
    # value at every position = its position index: rows must pick the positions whose label
    # is a completion token, i.e. prompt_len - 1 ... len - 2 of each sequence
    vals = torch.arange(mb.inputs["input_ids"].shape[1], dtype=torch.float32)[None]
    r = mb.rows(vals)
    # sequences of 6, 4, 5 tokens start at 0, 6, 10; prompts of 3, 2, 4 tokens
    assert r.tolist() == [[2, 3, 4], [7, 8, 0], [13, 0, 0]]
    assert (mb.T, mb.n_tokens, mb.seq) == (3, 6, [0, 1, 2])
    # the same rows land in the batch's (B, T) layout: a micro-batch's view is an index of it
    b = batch_mod.RolloutBatch.build(samples, "cpu")
    full = b.packed_pass(lambda inputs: vals, 64)
    assert torch.equal(mb.view(full), r) and b.mask.sum(1).tolist() == [3, 2, 1]
    assert torch.equal(b.valid(full), full[b.mask])  # the sync-free flat gather is boolean indexing


def test_micro_batches_follow_the_order_asked_and_split_by_budget():
    samples = [_sample([1] * 5, [2] * 4, i=i) for i in range(5)]  # 9 tokens each
    mbs = batch_mod.micro_batches(samples, [3, 0, 4, 1], 20, "cpu")  # two fit in 20 tokens
    assert [mb.seq for mb in mbs] == [[3, 0], [4, 1]]
    assert [mb.index.tolist() for mb in mbs] == [[3, 0], [4, 1]]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_micro_batch_shares_reproduce_the_minibatch_loss(loss_agg):
    torch.manual_seed(0)
    B, T = 6, 5
    lp = torch.randn(B, T, dtype=torch.float64) * 0.1 - 1
    old = lp + torch.randn(B, T, dtype=torch.float64) * 0.1
    adv = torch.randn(B, dtype=torch.float64)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    kw = dict(loss_agg=loss_agg, max_len=8, impl="torch")
    whole = policy_loss(lp, old, adv, mask, **kw)[0]
    total = 0.0
    samples = [_sample([1], [2] * n) for n in lengths]
    for part in ([0, 1], [2, 3, 4], [5]):  # micro-batches of 2, 3, 1 sequences
        mb = batch_mod.micro_batches(samples, part, 64, "cpu")[0]
        assert mb.seq == part
        m = mb.view(mask)  # each micro-batch is padded to its own longest
        loss = policy_loss(mb.view(lp), mb.view(old), adv[part], m, **kw)[0]
        total += loss * mb.loss_fraction(loss_agg, sum(lengths), B)
    assert total.item() == pytest.approx(whole.item(), rel=1e-6)


def test_importance_weights_are_truncated_ratios():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.0, -1.5, -3.0]])  # ratios 1, e^0.5 = 1.65, e^2 = 7.4
    w, raw, dropped = update.importance_weights(old, sampler, torch.ones(1, 3, dtype=torch.bool), cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, math.exp(0.5), 2.0])
    assert raw[0].tolist() == pytest.approx([1.0, math.exp(0.5), math.exp(2.0)]) and not dropped.any()


def test_masked_and_sequence_level_importance_weights_by_hand():
    """TRL's four vllm_importance_sampling_mode values, derived by hand. Row 0 log-ratios
    [0, 0.5, (masked: 9)], row 1 [-2, 0.1, 0.2]: token ratios e^0, e^.5 | e^-2, e^.1, e^.2;
    sequence ratios e^0.5 (row 0) and e^-1.7 (row 1)."""
    sampler = torch.zeros(2, 3)
    old = torch.tensor([[0.0, 0.5, 9.0], [-2.0, 0.1, 0.2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    e = math.exp
    kw = dict(cap=1.5, floor=0.5)
    w, _, dropped = update.importance_weights(old, sampler, mask, mode="mask", **kw)  # token_mask
    assert w.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, e(0.1), e(0.2)])
    assert dropped.tolist() == [[False, True, False], [True, False, False]]
    w, _, _ = update.importance_weights(old, sampler, mask, mode="truncate", **kw)  # token_truncate
    assert w[mask].tolist() == pytest.approx([1.0, 1.5, 0.5, e(0.1), e(0.2)])
    w, raw, dropped = update.importance_weights(old, sampler, mask, mode="mask", level="sequence", **kw)
    assert raw[:, 0].tolist() == pytest.approx([e(0.5), e(-1.7)])  # the masked 9 does not count
    assert w[mask].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0])  # e^.5 > 1.5, e^-1.7 < 0.5: both dropped
    assert dropped.sum() == 5
    w, _, _ = update.importance_weights(old, sampler, mask, mode="truncate", level="sequence", **kw)
    assert w[mask].tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5, 0.5])


def _bad_reward(prompt, response, answer, **_):
    if response == "1":
        raise RuntimeError("judge crashed")
    return float("nan") if response == "2" else float(response == answer)


def test_failed_rewards_are_counted_imputed_and_not_trained_on():
    tok = ar.build_tokenizer()
    prompts = [online.Prompt({"prompt": "1+2=", "answer": "3"}, tok("1+2=")["input_ids"])]
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    group = [_sample(prompts[0].ids, ids(r)) for r in ("3", "1", "2", "4")]
    counters = {}
    online.RewardFunction("tests.trainer.test_online:_bad_reward")(group, prompts, tok, counters)
    assert counters == {"reward_failures": 2}
    assert "judge crashed" in group[1].info["failed"] and "nan" in group[2].info["failed"]
    online.impute_failed([group])
    assert [s.reward for s in group] == [1.0, 0.5, 0.5, 0.0]  # the failed ones get the valid mean


class _ScriptedEngine:
    """Returns fixed completions: greedy -> "12", samples -> "12", "12", "13", "</s>" (3 of 4 right
    on the first prompt, whose answer is 12), recording the sampling settings it was asked for."""

    name = "scripted"

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, []

    def update_weights(self, named):
        list(named)

    def wake_up(self, tags=None):
        pass

    def sleep(self):
        pass

    def generate(self, prompt_ids, *, n, temperature, max_tokens, seed, top_p=1.0, indices=None):
        self.calls.append((n, temperature))
        texts = ["12"] if temperature == 0 else ["12", "12", "13", ""]
        ids = lambda t: self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]  # noqa: E731
        return [[Sample(i, p, ids(t), [0.0] * len(ids(t)), "stop") for t in texts] for i, p in enumerate(prompt_ids)]


def test_evaluate_reports_greedy_and_sampled_accuracy(tiny):
    _, model, tok = tiny
    heldout = [online.Prompt({"prompt": "5+7=", "answer": "12"}, tok("5+7=")["input_ids"]),
               online.Prompt({"prompt": "6+7=", "answer": "13"}, tok("6+7=")["input_ids"])]
    engine = _ScriptedEngine(tok)
    res = online.evaluate(Colocated(engine, model), heldout, tok, max_new_tokens=4)
    assert res["eval/accuracy"] == 0.5  # greedy "12": right for the first prompt only
    assert res["eval/sample_accuracy"] == 3 / 8  # 2 of 4 right on the first, 1 of 4 on the second
    assert engine.calls == [(1, 0.0), (ar.EVAL_SAMPLES, 1.0)]
    # with a scorer: the greedy completions' mean score, and the draws' (prompts without answers too)

    def length(samples, prompts, counters):
        for s in samples:
            s.reward = float(len(s.completion_ids))

    res = online.evaluate(Colocated(_ScriptedEngine(tok), model), heldout, tok, max_new_tokens=4, scorer=length)
    assert res["eval/reward"] == 3  # greedy "12" + EOS on both prompts
    assert res["eval/sample_reward"] == (3 + 3 + 3 + 1) / 4  # "12", "12", "13" (+ EOS) and "" (EOS alone)
    bare = [online.Prompt({"prompt": "5+7="}, tok("5+7=")["input_ids"])]
    res = online.evaluate(Colocated(_ScriptedEngine(tok), model), bare, tok, max_new_tokens=4, scorer=length)
    assert set(res) == {"eval/reward", "eval/sample_reward"}


class _Recorder:
    """An engine and a state swapper that write down every call, in order."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def offload(self):
        self.calls.append("offload")
        return {}

    def onload(self):
        self.calls.append("onload")
        return {}

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up:{','.join(tags or ['all'])}")

    def update_weights(self, named):
        self.calls.append(f"update_weights:{len(list(named))}")

    def sleep(self):
        self.calls.append("sleep")

    def generate(self, prompt_ids, *, n, temperature, max_tokens, seed, top_p=1.0, indices=None):
        self.calls.append("generate")
        return [[Sample(i, p, [2], [0.0], "stop") for _ in range(n)] for i, p in enumerate(prompt_ids)]


def test_rollouts_and_evaluations_go_through_the_same_phase_switch(tiny):
    """An evaluation used to push and generate with the training state still on the device and
    without putting vLLM back to sleep (an OOM on a GPU that CPU CI cannot see)."""
    _, model, tok = tiny
    rec = _Recorder()
    colocated = Colocated(rec, model, [rec])
    prompts = [online.Prompt({"prompt": "1+2=", "answer": "3"}, tok("1+2=")["input_ids"])]
    cfg = grpo.GRPOConfig(group_size=2, max_new_tokens=4, max_len=64)
    n_params = len(list(model.parameters()))
    phase = ["offload", "wake_up:weights", f"update_weights:{n_params}", "wake_up:kv_cache"]
    online.rollout(colocated, prompts, cfg, step=0)
    assert rec.calls == phase + ["generate", "sleep", "onload"]
    rec.calls.clear()
    online.evaluate(colocated, prompts, tok, max_new_tokens=4)  # greedy and sampled: two generates
    assert rec.calls == phase + ["generate", "generate", "sleep", "onload"]
    rec.calls.clear()
    with pytest.raises(RuntimeError, match="engine failed"):  # an engine that fails still sleeps, state back
        with colocated.generating():
            raise RuntimeError("engine failed")
    assert rec.calls == phase + ["sleep", "onload"]


def test_reward_function_spec_errors():
    fn = online.RewardFunction("fastrlhf.tasks.arithmetic:exact_match")
    assert fn.fn is ar.exact_match and not fn.batched
    with pytest.raises(ValueError, match="expected 'module:function'"):
        online.RewardFunction("exact_match")
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        online.RewardFunction("fastrlhf.tasks.arithmetic:nope")
    with pytest.raises(ValueError, match="no such file"):
        online.RewardFunction("missing/reward.py:score")


def test_reinforce_pp_returns_by_hand():
    cfg = grpo.GRPOConfig(advantage="reinforce_pp", kl_coef=0.5, gamma=1.0)
    samples = [_sample([1], [5, 2]), _sample([1], [6, 7, 2])]
    samples[0].reward, samples[1].reward = 1.0, 0.0
    b = batch_mod.RolloutBatch.build(samples, "cpu")
    b.old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    b.ref = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -0.5, -1.0]])
    adv = grpo.advantages(cfg, b)
    # k1 = old - ref: [0.5, 0] and [0, -0.5, 0]; token rewards -0.5 * k1 (+ score at the end):
    # [-0.25, 1] and [0, 0.25, 0]; returns (gamma 1) [0.75, 1] and [0.25, 0.25, 0]
    ret = torch.tensor([0.75, 1.0, 0.25, 0.25, 0.0])
    expect = (ret - ret.mean()) / ret.std()
    assert adv[b.mask].tolist() == pytest.approx(expect.tolist(), abs=1e-6)
    assert adv[0, 2] == 0  # 0 beyond the completion


def test_group_advantage_estimators():
    samples = [_sample([1], [2]) for _ in range(4)]
    for s, r in zip(samples, [1.0, 0.0, 0.0, 0.0]):
        s.reward = r
    b = batch_mod.RolloutBatch.build(samples, "cpu")
    a = lambda kind: grpo.advantages(grpo.GRPOConfig(advantage=kind, group_size=4), b)[:, 0].tolist()  # noqa: E731
    std = math.sqrt(0.25)  # unbiased std of [1, 0, 0, 0]: sqrt(0.75 / 3)
    assert a("grpo") == pytest.approx([0.75 / (std + 1e-6), -0.25 / (std + 1e-6)] + [-0.25 / (std + 1e-6)] * 2,
                                      rel=1e-5)
    assert a("dr_grpo") == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert a("rloo") == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])


def test_adaptive_kl_controller():
    cfg = ppo.PPOConfig(kl_target=6.0, kl_horizon=100)
    assert ppo.adapt_kl(0.1, 9.0, cfg, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert ppo.adapt_kl(0.1, 5.4, cfg, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    assert ppo.adapt_kl(0.1, 50.0, ppo.PPOConfig(kl_target=0.0), 10) == 0.1  # fixed beta


def test_state_swapper_accounts_for_the_training_state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sw = StateSwapper(model, opt, "cpu")
    # 15 parameters: weights 4 + grads 4 + AdamW exp_avg 4 + exp_avg_sq 4 bytes each, + 2 step counters
    assert sw.state_mb() * 2**20 == 15 * 16 + 2 * 4
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    stats = sw.offload()
    assert model.weight.grad is None  # gradients are freed for generation
    assert stats["memory/train_state_device_mb_during_generate"] == 0.0  # nothing on an accelerator
    sw.onload()
    for k, v in opt.state[model.weight].items():
        assert torch.equal(v, before[k])
    assert tensor_bytes(training_state(model, opt), "cuda") == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = ar.save_base_model(tmp_path_factory.mktemp("online") / "base", **ar.MODEL_SIZES["tiny"])
    return d, models.load_causal_lm(d), models.load_tokenizer(d)


def test_hf_engine_logprobs_match_the_trainer(tiny):
    _, model, tok = tiny
    prompts = [tok(p)["input_ids"] for p in ("1+2=", "37+58=", "5+46=")]  # lengths differ: left padding
    groups = HFEngine(model, tok).generate(prompts, n=3, temperature=0.7, max_tokens=5, seed=0)
    samples = [s for g in groups for s in g]
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len(s.completion_ids) == len(s.logprobs) > 0 for s in samples)
    assert all((s.completion_ids[-1] == tok.eos_token_id) == (s.finish_reason == "stop") for s in samples)
    b = batch_mod.RolloutBatch.build(samples, "cpu")
    assert b.sampler_gap(b.logprobs(model, 256, 0.7)).item() < 1e-4


@pytest.mark.vllm
def test_vllm_engine_push_and_logprobs(tiny, tmp_path):
    pytest.importorskip("vllm")
    from fastrlhf.rollout.vllm import VLLMEngine

    d, model, tok = tiny
    engine = VLLMEngine(d, device="cpu", dtype=torch.float32, max_model_len=32, seed=0,
                        gpu_memory_utilization=0.05, enforce_eager=True)
    prompts = [tok(p)["input_ids"] for p in ("1+2=", "37+58=")]
    before = engine.generate(prompts, n=4, temperature=1.0, max_tokens=6, seed=1)
    # change the policy, push it in place: the sampler's log-probs must follow the new weights
    trained = models.load_causal_lm(d)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with Colocated(engine, trained).generating() as gen:  # wake, push in place, generate, sleep
        after = gen.generate(prompts, n=4, temperature=1.0, max_tokens=6, seed=1)
    samples = [s for g in after for s in g]
    b = batch_mod.RolloutBatch.build(samples, "cpu")
    diff_new = b.sampler_gap(b.logprobs(trained, 256, 1.0)).item()
    diff_old = b.sampler_gap(b.logprobs(model, 256, 1.0)).item()
    assert diff_new < 1e-3 < diff_old
    assert [s.completion_ids for g in before for s in g] != [s.completion_ids for s in samples]


@pytest.mark.vllm
def test_vllm_generates_more_prompt_tokens_than_a_scheduler_step_holds(tmp_path, monkeypatch):
    """Realistic prompt lengths and request counts: 64 chat prompts of ~70 tokens x 4 samples is 18k
    prompt tokens, over the CPU backend's 4096-token step budget. With chunked prefill (vLLM's
    default) a prompt split over steps rewinds its seeded generator, which CPU generators cannot:
    "CPU Generator does not use offset" (SmolLM2's held-out evaluation, 48 prompts x 4, failed
    so). Every sample must come back, and its log-probs must be the trainer's."""
    pytest.importorskip("vllm")
    from fastrlhf.rollout.vllm import VLLMEngine
    from tests import archs

    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")  # 20k tokens: the interpreter would take minutes

    d = archs.save_arch("llama", tmp_path / "llama")
    tok, model = models.load_tokenizer(d), models.load_causal_lm(d)
    rng = random.Random(0)
    prompts = [data.prompt_ids(tok, [{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user",
                                      "content": " ".join(rng.choice(archs._WORDS) for _ in range(40))}])
               for _ in range(64)]
    assert sum(map(len, prompts)) * 4 > 4096 and min(map(len, prompts)) > 40
    engine = VLLMEngine(d, device="cpu", dtype=torch.float32, max_model_len=256, seed=0,
                        gpu_memory_utilization=0.05, enforce_eager=True)
    groups = engine.generate(prompts, n=4, temperature=1.0, max_tokens=12, seed=3)
    samples = [s for g in groups for s in g]
    assert len(samples) == 256 and all(s.completion_ids for s in samples)
    assert [s.prompt_ids for g in groups for s in g[:1]] == prompts
    b = batch_mod.RolloutBatch.build(samples, "cpu")
    assert b.sampler_gap(b.logprobs(model, 4096, 1.0)).item() < 1e-3


def test_vllm_start_failures_say_which_setting_to_change():
    from fastrlhf.rollout.vllm import _start_hint

    # the message vLLM's CPU worker raised here when the KV cache did not fit
    kv = ValueError("Available memory on node 0 (19.94/23.54 GiB) on kv cache allocation is less than "
                    "requested memory for kv (-0.04/3.53 GiB). Reduce CPU memory used by other processes.")
    assert "raise gpu_memory_utilization" in _start_hint(kv, 0.15) and "0.15" in _start_hint(kv, 0.15)
    # what vLLM 0.32's CPU backend raises at the first generate for head_dim 16
    head = RuntimeError("Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0")
    assert "head_dim >= 32" in _start_hint(head, 0.3)
    assert "engine=hf" in _start_hint(RuntimeError("something else"), 0.3)


def test_vllm_cpu_head_dim_is_checked_before_training(tmp_path):
    from fastrlhf.rollout import EngineError
    from fastrlhf.rollout.vllm import _check_cpu_head_dim

    small_heads = ar.save_base_model(tmp_path / "hd16", hidden_size=64, layers=1, heads=4)
    with pytest.raises(EngineError, match="head_dim=16"):
        _check_cpu_head_dim(small_heads)
    _check_cpu_head_dim(ar.save_base_model(tmp_path / "hd64", hidden_size=128, layers=1, heads=2))
