"""PPO with a critic, as in the RLHF papers (Ziegler et al. 2019, InstructGPT):

  - the policy starts from the SFT model, which also stays frozen as the reference;
  - per sample, the reward model's score (models.sequence_rewards) or a Python reward function's;
  - per-token rewards  r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t))  (the KL penalty, k1)
    with the score added at the last completion token (token_rewards with a logprob reward
    model: each token's own beta_rm * log p_rm(y_t) added at that token, a process reward that
    sums to the same score); beta fixed, or adapted towards kl_target (Ziegler's proportional
    controller, horizon kl_horizon samples);
  - a critic (scalar head; initialised from the reward model when one is given, as OpenRLHF
    does, else from the policy with a zero head) gives V(s_t) at every completion position;
    GAE(gamma, lam) -> advantages (whitened over the batch) and returns;
  - ppo_epochs passes over `minibatches` minibatches: the clipped policy loss and the clipped
    value loss (fastrlhf.kernels.policy_loss / value_loss), two AdamW optimisers; during the
    first `critic_warmup` steps only the critic learns (as verl's critic_warmup), so that the
    policy's first updates get per-token credit from a critic that has seen the rewards;
  - the same rollout engines, weight push, memory swapping and importance weights against the
    sampler's log-probs as grpo.py.
Old log-probs: with one epoch and one minibatch (on_policy) the update is exactly on-policy, so no
separate pass recomputes them: the KL reward uses the sampler's log-probs of the same weights (as
verl's bypass mode; rollout/logprob_diff_max measures how far they are from the trainer's) and the
ratio's denominator is the training forward's own detached log-probs (ratio 1, as grpo.py).

Logged every step: everything grpo.py logs, plus loss/value, value/clipfrac, value/mean,
kl_coef, reward/kl_penalty (beta * the summed per-token KL of a sample, batch mean; reward/mean
is the score before it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastrlhf import checkpoints, config, dist, files, logs, models, optim, runtime
from fastrlhf.algos import online
from fastrlhf.algos.batch import RolloutBatch
from fastrlhf.algos.update import on_policy, update
from fastrlhf.kernels import gae, kl_penalty
from fastrlhf.logs import DeviceMetrics
from fastrlhf.memory import StateSwapper
from fastrlhf.rollout import Colocated, make_engine
from fastrlhf.task import Task


@dataclass
class PPOConfig(config.RolloutFields, config.LoraFields, config.OptimFields, config.RunFields):
    """fastrlhf ppo: PPO with a critic against a reward model, KL penalty to the SFT reference."""

    output_dir: str = config.override(config.RunFields, "output_dir", "runs/ppo")
    prompts_per_step: int = config.override(config.RolloutFields, "prompts_per_step", 64)
    group_size: int = config.override(config.RolloutFields, "group_size", 1)
    ppo_epochs: int = config.override(config.RolloutFields, "ppo_epochs", 2)
    minibatches: int = config.override(config.RolloutFields, "minibatches", 2)
    token_rewards: bool = config.arg(False, "logprob reward model: each completion token's beta * log p is its own "
                                            "reward (a process reward), not their sum at the last token")
    critic: str = config.arg("", "critic initialisation; empty: the reward model, else the policy with a zero head")
    gamma: float = config.arg(1.0, "discount")
    lam: float = config.arg(0.95, "GAE lambda")
    value_clip: float = config.arg(0.2, "value clip around the old values")
    kl_coef: float = config.arg(0.05, "beta: per-token KL penalty in the reward (initial value when adaptive)")
    kl_target: float = config.arg(0.0, "adaptive beta towards this KL per sample (0: fixed beta)")
    kl_horizon: int = config.arg(10000, "adaptive KL controller horizon in samples")
    critic_lr: float = config.arg(1e-5, "critic learning rate")
    critic_warmup: int = config.arg(0, "first steps train only the critic, so the policy's first update has "
                                       "informed advantages")


def adapt_kl(beta: float, kl: float, cfg: PPOConfig, n: int) -> float:
    """Ziegler et al.'s adaptive controller: beta *= 1 + clip(kl / target - 1, +-0.2) * n / horizon."""
    if cfg.kl_target <= 0:
        return beta
    err = max(-0.2, min(0.2, kl / cfg.kl_target - 1))
    return beta * (1 + err * n / cfg.kl_horizon)


