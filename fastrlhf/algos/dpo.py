"""DPO-family training straight on preference pairs: no reward model, no sampling.

The variant: the policy starts from `model` (the SFT result) and a frozen copy of it is the
reference. Sequence log-probs are sums over response tokens of fastrlhf.kernels.linear_logprob
(no (B, T, V) logits), or their per-token means for loss_type ipo and simpo (as TRL does);
the loss is fastrlhf.kernels.preference_loss with any of its loss types (sigmoid = DPO,
with label_smoothing = cDPO; robust = rDPO; ipo; hinge; simpo, which has no reference).
Reference log-probs are computed once before training (precompute_ref, the default) or on the
fly for each step. Both sides of a pair are packed together into micro-batches.

Logged every step: loss/dpo, rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy, lr, grad_norm; every eval_every steps: eval/loss, eval/reward_accuracy
(implicit-reward accuracy on held-out pairs) and, on the built-in task, eval/accuracy (greedy
exact match on held-out prompts, the same protocol as SFT's) and eval/sample_accuracy (the same
at temperature 1, fastrlhf.task.EVAL_SAMPLES draws per prompt); start/... are the SFT model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastrlhf import checkpoints, config, data, logs, models, optim, runtime
from fastrlhf.algos.offline import pair_scores, pair_steps, prepare_pairs, sample_completions
from fastrlhf.kernels import preference_loss
from fastrlhf.kernels.preference_loss import LOSS_TYPES
from fastrlhf.task import Task


@dataclass
class DPOConfig(config.PairFields, config.EpochFields, config.LoraFields, config.OptimFields, config.RunFields):
    """fastrlhf dpo: optimise the policy directly on preference pairs."""

    data: str = config.override(config.RunFields, "data", help=(
        "preferences (prompt + chosen + rejected as strings or messages, TRL's "
        "implicit-prompt chosen + rejected, or a ranking): JSONL / JSON / parquet / datasets directory; empty: the "
        "built-in annotator's pairs"))
    output_dir: str = config.override(config.RunFields, "output_dir", "runs/dpo")
    lr: float = config.override(config.OptimFields, "lr", 1e-6)
    loss_type: str = config.arg("sigmoid", "sigmoid (DPO) | robust | ipo | hinge | simpo")
    beta: float = config.arg(0.1, "inverse temperature of the implicit reward")
    label_smoothing: float = config.arg(0.0, "cDPO / rDPO label noise eps (sigmoid, robust, simpo)")
    gamma: float = config.arg(0.5, "SimPO target margin")
    precompute_ref: bool = config.arg(True, "reference log-probs once before training (else every step)")
    log_samples: int = config.arg(4, "at each evaluation, greedy completions of this many held-out prompts into "
                                     "samples.jsonl (0: none)")
    task_eval_prompts: int = config.arg(200, "built-in task: held-out prompts for eval/accuracy")

    RULES = {"gamma": config._range()}  # SimPO's target margin: any finite number (not a discount)

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")


def seq_logps(model, pairs, cfg: DPOConfig, device):
    """(chosen, rejected) sequence log-probs (P,): sums, or means for ipo / simpo."""
    average = cfg.loss_type in ("ipo", "simpo")
    return pair_scores(lambda mb: models.per_sequence(models.token_logprobs(model, mb), mb,
                                                      average=average),
                       pairs, cfg.tokens_per_micro_batch, device)


def dpo_loss(policy, ref_logps, batch, cfg, device):
    c, r = seq_logps(policy, batch, cfg, device)
    refs = () if cfg.loss_type == "simpo" else ref_logps
    return preference_loss(c, r, *refs, beta=cfg.beta, loss_type=cfg.loss_type,
                           label_smoothing=cfg.label_smoothing, gamma=cfg.gamma)


@torch.no_grad()
def reference_logps(ref, pairs, cfg, device):
    """Reference (chosen, rejected) log-probs of each pair, computed once: [(c, r)] per pair."""
    c, r = seq_logps(ref, pairs, cfg, device)
    return list(zip(c.tolist(), r.tolist()))


def pair_samples(policy, tokenizer, eval_pairs, cfg) -> list[dict]:
    """Greedy completions of the first cfg.log_samples held-out prompts, beside the pair's chosen
    response (samples.jsonl)."""
    records = [{"prompt": p["prompt"], "response": p["chosen"]} for p in eval_pairs]
    return [{**row, "chosen": row.pop("reference")} for row in sample_completions(policy, tokenizer, records, cfg)]


def train(cfg: DPOConfig, task: Task) -> dict:
    out, device, prec = runtime.begin(cfg)

    # step 1: policy, frozen reference (none for simpo; in the compute dtype), pairs, reference log-prob tables
    model_dir, pairs, eval_pairs = prepare_pairs(cfg, task, out)
    ckpt = checkpoints.resume_checkpoint(cfg, out)
    tokenizer = models.load_tokenizer(model_dir)
    policy = models.load_trained(model_dir, cfg, device, ckpt=checkpoints.weights(ckpt))
    models.check_max_len(policy, cfg.max_len)
    train_pairs = data.tokenize_pairs(tokenizer, pairs, cfg.max_len, "dpo data")
    eval_tok = data.tokenize_pairs(tokenizer, eval_pairs, cfg.max_len, "dpo eval data")
    need_ref = cfg.loss_type != "simpo"
    ref = models.reference(policy, model_dir, device=device, dtype=prec.dtype) if need_ref else None
    train_ref = eval_ref = None  # [(chosen, rejected)] per pair when precomputed
    if ref is not None and cfg.precompute_ref:
        with prec.autocast():
            train_ref = reference_logps(ref, train_pairs, cfg, device)
            eval_ref = reference_logps(ref, eval_tok, cfg, device)
        ref = None  # the reference model is no longer needed: free it (LoRA: it was the policy, adapters off)
    accuracy = lambda prefix: {f"{prefix}/{k}": v for k, v in task.evaluate(policy, tokenizer, sampled=True).items()}  # noqa: E731
    indexed = list(range(len(train_pairs)))
    steps_per_epoch = len(pair_steps(indexed, cfg.pairs_per_step, cfg.seed, 0))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    config.save_config(cfg, out)

    def refs_for(idx, tok_pairs, table):
        """Reference (chosen, rejected) log-probs of the pairs idx: from the table, or computed."""
        if not need_ref:
            return ()
        if table is not None:
            c, r = zip(*(table[i] for i in idx))
            return torch.tensor(c, device=device), torch.tensor(r, device=device)
        with torch.no_grad():
            return seq_logps(ref, [tok_pairs[i] for i in idx], cfg, device)

    # step 2: optimiser, schedule, resume
    opt, sched, state, log = runtime.optimisation(cfg, policy, out, total, ckpt, "dpo")

    @torch.no_grad()
    def evaluate() -> dict:
        policy.eval()
        idx = list(range(len(eval_tok)))
        loss, m = dpo_loss(policy, refs_for(idx, eval_tok, eval_ref), eval_tok, cfg, device)
        res = {"eval/loss": loss.item(), "eval/reward_accuracy": m["rewards/accuracy"].item()}
        res.update(accuracy("eval"))
        return res

    # step 3: the loop
    step, counters, summary = state["step"], state["counters"], state["summary"]
    samples_log = logs.SampleLog(out, resume_step=state["step"] if ckpt else None)
    with prec.autocast():
        if step == 0:
            summary.update(accuracy("start"))
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            idx = pair_steps(indexed, cfg.pairs_per_step, cfg.seed, epoch)[index]
            policy.train()
            t0 = time.time()
            batch = [train_pairs[i] for i in idx]
            refs = refs_for(idx, train_pairs, train_ref)
            loss, m = dpo_loss(policy, refs, batch, cfg, device)  # step 3a: preference loss
            grad_norm = optim.backward_and_step(loss, policy, opt, sched, cfg.grad_clip, counters, prec)
            step += 1
            metrics = {"loss/dpo": loss.item(), **m, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                       "pairs_per_s": len(batch) / (time.time() - t0), **counters}
            if step % cfg.eval_every == 0 or step == total:  # step 4: held-out pairs and prompts, completions
                metrics.update(evaluate())
                summary.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
                samples_log.write(step, pair_samples(policy, tokenizer, eval_pairs, cfg))
            log.log(step, metrics)
            checkpoints.maybe_checkpoint(out, cfg, step, total, policy, tokenizer, opt, sched, counters, summary)
    # step 5: the final model, an HF directory in the compute dtype
    samples_log.close()
    return runtime.finish(out, log, policy, tokenizer, summary, step, counters, dtype=prec.dtype)
