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

import random
import time
from dataclasses import dataclass, field

import torch

from fastrlhf import checkpoints, config, data, files, logs, models, optim, runtime
from fastrlhf.algos import online
from fastrlhf.kernels import gae, kl_penalty, policy_loss, value_loss
from fastrlhf.memory import StateSwapper
from fastrlhf.rollout import Colocated, make_engine
from fastrlhf.tasks import arithmetic as ar


@dataclass
class PPOConfig(config.ModelFields):
    """fastrlhf ppo: PPO with a critic against a reward model, KL penalty to the SFT reference."""

    model: str = field(default="", metadata={"help": "HF policy directory (the SFT run's final/); empty: built-in tiny model"})
    reward_model: str = field(default="", metadata={"help": "reward model directory (the rm run's final/); empty: use reward_fn"})
    reward_fn: str = field(default="", metadata={"help": "instead of a reward model: module:function or file.py:function, TRL's batched fn(prompts, completions, **fields) -> list[float] or fn(prompt, response, **fields) -> float; neither: the built-in task's exact match (built-in prompts only)"})
    token_rewards: bool = field(default=False, metadata={"help": "logprob reward model: each completion token's beta * log p is its own reward (a process reward), not their sum at the last token"})
    critic: str = field(default="", metadata={"help": "critic initialisation; empty: the reward model, else the policy with a zero head"})
    data: str = field(default="", metadata={"help": "prompts JSONL / JSON / parquet / datasets directory ({\"prompt\": str | messages, ...}); empty: the built-in task's training prompts"})
    eval_data: str = field(default="", metadata={"help": "held-out prompts; empty: built-in held-out prompts or a 5% split"})
    output_dir: str = field(default="runs/ppo", metadata={"help": "where metrics.jsonl, checkpoints/ and final/ (the policy) go"})
    engine: str = field(default="auto", metadata={"help": "rollout engine: auto (vllm if installed) | vllm | hf"})
    gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM's share of device memory (of RAM on CPU)"})
    enforce_eager: bool = field(default=False, metadata={"help": "vLLM without graph capture / compilation (faster start)"})
    offload_params: bool = field(default=False, metadata={"help": "also move the parameters off the GPU while generating"})
    max_len: int = field(default=1024, metadata={"help": "longest prompt + completion in tokens"})
    max_new_tokens: int = field(default=512, metadata={"help": "longest completion"})
    prompts_per_step: int = field(default=64, metadata={"help": "P: prompts per step"})
    group_size: int = field(default=1, metadata={"help": "samples per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    steps: int = field(default=200, metadata={"help": "rollout + update steps"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    minibatches: int = field(default=2, metadata={"help": "optimiser steps per pass"})
    tokens_per_micro_batch: int = field(default=8192, metadata={"help": "packed tokens per forward pass"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip_low: float = field(default=0.2, metadata={"help": "ratio clip below: 1 - clip_low"})
    clip_high: float = field(default=0.2, metadata={"help": "ratio clip above: 1 + clip_high"})
    value_clip: float = field(default=0.2, metadata={"help": "value clip around the old values"})
    kl_coef: float = field(default=0.05, metadata={"help": "beta: per-token KL penalty in the reward (initial value when adaptive)"})
    kl_target: float = field(default=0.0, metadata={"help": "adaptive beta towards this KL per sample (0: fixed beta)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller horizon in samples"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus"})
    is_cap: float = field(default=2.0, metadata={"help": "truncation of the sampler-vs-trainer importance weights (0: off)"})
    lr: float = field(default=1e-6, metadata={"help": "policy learning rate"})
    head_lr: float = field(default=0.0, metadata={"help": "learning rate of the policy's output layer (lm_head), as nanochat's unembedding_lr; 0: lr"})
    critic_lr: float = field(default=1e-5, metadata={"help": "critic learning rate"})
    critic_warmup: int = field(default=0, metadata={"help": "first steps train only the critic, so the policy's first update has informed advantages"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    schedule: str = field(default="constant", metadata={"help": "cosine | linear | constant after warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (each model)"})
    eval_every: int = field(default=10, metadata={"help": "evaluate every k steps (and at the start and end)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every k steps (0: only final/)"})
    log_samples_every: int = field(default=10, metadata={"help": "write log_samples prompts, completions and rewards to samples.jsonl every k steps"})
    log_samples: int = field(default=4, metadata={"help": "samples per samples.jsonl write (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed for prompt order and sampling"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    task_prompts: int = field(default=4000, metadata={"help": "built-in task: training prompts"})
    task_eval_prompts: int = field(default=200, metadata={"help": "built-in task: held-out prompts"})


def adapt_kl(beta: float, kl: float, cfg: PPOConfig, n: int) -> float:
    """Ziegler et al.'s adaptive controller: beta *= 1 + clip(kl / target - 1, +-0.2) * n / horizon."""
    if cfg.kl_target <= 0:
        return beta
    err = max(-0.2, min(0.2, kl / cfg.kl_target - 1))
    return beta * (1 + err * n / cfg.kl_horizon)


def train(cfg: PPOConfig) -> dict:
    reward_fn = online.resolve_reward(cfg)  # before anything is loaded: a missing reward is an error
    out, device, prec = runtime.begin(cfg)
    counters: dict = {}

    # step 1: policy and critic (float32 master weights), reference and reward model (frozen, in
    # the compute dtype), prompts, engine
    # the prompts first: a data error stops the run before the built-in base model is written
    tokenizer = models.load_tokenizer(cfg.model) if cfg.model else ar.build_tokenizer()
    prompts, heldout = online.load_prompt_sets(cfg, tokenizer, counters)
    model_dir = cfg.model or str(ar.save_base_model(out / "base", seed=cfg.seed))
    ckpt = checkpoints.resume_checkpoint(cfg, out)
    model = models.load_trained(ckpt or model_dir, cfg, device)
    models.check_max_len(model, cfg.max_len)
    ref = models.load_frozen(model_dir, device=device, dtype=prec.dtype)
    critic_ckpt = ckpt / "critic" if ckpt else None
    critic = models.load_trained(critic_ckpt or cfg.critic or cfg.reward_model or model_dir, cfg, device, value=True)
    rm = models.load_reward_model(cfg.reward_model, device=device, dtype=prec.dtype) if cfg.reward_model else None
    if cfg.token_rewards and (rm is None or rm.config.reward_head != "logprob"):
        raise ValueError("token_rewards needs a logprob reward model (fastrlhf rm --head logprob); "
                         f"reward_model={cfg.reward_model!r}")
    scorer = online.make_scorer(reward_fn, rm, tokenizer, cfg.tokens_per_micro_batch, device)
    engine = make_engine(cfg.engine, model_dir=model_dir, policy=model, tokenizer=tokenizer, dtype=prec.dtype,
                         max_model_len=cfg.max_len, seed=cfg.seed,
                         gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager)
    config.save_config(cfg, out)

    # step 2: two optimisers, resume, state swappers
    opt, sched, state, log = runtime.optimisation(cfg, model, out, cfg.steps, ckpt, "ppo", head_lr=cfg.head_lr)
    critic_opt = optim.make_optimizer(critic.parameters(), cfg.critic_lr, cfg.weight_decay)
    critic_sched = optim.make_schedule(critic_opt, cfg.warmup_steps, cfg.steps, cfg.schedule)
    if critic_ckpt is not None:
        st = torch.load(critic_ckpt / "critic_state.pt", weights_only=False, map_location="cpu")
        critic_opt.load_state_dict(st["optimizer"])
        critic_sched.load_state_dict(st["scheduler"])
    step, counters = state["step"], {**counters, **state["counters"]}
    beta = state.get("kl_coef", cfg.kl_coef)
    swappers = [StateSwapper(model, opt, device, offload_params=cfg.offload_params),
                StateSwapper(critic, critic_opt, device, offload_params=cfg.offload_params)]
    colocated = Colocated(engine, model, swappers)  # every generation, rollouts and evaluations, goes through it
    samples_log = logs.SampleLog(out, resume_step=step if ckpt else None)

    with prec.autocast():
        summary = online.start_evaluation(colocated, heldout, tokenizer, cfg, scorer, log) if step == 0 \
            else state["summary"]
        while step < cfg.steps:
            t_step = time.perf_counter()
            # step 3: generate with the current weights (training state off the device meanwhile)
            step_p = online.step_prompts(prompts, cfg, step)
            groups, phase = online.rollout(colocated, step_p, cfg, step)
            samples = [s for g in groups for s in g if s.completion_ids]

            # step 4: scores (the reward model's, per sequence or per token; or the function's)
            t0 = time.perf_counter()
            rm_tokens = None  # token_rewards: beta * log p_rm(y_t) per completion, [(L_i,)]
            if rm is not None and cfg.token_rewards:
                rm_tokens = online.score_tokens_with_model(rm, samples, cfg.tokens_per_micro_batch, device)
            else:
                scorer(samples, step_p, counters)
            logged = online.sample_rows(samples, step_p, tokenizer, cfg.log_samples)
            samples = [s for s in samples if "failed" not in s.info]
            score = torch.tensor([s.reward for s in samples])  # (B,)

            # step 5: old / reference log-probs, values; KL-penalised token rewards; GAE
            budget = cfg.tokens_per_micro_batch
            sampler_lp = [torch.tensor(s.logprobs) for s in samples]
            old_lp = None if online.on_policy(cfg) else online.completion_logprobs(model, samples, budget, cfg.temperature, device)
            ref_lp = online.completion_logprobs(ref, samples, budget, cfg.temperature, device)
            vals = online.completion_values(critic, samples, budget, device)
            old, mask = online.rows(sampler_lp if old_lp is None else old_lp)  # (B, T)
            kl = kl_penalty(old, online.rows(ref_lp)[0], kind="k1") * mask
            rewards = -beta * kl
            if rm_tokens is not None:  # a process reward: each token's own share of the score
                rewards += online.rows(rm_tokens)[0] * mask
            else:
                rewards[torch.arange(len(samples)), mask.sum(1) - 1] += score
            v_old = online.rows(vals)[0]  # (B, T)
            adv, returns = gae(rewards, v_old, mask, gamma=cfg.gamma, lam=cfg.lam)
            valid = adv[mask]
            explained_var = (1 - (returns - v_old)[mask].var() / (returns[mask].var() + 1e-8)).item()
            adv = (adv - valid.mean()) / (valid.std() + 1e-8) * mask
            L = [len(s.completion_ids) for s in samples]
            per = lambda t: [t[i, : L[i]] for i in range(len(samples))]  # noqa: E731
            batch = {"old": old_lp, "adv": per(adv), "ret": per(returns), "val": vals,
                     "sampler": sampler_lp}
            trainer_lp = [None] * len(samples)  # on_policy: the training forward's log-probs, for the metrics

            # step 6: PPO epochs over minibatches: policy and critic
            model.train()
            critic.train()
            train_policy = step >= cfg.critic_warmup
            sums, n_updates = {}, 0
            for epoch in range(cfg.ppo_epochs):
                order = list(range(len(samples)))
                random.Random(cfg.seed * 7919 + step * 31 + epoch).shuffle(order)
                for k in range(cfg.minibatches):
                    idx = order[k::cfg.minibatches]
                    if not idx:
                        continue
                    n_tok = sum(L[i] for i in idx)
                    ok = True
                    for mb in online.pack_samples([samples[i] for i in idx], budget):
                        ids = [idx[j] for j in mb["seq_index"]]
                        take = lambda key: online.rows([batch[key][i] for i in ids], device)  # noqa: E731
                        mbd = data.to_device(mb, device)
                        with torch.set_grad_enabled(train_policy):  # critic warm-up: the policy loss is only logged
                            lp, ent = models.token_logprobs(model, mbd, temperature=cfg.temperature, return_entropy=True)
                            lp, ent = online.completion_rows(lp, mb), online.completion_rows(ent, mb)
                            if online.on_policy(cfg):
                                online.keep_rows(trainer_lp, lp, ids, samples)
                            sampler, m = take("sampler")
                            o = lp.detach() if online.on_policy(cfg) else take("old")[0]
                            is_w = online.importance_weights(o, sampler, cfg.is_cap) if cfg.is_cap > 0 else None
                            p_loss, pm = policy_loss(lp, o, take("adv")[0], m, clip_low=cfg.clip_low,
                                                     clip_high=cfg.clip_high, entropy=ent,
                                                     entropy_coef=cfg.entropy_coef, is_weights=is_w)
                        v = online.completion_rows(models.token_values(critic, mbd), mb)
                        v_loss, vm = value_loss(v, take("val")[0], take("ret")[0], m, clip=cfg.value_clip)
                        share = int(m.sum()) / n_tok
                        if not (optim.finite_or_skip(p_loss, counters) and optim.finite_or_skip(v_loss, counters)):
                            ok = False
                            break
                        loss = p_loss + v_loss if train_policy else v_loss  # disjoint parameters: one backward
                        prec.backward(loss * share)
                        for key, val in {"loss/policy": p_loss, "loss/value": v_loss, **pm,
                                         "value/clipfrac": vm["clipfrac"], "value/mean": vm["vpred_mean"]}.items():
                            sums[key] = sums.get(key, 0.0) + float(val.detach()) * share
                    if train_policy:  # (one float16 loss scale for both: updated once, after the critic's step)
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + optim.optimizer_step(
                            model, opt, sched, cfg.grad_clip, counters, ok, prec.scaler, update_scaler=False)
                    optim.optimizer_step(critic, critic_opt, critic_sched, cfg.grad_clip, {}, ok, prec.scaler)
                    n_updates += 1
            train_s = time.perf_counter() - t0
            step += 1

            # step 7: adapt beta, log, evaluate, checkpoint
            kl_per_sample = (kl.sum(1)).mean().item()
            metrics = {k: v / max(1, n_updates) for k, v in sums.items()}
            metrics.update({
                "rollout/engine": colocated.name, "reward/mean": score.mean().item(),
                "reward/kl_penalty": beta * kl_per_sample, "kl": kl_per_sample, "kl_coef": beta,
                "value/explained_var": explained_var,
                **online.rollout_metrics(samples, trainer_lp if online.on_policy(cfg) else old_lp),
                **phase, "time/train_s": train_s, "tokens_per_s": sum(L) / (time.perf_counter() - t_step),
                **optim.lr_metrics(opt), "memory/train_state_mb": sum(sw.state_mb() for sw in swappers),
                **counters})
            beta = adapt_kl(beta, kl_per_sample, cfg, len(samples))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics.update(online.evaluate(colocated, heldout, tokenizer, cfg.max_new_tokens, scorer))
                summary.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
            if step % cfg.log_samples_every == 0 or step == 1:
                samples_log.write(step, logged)
            log.log(step, metrics)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                checkpoints.save_checkpoint(out, step, model, tokenizer, opt, sched,
                                        {"step": step, "counters": counters, "summary": summary, "kl_coef": beta},
                                        extra=lambda tmp: save_critic(tmp / "critic", critic, tokenizer,
                                                                      critic_opt, critic_sched))
    # step 8: the final policy (final/, in the compute dtype) and critic (critic/), HF directories
    samples_log.close()
    with files.atomic_dir(out / "critic") as tmp:
        save_critic(tmp, critic, tokenizer, critic_opt, critic_sched)
    return runtime.finish(out, log, model, tokenizer, summary, step, counters, dtype=prec.dtype)


def save_critic(path, critic, tokenizer, opt, sched) -> None:
    """The critic as an HF sequence-classification directory + its optimiser state."""
    models.save_hf_dir(critic, tokenizer, path)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path / "critic_state.pt")


def main(argv=None) -> dict:
    return train(config.load_config(PPOConfig, argv, prog="fastrlhf ppo"))


if __name__ == "__main__":
    main()
