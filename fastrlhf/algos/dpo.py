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
at temperature 1, ar.EVAL_SAMPLES draws per prompt); start/... are the SFT model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fastrlhf import checkpoints, config, data, logs, models, optim, runtime
from fastrlhf.algos.offline import pair_scores, pair_steps, prepare_pairs, sample_completions
from fastrlhf.kernels import preference_loss
from fastrlhf.kernels.preference_loss import LOSS_TYPES
from fastrlhf.tasks import arithmetic as ar


@dataclass
class DPOConfig(config.ModelFields):
    """fastrlhf dpo: optimise the policy directly on preference pairs."""

    model: str = field(default="", metadata={"help": "HF model directory to start from (the SFT run's final/); empty: built-in tiny model"})
    data: str = field(default="", metadata={"help": "preferences JSONL / JSON / parquet / datasets directory (prompt + chosen + rejected as strings or messages, TRL's implicit-prompt chosen + rejected, or a ranking); empty: the built-in annotator's pairs"})
    eval_data: str = field(default="", metadata={"help": "held-out preferences; empty: built-in held-out pairs or a 5% split"})
    output_dir: str = field(default="runs/dpo", metadata={"help": "where metrics.jsonl, checkpoints/ and final/ go"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) | robust | ipo | hinge | simpo"})
    beta: float = field(default=0.1, metadata={"help": "inverse temperature of the implicit reward"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO / rDPO label noise eps (sigmoid, robust, simpo)"})
    gamma: float = field(default=0.5, metadata={"help": "SimPO target margin"})
    precompute_ref: bool = field(default=True, metadata={"help": "reference log-probs once before training (else every step)"})
    max_len: int = field(default=1024, metadata={"help": "longest prompt+response in tokens"})
    tokens_per_micro_batch: int = field(default=8192, metadata={"help": "packed tokens per forward pass"})
    pairs_per_step: int = field(default=32, metadata={"help": "preference pairs per optimiser step"})
    epochs: int = field(default=1, metadata={"help": "passes over the pairs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: run all epochs)"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | linear | constant after warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every k steps (and at the end)"})
    save_every: int = field(default=500, metadata={"help": "checkpoint every k steps (0: only final/)"})
    log_samples: int = field(default=4, metadata={"help": "at each evaluation, greedy completions of this many held-out prompts into samples.jsonl (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed for data order"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    task_pairs: int = field(default=4000, metadata={"help": "built-in task: pairs the simulated annotator labels"})
    task_label_noise: float = field(default=0.1, metadata={"help": "built-in task: annotator's chance to pick the worse one"})
    task_eval_pairs: int = field(default=400, metadata={"help": "built-in task: held-out pairs"})
    task_eval_prompts: int = field(default=200, metadata={"help": "built-in task: held-out prompts for eval/accuracy"})

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


def task_accuracy(policy, tokenizer, heldout, prefix: str) -> dict:
    """Built-in task: greedy and sampled exact match (ar.accuracy, ar.sampled_accuracy)."""
    return {f"{prefix}/accuracy": ar.accuracy(policy, tokenizer, heldout),
            f"{prefix}/sample_accuracy": ar.sampled_accuracy(policy, tokenizer, heldout)}


def train(cfg: DPOConfig) -> dict:
    out, device, prec = runtime.begin(cfg)

    # step 1: policy, frozen reference (none for simpo; in the compute dtype), pairs, reference log-prob tables
    model_dir, pairs, eval_pairs = prepare_pairs(cfg, out)
    ckpt = checkpoints.resume_checkpoint(cfg, out)
    tokenizer = models.load_tokenizer(model_dir)
    policy = models.load_trained(ckpt or model_dir, cfg, device)
    models.check_max_len(policy, cfg.max_len)
    train_pairs = data.tokenize_pairs(tokenizer, pairs, cfg.max_len, "dpo data")
    eval_tok = data.tokenize_pairs(tokenizer, eval_pairs, cfg.max_len, "dpo eval data")
    need_ref = cfg.loss_type != "simpo"
    ref = models.load_frozen(model_dir, device=device, dtype=prec.dtype) if need_ref else None
    train_ref = eval_ref = None  # [(chosen, rejected)] per pair when precomputed
    if ref is not None and cfg.precompute_ref:
        with prec.autocast():
            train_ref, eval_ref = reference_logps(ref, train_pairs, cfg, device), reference_logps(ref, eval_tok, cfg, device)
        ref = None  # the reference model is no longer needed: free it
    heldout = ar.heldout_prompts(ar.ArithmeticTask(seed=cfg.seed), cfg.task_eval_prompts) if not cfg.data else None
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
        if heldout:
            res.update(task_accuracy(policy, tokenizer, heldout, "eval"))
        return res

    # step 3: the loop
    step, counters, summary = state["step"], state["counters"], state["summary"]
    samples_log = logs.SampleLog(out, resume_step=state["step"] if ckpt else None)
    with prec.autocast():
        if step == 0 and heldout:
            summary.update(task_accuracy(policy, tokenizer, heldout, "start"))
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


def main(argv=None) -> dict:
    return train(config.load_config(DPOConfig, argv, prog="fastrlhf dpo"))


if __name__ == "__main__":
    main()
