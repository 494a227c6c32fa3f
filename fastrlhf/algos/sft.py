"""Supervised fine-tuning on demonstrations: next-token cross-entropy on response tokens only.

The variant: loss = sum of -log p(response token) over the step's response tokens / their
count (token-mean over the whole optimiser step, however the tokens fall into micro-batches),
computed with fastrlhf.kernels.linear_logprob on the last hidden state (no (B, T, V) logits),
on packed micro-batches of at most `tokens_per_micro_batch` tokens (no padding), accumulated
into optimiser steps of about `tokens_per_step` response tokens. AdamW, warm-up then cosine.

Logged every step (metrics.jsonl): loss/sft, lr, grad_norm, tokens, tokens_per_s;
every eval_every steps: eval/loss (held-out NLL per token) and, on the built-in task,
eval/accuracy (greedy exact match on held-out prompts); samples.jsonl: greedy completions of
`log_samples` held-out prompts beside their reference responses.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass

import torch

from fastrlhf import checkpoints, config, data, dist, logs, models, optim, runtime
from fastrlhf.algos.offline import sample_completions
from fastrlhf.task import Task


@dataclass
class SFTConfig(config.EpochFields, config.LoraFields, config.OptimFields, config.RunFields):
    """fastrlhf sft: supervised fine-tuning on demonstrations."""

    data: str = config.override(config.RunFields, "data", help=(
        "SFT data (prompt + response or completion, messages, or text): JSONL / JSON / "
        "parquet / datasets directory; empty: the built-in task's demonstrations"))
    eval_data: str = config.override(config.RunFields, "eval_data",
                                     help="held-out SFT data for eval/loss; empty: split 5% off")
    output_dir: str = config.override(config.RunFields, "output_dir", "runs/sft")
    epochs: int = config.override(config.EpochFields, "epochs", 2)
    lr: float = config.override(config.OptimFields, "lr", 2e-5)
    disable_dropout: bool = config.override(config.RunFields, "disable_dropout", False,
                                            help="set every dropout of the model to 0 (SFT keeps the model's own, "
                                                 "as TRL)")
    tokens_per_step: int = config.arg(8192, "response tokens per optimiser step (gradient accumulation)")
    log_samples: int = config.arg(4, "at each evaluation, greedy completions of this many held-out prompts into "
                                     "samples.jsonl (0: none)")
    task_model_size: str = config.arg("small", "built-in model when --model is empty: tiny | small | medium")
    task_examples: int = config.arg(4000, "built-in task: demonstrations to generate")
    task_error_rate: float = config.arg(0.15, "built-in task: share of wrong demonstrations")
    task_eval_prompts: int = config.arg(200, "built-in task: held-out prompts for eval/accuracy")


def tokenize(tokenizer, records, max_len) -> list[tuple[list[int], list[int]]]:
    counts = data.Truncations()
    seqs = [data.tokenize_pair(tokenizer, r["prompt"], r["response"], max_len, counts) for r in records]
    counts.report("sft data", max_len)
    seqs = [s for s in seqs if s is not None]
    if not seqs:
        raise data.DataError("sft data: no example fits in max_len; raise --max_len")
    return seqs


def epoch_split(seqs, cfg: SFTConfig, epoch: int) -> list[list]:
    """The sequences of each optimiser step of one epoch: a seeded shuffle, split into steps of
    about tokens_per_step response tokens. How many steps that makes differs from epoch to epoch
    (the shuffle changes where the budget falls)."""
    order = list(range(len(seqs)))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    return optim.split_by_budget([seqs[i] for i in order], cfg.tokens_per_step,
                                   lambda s: sum(y != data.IGNORE for y in s[1]))


def epoch_steps(seqs, cfg: SFTConfig, epoch: int) -> list[tuple[list[tuple[dict, float]], int]]:
    """The optimiser steps of one epoch: each this rank's packed micro-batches with the weight of
    each one's loss (data.pack_for_rank), and the step's response tokens on all ranks."""
    return [(data.pack_for_rank(step, cfg.tokens_per_micro_batch), data.n_targets(step))
            for step in epoch_split(seqs, cfg, epoch)]


def locate(step: int, steps_in) -> tuple[int, int]:
    """(epoch, index within it) of a global step; steps_in(epoch) -> that epoch's step count."""
    epoch = 0
    while step >= steps_in(epoch):
        step -= steps_in(epoch)
        epoch += 1
    return epoch, step


