"""The policy update both online trainers run on a RolloutBatch: GRPO's, and PPO's with the
critic beside it.

    for each of ppo_epochs passes, the trained rows shuffled (seeded), in `minibatches` slices:
        for each packed micro-batch of the slice (batch.MicroBatch):
            log-probs and entropy of its completion tokens (linear_logprob, no logits)
            old = the forward's own, detached (on-policy: one epoch, one minibatch) | batch.old
            importance weights against the engine's log-probs (importance_weights: truncated or
            masked, per token or per sequence)
            policy_loss(clip_low, clip_high, dual_clip, [kl_coef * KL to batch.ref], entropy bonus,
                        loss_agg) [+ value_loss of the critic's values against batch.returns]
            backward of the loss times the micro-batch's fraction of the slice (MicroBatch.loss_fraction)
        one optimiser step per model (the policy's skipped during PPO's critic warm-up)

No value is read back to the host inside the micro-batch loop: each optimiser step makes one
read-back (logs.DeviceMetrics.fetch), which brings the finite flag of the slice's losses and the
gradient norms the step needs to decide, together with the metrics summed so far. A slice
whose loss or gradient is not finite is not applied and is counted (optim.apply_step).

Metrics (means over the optimiser steps): loss/policy, clipfrac, approx_kl, ratio_mean,
entropy, kl (with a KL term in the loss), grad_norm (the policy's), and with a critic
loss/value, value/clipfrac, value/mean; on-policy also rollout/logprob_diff_max (the engine's
log-probs against the training forward's, the proof that the pushed weights are the trained ones);
with importance weights rollout/is_ratio_mean, rollout/is_ratio_max (the raw ratios, before
truncating or masking) and rollout/is_masked_frac (the share of tokens a mask dropped).
"""

from __future__ import annotations

import math
import random

import torch

from fastrlhf import dist, models, optim
from fastrlhf.algos.batch import RolloutBatch
from fastrlhf.kernels import policy_loss, value_loss
from fastrlhf.logs import DeviceMetrics

def on_policy(cfg) -> bool:
    """One epoch, one minibatch: the update is exactly on-policy, so the training forward's own
    detached log-probs are the old ones (no extra pass)."""
    return cfg.ppo_epochs == 1 and cfg.minibatches == 1


def importance_weights(old: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, *, cap: float,
                       floor: float = 0.0, mode: str = "truncate", level: str = "token"):
    """Importance weights of the sampled tokens against the sampler (vLLM, other kernels), which
    disagrees slightly with the trainer on log-probs; TRL's vllm_importance_sampling_mode
    (token_truncate | token_mask | sequence_truncate | sequence_mask), verl's rollout correction:
        level token:     r = exp(old - sampler) per token
        level sequence:  r = exp(sum over the sequence's tokens of (old - sampler)), its every token
        mode truncate:   w = clamp(r, floor, cap)          (TIS; floor 0: no lower bound)
        mode mask:       w = r inside [floor, cap], else 0 (MIS: the token or sequence is dropped)
    old, sampler, mask (b, T). Returns (w (b, T), 0 where masked; r (b, T) the raw ratios;
    dropped (b, T) bool: the kept tokens a mask dropped)."""
    d = torch.where(mask, old - sampler, 0.0)  # (b, T)
    if level == "sequence":
        d = d.sum(dim=1, keepdim=True).expand_as(d)
    r = torch.exp(d)
    inside = (r >= floor) & (r <= cap)
    if mode == "mask":
        return torch.where(inside & mask, r, 0.0), r, mask & ~inside
    return torch.where(mask, r.clamp(min=floor, max=cap), 0.0), r, torch.zeros_like(mask)