def advantages_and_returns(cfg: PPOConfig, batch: RolloutBatch, beta: float, stats: DeviceMetrics) -> None:
    """Per-token rewards -beta * KL(old || ref) (k1) plus the score at the last completion token
    (or a process reward's own per-token rewards), GAE with the critic's values, advantages
    whitened over the batch: fills batch.advantages and batch.returns, on the batch's device;
    stats gets kl (the summed per-token KL of a sample, batch mean) and value/explained_var."""
    mask = batch.mask
    old = batch.sampler if batch.old is None else batch.old  # on-policy: the sampler's, of the same weights
    kl = kl_penalty(old, batch.ref, kind="k1") * mask  # (B, T)
    rewards = -beta * kl
    if batch.token_rewards is not None:
        rewards += batch.token_rewards * mask
    else:
        rewards[torch.arange(len(batch.samples), device=batch.device), batch.last] += batch.scores
    adv, returns = gae(rewards, batch.values, mask, gamma=cfg.gamma, lam=cfg.lam)
    mean, std = batch.whitening(adv)  # over every rank's tokens
    stats.set("value/explained_var", 1 - batch.variance(returns - batch.values) / (batch.variance(returns) + 1e-8))
    stats.set("kl", batch.sample_mean(kl.sum(1)))  # the summed per-token KL of a sample, batch mean
    batch.advantages = (adv - mean) / (std + 1e-8) * mask
    batch.returns = returns