@torch.no_grad()
def eval_loss(model, seqs, cfg: SFTConfig, device) -> float:
    """Held-out NLL per response token (sharded: each rank its share, summed over the ranks)."""
    model.eval()
    total = 0.0
    for mb, weight in data.pack_for_rank(seqs, cfg.tokens_per_micro_batch):
        total -= models.token_logprobs(model, data.to_device(mb, device)).sum().item() * weight
    return dist.sum_over_ranks([total])[0] / max(1, data.n_targets(seqs))


def train(cfg: SFTConfig, task: Task) -> dict:
    out, device, prec = runtime.begin(cfg)

    # step 1: data (first: a data error stops the run before the task's base model is written),
    # model, tokenizer
    records, eval_records = task.demonstrations()
    model_dir = runtime.start_model(cfg, task, out)
    ckpt = checkpoints.resume_checkpoint(cfg, out)
    tokenizer = models.load_tokenizer(model_dir)
    model = models.load_trained(model_dir, cfg, device, ckpt=checkpoints.weights(ckpt))
    models.check_max_len(model, cfg.max_len)
    seqs, eval_seqs = tokenize(tokenizer, records, cfg.max_len), tokenize(tokenizer, eval_records, cfg.max_len)
    steps_in = functools.cache(lambda epoch: len(epoch_split(seqs, cfg, epoch)))  # (cheap: no packing)
    total = cfg.max_steps or sum(steps_in(e) for e in range(cfg.epochs))
    config.save_config(cfg, out)

    # step 2: optimiser, schedule, resume
    opt, sched, state, log = runtime.optimisation(cfg, model, out, total, ckpt, "sft")
    samples_log = logs.SampleLog(out, resume_step=state["step"] if ckpt else None)

    # step 3: the loop (forward passes under autocast in the compute dtype; float32 master weights)
    step, counters, summary, epochs = state["step"], state["counters"], state["summary"], {}
    ranks = dist.world_size()
    with prec.autocast():
        while step < total:
            epoch, index = locate(step, steps_in)
            if epoch not in epochs:
                epochs.clear()
                epochs[epoch] = epoch_steps(seqs, cfg, epoch)
            micro_batches, n_tok = epochs[epoch][index]
            model.train()
            t0 = time.time()
            loss_sum, bad = 0.0, 0
            for mb, weight in micro_batches:
                mb = data.to_device(mb, device)
                # step 3a: token-mean NLL over the whole step's response tokens (on every rank: FSDP
                # averages the ranks' gradients, so each rank's part is scaled by the rank count)
                loss = -models.token_logprobs(model, mb).sum() / n_tok
                bad += not torch.isfinite(loss)
                prec.backward(loss if weight * ranks == 1 else loss * (weight * ranks))
                loss_sum += loss.item() * weight
            loss_sum, bad = dist.sum_over_ranks([loss_sum, bad])
            # step 3b: update (skipped, and counted, on a non-finite loss or gradient on any rank)
            if bad:
                optim.count_nonfinite_loss(counters)
            grad_norm = optim.optimizer_step(model, opt, sched, cfg.grad_clip, counters, not bad, prec.scaler)
            step += 1
            metrics = {"loss/sft": loss_sum, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens": n_tok, "tokens_per_s": n_tok / max(time.time() - t0, 1e-9),
                       "epoch": epoch, **counters}
            # step 4: evaluate (held-out loss, the task's accuracy, a few completions), checkpoint
            if step % cfg.eval_every == 0 or step == total:
                metrics["eval/loss"] = eval_loss(model, eval_seqs, cfg, device)
                metrics.update({f"eval/{k}": v for k, v in task.evaluate(model, tokenizer).items()})
                summary.update({k: metrics[k] for k in metrics if k.startswith("eval/")})
                samples_log.write(step, sample_completions(model, tokenizer, eval_records, cfg))
            log.log(step, metrics)
            checkpoints.maybe_checkpoint(out, cfg, step, total, model, tokenizer, opt, sched, counters, summary)
    # step 5: the final model, an HF directory in the compute dtype
    samples_log.close()
    return runtime.finish(out, log, model, tokenizer, summary, step, counters, dtype=prec.dtype)