def update(cfg, batch: RolloutBatch, policy, opt, sched, prec, counters: dict, metrics: DeviceMetrics, *,
           seed: int, kl_coef: float = 0.0, kl_kind: str = "k3", critic=None, critic_opt=None, critic_sched=None,
           train_policy: bool = True) -> dict[str, float]:
    """ppo_epochs x minibatches optimiser steps on batch (see the module docstring); the policy's
    loss has a KL term to batch.ref when kl_coef > 0 (GRPO's KL in the loss); with a critic its
    value loss is added and its optimiser steps too. seed: the minibatch shuffle's. Returns the
    metrics averaged over the optimiser steps; rollout/logprob_diff_max (on-policy) and whatever
    else the caller put in `metrics` are in metrics.values after it."""
    budget, exact, ranks = cfg.tokens_per_micro_batch, on_policy(cfg), dist.world_size()
    n_updates, means = 0, {"loss/policy"}
    slices = []  # (epoch, minibatch) -> this rank's rows; the losses normalise by the global totals
    for epoch in range(cfg.ppo_epochs):
        order = list(batch.train)
        random.Random(seed + epoch).shuffle(order)
        slices += [order[k::cfg.minibatches] for k in range(cfg.minibatches)]
    totals = dist.sum_over_ranks([x for idx in slices for x in (sum(batch.lengths[i] for i in idx), len(idx))])
    for j, idx in enumerate(slices):
        total_tokens, total_rows = int(totals[2 * j]), int(totals[2 * j + 1])
        if not total_rows:  # (on every rank: nothing to train on in this minibatch)
            continue
        finite = []
        for mb in batch.micro_batches(idx, budget):
            mask, sampler = mb.view(batch.mask), mb.view(batch.sampler)
            with torch.set_grad_enabled(train_policy):  # critic warm-up: the policy's loss is only logged
                lp, ent = models.token_logprobs(policy, mb.inputs, temperature=cfg.temperature, return_entropy=True)
                lp, ent = mb.rows(lp), mb.rows(ent)  # (b, T_mb)
                if exact and mb.T:
                    diff = torch.where(mask, (sampler - lp.detach()).abs(), 0.0)
                    metrics.maximum("rollout/logprob_diff_max", diff.max())
                old = lp.detach() if exact else mb.view(batch.old)
                is_w = None
                if cfg.is_cap > 0:
                    is_w, raw, dropped = importance_weights(old, sampler, mask, cap=cfg.is_cap, floor=cfg.is_floor,
                                                            mode=cfg.is_mode, level=cfg.is_level)
                    raw, n_tok = torch.where(mask, raw, 0.0), mask.sum().clamp(min=1)
                    is_frac = mb.loss_fraction("token-mean", total_tokens, total_rows) * mb.weight
                    metrics.add("rollout/is_ratio_mean", raw.sum() / n_tok * is_frac)
                    metrics.add("rollout/is_masked_frac", dropped.sum() / n_tok * is_frac)
                    if mb.T:
                        metrics.maximum("rollout/is_ratio_max", raw.max())
                    means.update(("rollout/is_ratio_mean", "rollout/is_masked_frac"))
                loss, m = policy_loss(lp, old, mb.view(batch.advantages), mask, clip_low=cfg.clip_low,
                                      clip_high=cfg.clip_high, dual_clip=cfg.dual_clip or None,
                                      ref_logprobs=mb.view(batch.ref) if kl_coef else None, kl_coef=kl_coef,
                                      kl_kind=kl_kind, entropy=ent,
                                      entropy_coef=cfg.entropy_coef, is_weights=is_w, loss_agg=cfg.loss_agg,
                                      max_len=cfg.max_new_tokens, surrogate=cfg.surrogate,
                                      ratio_level=cfg.ratio_level, sapo_tau_pos=cfg.sapo_tau_pos,
                                      sapo_tau_neg=cfg.sapo_tau_neg)
            frac = mb.loss_fraction(cfg.loss_agg, total_tokens, total_rows) * mb.weight  # of the global minibatch
            finite.append(torch.isfinite(loss))
            metrics.add("loss/policy", loss.detach() * frac)
            for key, v in m.items():
                if key != "kl" or kl_coef:  # kl: only with a KL term in the loss
                    metrics.add(key, v * frac)
                    means.add(key)
            total = loss * (frac * ranks) if train_policy else None  # (FSDP averages the ranks' gradients)
            if critic is not None:
                v = mb.rows(models.token_values(critic, mb.inputs))
                v_loss, vm = value_loss(v, mb.view(batch.values), mb.view(batch.returns), mask, clip=cfg.value_clip)
                v_frac = mb.loss_fraction("token-mean", total_tokens, total_rows) * mb.weight
                finite.append(torch.isfinite(v_loss))
                metrics.add("loss/value", v_loss.detach() * v_frac)
                metrics.add("value/clipfrac", vm["clipfrac"] * v_frac)
                metrics.add("value/mean", vm["vpred_mean"] * v_frac)
                means.update(("loss/value", "value/clipfrac", "value/mean"))
                v_total = v_loss * (v_frac * ranks)
                total = v_total if total is None else total + v_total  # disjoint parameters: one backward
            if total is not None:
                prec.backward(total)
        # one optimiser step per model, on one read-back: the losses' finite flag and the norms
        norms = [optim.clip_gradients(policy, opt, cfg.grad_clip, prec.scaler) if train_policy else None,
                 optim.clip_gradients(critic, critic_opt, cfg.grad_clip, prec.scaler) if critic is not None else None]
        zero = torch.zeros((), device=batch.device)
        bad = dist.all_reduce_sum((~torch.stack(finite)).sum().float())  # a non-finite loss on any rank
        ok, policy_norm, critic_norm = metrics.fetch(bad == 0, *(zero if n is None else dist.whole(n) for n in norms))
        ok = bool(ok)
        if not ok:
            optim.count_nonfinite_loss(counters)
        if train_policy:  # (one float16 loss scale for both: updated once, after the last step)
            optim.apply_step(opt, sched, counters, policy_norm, ok=ok, scaler=prec.scaler,
                             update_scaler=critic is None)
            metrics.values["grad_norm"] = metrics.values.get("grad_norm", 0.0) + (policy_norm if ok else math.nan)
            means.add("grad_norm")
        if critic is not None:
            optim.apply_step(critic_opt, critic_sched, {}, critic_norm, ok=ok, scaler=prec.scaler)
        n_updates += 1
    metrics.fetch()  # whatever is still pending (no update at all: every sample filtered out)
    out = {k: metrics.values[k] / max(1, n_updates) for k in sorted(means) if k in metrics.values}
    if "rollout/is_ratio_max" in metrics.values:  # a maximum over the whole update, not a mean
        out["rollout/is_ratio_max"] = metrics.values["rollout/is_ratio_max"]
    return out
