"""Reward model from people's pairwise choices: the Bradley-Terry loss.

For each pair the loss is
    -log sigmoid(r(prompt, chosen) - r(prompt, rejected)),
averaged over the pairs of an optimiser step (`pairs_per_step`). The reward r, by `head`
(models.sequence_rewards; saved in config.json as reward_head, so PPO/GRPO score the same way):
  value    a scalar head on the (SFT) backbone, read at the response's last token (as TRL's
           RewardTrainer and OpenRLHF): the default;
  logprob  beta * log p(response | prompt) under the model's own LM head, summed over the response
           tokens (a generative, reference-free reward model: SimPO's implicit reward without the
           length average). A small model can rank answers by what it knows only through its LM
           head: on the built-in task a linear probe of the SFT model's hidden states tells a right
           answer from a wrong one 55-59% of the time, its likelihood 99% (README).
Both sides of every pair are packed together into micro-batches (no padding). Rankings of K
responses arrive as their K(K-1)/2 pairs (data.load_preferences).

Logged every step: loss/rm, accuracy (share of the step's pairs ranked right), margin (mean
r_chosen - r_rejected), lr, grad_norm; every eval_every steps: eval/loss, eval/accuracy on
held-out pairs (labelled by the same noisy annotator, so it is bounded by 1 - label noise);
start/loss, start/accuracy: the same before the first step (a fresh value head scores 0.5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastrlhf import checkpoints, config, data, models, optim, runtime
from fastrlhf.algos.offline import pair_scores, pair_steps, prepare_pairs
from fastrlhf.task import Task


@dataclass
class RMConfig(config.PairFields, config.EpochFields, config.LoraFields, config.OptimFields, config.RunFields):
    """fastrlhf rm: train a reward model on preference pairs (Bradley-Terry)."""

    data: str = config.override(config.RunFields, "data", help=(
        "preferences (prompt + chosen + rejected as strings or messages, TRL's "
        "implicit-prompt chosen + rejected, or a ranking of responses): JSONL / JSON / parquet / datasets directory; "
        "empty: the built-in annotator's pairs"))
    output_dir: str = config.override(config.RunFields, "output_dir", "runs/rm")
    head: str = config.arg("value", "value (scalar head at the last token) | logprob (beta * the response's "
                                    "log-likelihood)")
    beta: float = config.arg(1.0, "logprob head: the reward is beta * log p(response | prompt)")


def bt_loss(model, pairs, cfg, device):
    r_c, r_r = pair_scores(lambda mb: models.sequence_rewards(model, mb), pairs,
                           cfg.tokens_per_micro_batch, device)
    return -F.logsigmoid(r_c - r_r).mean(), r_c.detach(), r_r.detach()


@torch.no_grad()
def evaluate(model, eval_pairs, cfg, device) -> dict:
    model.eval()
    loss, r_c, r_r = bt_loss(model, eval_pairs, cfg, device)
    return {"eval/loss": loss.item(), "eval/accuracy": pairwise_accuracy(r_c, r_r)}


def pairwise_accuracy(r_c: torch.Tensor, r_r: torch.Tensor) -> float:
    """Share of pairs ranked right, a tie counting half (a fresh value head scores 0.5)."""
    return ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean().item()


def train(cfg: RMConfig, task: Task) -> dict:
    if cfg.head not in models.REWARD_HEADS:
        raise ValueError(f"head {cfg.head!r}: expected one of {models.REWARD_HEADS}")
    out, device, prec = runtime.begin(cfg)

    # step 1: model with its reward head, tokenizer, pairs
    model_dir, pairs, eval_pairs = prepare_pairs(cfg, task, out)
    ckpt = checkpoints.resume_checkpoint(cfg, out)
    tokenizer = models.load_tokenizer(model_dir)
    model = models.load_trained(model_dir, cfg, device, ckpt=checkpoints.weights(ckpt), value=cfg.head == "value")
    if cfg.head == "logprob":
        model.config.reward_beta = cfg.beta  # saved with the model: scorers read both
    model.config.reward_head = cfg.head
    models.check_max_len(model, cfg.max_len)
    train_pairs = data.tokenize_pairs(tokenizer, pairs, cfg.max_len, "rm data")
    eval_tok = data.tokenize_pairs(tokenizer, eval_pairs, cfg.max_len, "rm eval data")
    steps_per_epoch = len(pair_steps(train_pairs, cfg.pairs_per_step, cfg.seed, 0))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    config.save_config(cfg, out)

    # step 2: optimiser, schedule, resume
    opt, sched, state, log = runtime.optimisation(cfg, model, out, total, ckpt, "rm")

    # step 3: the loop
    step, counters, summary = state["step"], state["counters"], state["summary"]
    with prec.autocast():
        if step == 0:  # what the comparisons add: held-out accuracy before any training
            start = {k.replace("eval/", "start/"): v for k, v in evaluate(model, eval_tok, cfg, device).items()}
            log.log(0, start)
            summary.update(start)
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            batch = pair_steps(train_pairs, cfg.pairs_per_step, cfg.seed, epoch)[index]
            model.train()
            t0 = time.time()
            loss, r_c, r_r = bt_loss(model, batch, cfg, device)  # step 3a: Bradley-Terry
            grad_norm = optim.backward_and_step(loss, model, opt, sched, cfg.grad_clip, counters, prec)
            step += 1
            metrics = {"loss/rm": loss.item(), "accuracy": pairwise_accuracy(r_c, r_r),
                       "margin": (r_c - r_r).mean().item(), "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm, "pairs_per_s": len(batch) / (time.time() - t0), **counters}
            if step % cfg.eval_every == 0 or step == total:  # step 4: held-out pairs
                metrics.update(evaluate(model, eval_tok, cfg, device))
                summary.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
            log.log(step, metrics)
            checkpoints.maybe_checkpoint(out, cfg, step, total, model, tokenizer, opt, sched, counters, summary)
    # step 5: the final model, an HF directory in the compute dtype
    return runtime.finish(out, log, model, tokenizer, summary, step, counters, dtype=prec.dtype)