def train(cfg: PPOConfig, task: Task) -> dict:
    online.check_processes(cfg)
    reward_fn = online.resolve_reward(cfg, task)  # before anything is loaded: a missing reward is an error
    out, device, prec = runtime.begin(cfg)
    counters: dict = {}

    # step 1: policy and critic (float32 master weights), reference and reward model (frozen, in
    # the compute dtype), prompts, engine
    # the prompts first: a data error stops the run before the built-in base model is written
    tokenizer = models.load_tokenizer(cfg.model) if cfg.model else task.tokenizer()
    prompts, heldout = online.load_prompt_sets(cfg, task, tokenizer, counters)
    model_dir = runtime.start_model(cfg, task, out)
    ckpt = checkpoints.resume_checkpoint(cfg, out)
    hf_ckpt = checkpoints.weights(ckpt)  # None: no checkpoint, or shards (loaded with the optimisers)
    model = models.load_trained(model_dir, cfg, device, ckpt=hf_ckpt)
    models.check_max_len(model, cfg.max_len)
    ref = models.reference(model, model_dir, device=device, dtype=prec.dtype)
    critic_ckpt = hf_ckpt / "critic" if hf_ckpt else None
    critic = models.load_trained(cfg.critic or cfg.reward_model or model_dir, cfg, device, ckpt=critic_ckpt, value=True)
    rm = models.load_reward_model(cfg.reward_model, device=device, dtype=prec.dtype) if cfg.reward_model else None
    if cfg.token_rewards and (rm is None or rm.config.reward_head != "logprob"):
        raise ValueError("token_rewards needs a logprob reward model (fastrlhf rm --head logprob); "
                         f"reward_model={cfg.reward_model!r}")
    scorer = online.make_scorer(reward_fn, rm, tokenizer, cfg.tokens_per_micro_batch, device)
    engine = make_engine(cfg.engine, model_dir=model_dir, policy=model, tokenizer=tokenizer, dtype=prec.dtype,
                         max_model_len=cfg.max_len, seed=cfg.seed,
                         gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                         tp=cfg.rollout_tp)
    config.save_config(cfg, out)

    # step 2: two optimisers, resume, state swappers
    critic_opt = optim.make_optimizer(critic.parameters(), cfg.critic_lr, cfg.weight_decay)
    critic_sched = optim.make_schedule(critic_opt, cfg.warmup_steps, cfg.steps, cfg.schedule)
    opt, sched, state, log = runtime.optimisation(cfg, model, out, cfg.steps, ckpt, "ppo", head_lr=cfg.head_lr,
                                                  critic=(critic, critic_opt, critic_sched))
    step, counters = state["step"], {**counters, **state["counters"]}
    beta = state.get("kl_coef", cfg.kl_coef)
    swappers = [StateSwapper(model, opt, device, offload_params=cfg.offload_params),
                StateSwapper(critic, critic_opt, device, offload_params=cfg.offload_params)]
    colocated = Colocated(engine, model, swappers)  # every generation, rollouts and evaluations, goes through it
    samples_log = logs.SampleLog(out, resume_step=step if ckpt else None)

    with colocated, prec.autocast():  # the engine is released at the end, or on an error
        summary = online.start_evaluation(colocated, heldout, tokenizer, cfg, scorer, log) if step == 0 \
            else state["summary"]
        while step < cfg.steps:
            t_step = time.perf_counter()
            # step 3: generate with the current weights (training state off the device meanwhile)
            all_p = online.step_prompts(prompts, cfg, step)
            mine = dist.share(list(range(len(all_p))))  # sharded: this rank's prompts
            step_p = [all_p[i] for i in mine]
            groups, phase = online.rollout(colocated, step_p, cfg, step, indices=mine)
            samples = [s for g in groups for s in g if s.completion_ids]

            # step 4: scores (the reward model's, per sequence or per token; or the function's)
            t0 = time.perf_counter()
            budget = cfg.tokens_per_micro_batch
            if rm is not None and cfg.token_rewards:  # a process reward: beta_rm * log p_rm(y_t) per token
                logged = online.sample_rows(samples, step_p, tokenizer, cfg.log_samples)
                batch = RolloutBatch.build(samples, device)
                batch.token_rewards = batch.reward_tokens(rm, budget)
                batch.scores = batch.token_rewards.sum(1)
                for s, r in zip(samples, batch.scores.tolist()):  # the scores, on the host for the log
                    s.reward = r
            else:
                scorer(samples, step_p, counters)
                logged = online.sample_rows(samples, step_p, tokenizer, cfg.log_samples)
                samples = [s for s in samples if "failed" not in s.info]
                batch = RolloutBatch.build(samples, device)

            # step 5: the rollout batch: old / reference log-probs, values; KL-penalised token
            # rewards; GAE (all on the device)
            if not on_policy(cfg):
                batch.old = batch.logprobs(model, budget, cfg.temperature)
            batch.ref = batch.logprobs(ref, budget, cfg.temperature)
            batch.values = batch.critic_values(critic, budget)
            stats = DeviceMetrics()  # read back once per optimiser step, by the update
            advantages_and_returns(cfg, batch, beta, stats)
            if not on_policy(cfg):  # on-policy: the update measures it against the training forward
                stats.maximum("rollout/logprob_diff_max", batch.sampler_gap(batch.old))

            # step 6: PPO epochs over minibatches: policy and critic
            model.train()
            critic.train()
            metrics = update(cfg, batch, model, opt, sched, prec, counters, stats,
                             seed=cfg.seed * 7919 + step * 31, critic=critic, critic_opt=critic_opt,
                             critic_sched=critic_sched, train_policy=step >= cfg.critic_warmup)
            train_s = time.perf_counter() - t0
            step += 1

            # step 7: adapt beta, log, evaluate, checkpoint
            kl_per_sample = stats.values["kl"]
            rollout = online.rollout_stats(samples)
            metrics.update({
                "rollout/engine": colocated.name, "reward/mean": online.global_stats([s.reward for s in samples])[0],
                "reward/kl_penalty": beta * kl_per_sample, "kl": kl_per_sample, "kl_coef": beta,
                "value/explained_var": stats.values["value/explained_var"],
                "rollout/logprob_diff_max": stats.values.get("rollout/logprob_diff_max", 0.0),
                **rollout, **phase, "time/train_s": train_s,
                "tokens_per_s": rollout["rollout/tokens"] / (time.perf_counter() - t_step),
                **optim.lr_metrics(opt), "memory/train_state_mb": sum(sw.state_mb() for sw in swappers),
                **counters})
            beta = adapt_kl(beta, kl_per_sample, cfg, dist.sum_over_ranks([len(samples)])[0])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics.update(online.evaluate(colocated, heldout, tokenizer, cfg.max_new_tokens, scorer))
                summary.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
            if step % cfg.log_samples_every == 0 or step == 1:
                samples_log.write(step, logged)
            log.log(step, metrics)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                checkpoints.save_checkpoint(out, step, model, tokenizer, opt, sched,
                                            {"step": step, "counters": counters, "summary": summary, "kl_coef": beta},
                                            critic=(critic, critic_opt, critic_sched),
                                            sharded=checkpoints.writes_shards(cfg))
    # step 8: the final policy (final/, in the compute dtype) and critic (critic/), HF directories
    samples_log.close()
    weights = models.full_state_dict(critic)  # (sharded: gathered, a collective)
    if dist.is_main():
        with files.atomic_dir(out / "critic") as tmp:
            models.save_hf_dir(critic, tokenizer, tmp, state=weights)
    return runtime.finish(out, log, model, tokenizer, summary, step, counters, dtype=prec.dtype)
