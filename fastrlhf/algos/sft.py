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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastrlhf import checkpoints, config, data, logs, models, optim, runtime
from fastrlhf.algos.offline import sample_completions
from fastrlhf.tasks import arithmetic as ar


@dataclass
class SFTConfig(config.ModelFields):
    """fastrlhf sft: supervised fine-tuning on demonstrations."""

    model: str = field(default="", metadata={"help": "HF model directory; empty: the built-in tiny model"})
    data: str = field(default="", metadata={"help": "SFT JSONL / JSON / parquet / datasets directory (prompt + response or completion, messages, or text); empty: the built-in task's demonstrations"})
    eval_data: str = field(default="", metadata={"help": "held-out SFT data for eval/loss; empty: split 5% off"})
    output_dir: str = field(default="runs/sft", metadata={"help": "where metrics.jsonl, samples.jsonl, checkpoints/ and final/ go"})
    max_len: int = field(default=1024, metadata={"help": "longest prompt + response in tokens (longer: truncated, counted)"})
    tokens_per_micro_batch: int = field(default=8192, metadata={"help": "packed tokens per forward pass"})
    tokens_per_step: int = field(default=8192, metadata={"help": "response tokens per optimiser step (gradient accumulation)"})
    epochs: int = field(default=2, metadata={"help": "passes over the data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: run all epochs)"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | linear | constant after warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every k steps (and at the end)"})
    save_every: int = field(default=500, metadata={"help": "checkpoint every k steps (0: only final/)"})
    log_samples: int = field(default=4, metadata={"help": "at each evaluation, greedy completions of this many held-out prompts into samples.jsonl (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed for data order and initialisation"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    disable_dropout: bool = field(default=False, metadata={"help": "set every dropout of the model to 0 (SFT keeps the model's own, as TRL)"})
    task_model_size: str = field(default="small", metadata={"help": "built-in model when --model is empty: tiny | small"})
    task_examples: int = field(default=4000, metadata={"help": "built-in task: demonstrations to generate"})
    task_error_rate: float = field(default=0.15, metadata={"help": "built-in task: share of wrong demonstrations"})
    task_eval_prompts: int = field(default=200, metadata={"help": "built-in task: held-out prompts for eval/accuracy"})


def prepare(cfg: SFTConfig, out: Path):
    """Model directory, demonstration records (train, eval), and held-out prompts (built-in)."""
    task = ar.ArithmeticTask(seed=cfg.seed)
    # the data first: a data error stops the run before anything (the built-in base model) is written
    if cfg.data:
        records = data.load_sft(cfg.data)
    else:
        records = ar.sft_examples(task, cfg.task_examples, error_rate=cfg.task_error_rate, seed=cfg.seed)
    if cfg.eval_data:
        eval_records = data.load_sft(cfg.eval_data)
    elif cfg.data:  # held out by prompt: duplicated records cannot land on both sides
        records, eval_records = data.split_heldout(records)
    else:  # the built-in demonstrations (distinct operand pairs): the first 5%
        n_eval = max(1, len(records) // 20)
        records, eval_records = records[n_eval:], records[:n_eval]
    heldout = ar.heldout_prompts(task, cfg.task_eval_prompts) if not cfg.data else None
    model_dir = cfg.model or str(ar.save_base_model(out / "base", seed=cfg.seed,
                                                    **ar.MODEL_SIZES[cfg.task_model_size]))
    return model_dir, records, eval_records, heldout


def tokenize(tokenizer, records, max_len) -> list[tuple[list[int], list[int]]]:
    counts = data.Truncations()
    seqs = [data.tokenize_pair(tokenizer, r["prompt"], r["response"], max_len, counts) for r in records]
    counts.report("sft data", max_len)
    seqs = [s for s in seqs if s is not None]
    if not seqs:
        raise data.DataError("sft data: no example fits in max_len; raise --max_len")
    return seqs


def n_targets(batch: dict) -> int:
    return int((batch["labels"] != data.IGNORE).sum())


def epoch_split(seqs, cfg: SFTConfig, epoch: int) -> list[list]:
    """The sequences of each optimiser step of one epoch: a seeded shuffle, split into steps of
    about tokens_per_step response tokens. How many steps that makes differs from epoch to epoch
    (the shuffle changes where the budget falls)."""
    order = list(range(len(seqs)))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    return optim.split_by_budget([seqs[i] for i in order], cfg.tokens_per_step,
                                   lambda s: sum(y != data.IGNORE for y in s[1]))


def epoch_steps(seqs, cfg: SFTConfig, epoch: int) -> list[list[dict]]:
    """The optimiser steps of one epoch, each packed into micro-batches."""
    return [data.pack(step, cfg.tokens_per_micro_batch) for step in epoch_split(seqs, cfg, epoch)]


def locate(step: int, steps_in) -> tuple[int, int]:
    """(epoch, index within it) of a global step; steps_in(epoch) -> that epoch's step count."""
    epoch = 0
    while step >= steps_in(epoch):
        step -= steps_in(epoch)
        epoch += 1
    return epoch, step


@torch.no_grad()
def eval_loss(model, seqs, cfg: SFTConfig, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for mb in data.pack(seqs, cfg.tokens_per_micro_batch):
        mb = data.to_device(mb, device)
        total -= models.token_logprobs(model, mb).sum().item()
        count += n_targets(mb)
    return total / max(1, count)


def train(cfg: SFTConfig) -> dict:
    out, device, prec = runtime.begin(cfg)

    # step 1: model, tokenizer, data
    model_dir, records, eval_records, heldout = prepare(cfg, out)
    ckpt = checkpoints.resume_checkpoint(cfg, out)
    tokenizer = models.load_tokenizer(model_dir)
    model = models.load_trained(ckpt or model_dir, cfg, device)
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
    with prec.autocast():
        while step < total:
            epoch, index = locate(step, steps_in)
            if epoch not in epochs:
                epochs.clear()
                epochs[epoch] = epoch_steps(seqs, cfg, epoch)
            micro_batches = epochs[epoch][index]
            model.train()
            t0 = time.time()
            n_tok = sum(n_targets(mb) for mb in micro_batches)
            loss_sum, ok = 0.0, True
            for mb in micro_batches:
                mb = data.to_device(mb, device)
                # step 3a: token-mean NLL over the whole step's response tokens
                loss = -models.token_logprobs(model, mb).sum() / n_tok
                if not optim.finite_or_skip(loss, counters):
                    ok = False
                    break
                prec.backward(loss)
                loss_sum += loss.item()
            # step 3b: update (skipped, and counted, on a non-finite loss or gradient)
            grad_norm = optim.optimizer_step(model, opt, sched, cfg.grad_clip, counters, ok, prec.scaler)
            step += 1
            metrics = {"loss/sft": loss_sum, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens": n_tok, "tokens_per_s": n_tok / max(time.time() - t0, 1e-9),
                       "epoch": epoch, **counters}
            # step 4: evaluate (held-out loss, the task's accuracy, a few completions), checkpoint
            if step % cfg.eval_every == 0 or step == total:
                metrics["eval/loss"] = eval_loss(model, eval_seqs, cfg, device)
                if heldout:
                    metrics["eval/accuracy"] = ar.accuracy(model, tokenizer, heldout)
                summary.update({k: metrics[k] for k in metrics if k.startswith("eval/")})
                samples_log.write(step, sample_completions(model, tokenizer, eval_records, cfg))
            log.log(step, metrics)
            checkpoints.maybe_checkpoint(out, cfg, step, total, model, tokenizer, opt, sched, counters, summary)
    # step 5: the final model, an HF directory in the compute dtype
    samples_log.close()
    return runtime.finish(out, log, model, tokenizer, summary, step, counters, dtype=prec.dtype)


def main(argv=None) -> dict:
    return train(config.load_config(SFTConfig, argv, prog="fastrlhf sft"))


if __name__ == "__main__":
    main()
