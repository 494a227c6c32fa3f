"""What the offline trainers (sft.py, reward.py, dpo.py) share: preference pairs and their
steps, packed pair scoring, and the completions they show in samples.jsonl.

A pair is (chosen, rejected), each an (input_ids, labels) sequence from data.tokenize_pairs;
both sides of every pair are packed together into micro-batches (no padding).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from fastrlhf import data, dist, runtime
from fastrlhf.task import Task


def prepare_pairs(cfg, task: Task, out: Path):
    """(model dir, train pairs, eval pairs) for the RM and DPO trainers: the task's pairs first (a
    data error stops the run before its base model is written), then the model to start from."""
    pairs, eval_pairs = task.preference_pairs()
    model_dir = runtime.start_model(cfg, task, out)
    return model_dir, pairs, eval_pairs


def pair_steps(pairs, pairs_per_step: int, seed: int, epoch: int) -> list[list]:
    order = list(range(len(pairs)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [[pairs[i] for i in order[k:k + pairs_per_step]] for k in range(0, len(order), pairs_per_step)]


def pair_scores(score_fn, pairs, tokens_per_micro_batch: int, device):
    """score_fn(model batch) -> (n_seq,) for packed batches; returns (chosen, rejected) (P,) of
    every pair. Sharded (torchrun): each rank scores its share of the pairs and the scores of all
    are gathered (dist.gather_shares), so every rank holds the whole batch's."""
    shares = [[s for c, r in dist.share(pairs, k) for s in (c, r)] for k in range(dist.world_size())]
    out, padding = [], 0.0
    for mb, weight in data.pack_for_rank(None, tokens_per_micro_batch, shares=shares):
        scores = score_fn(data.to_device(mb, device))
        if weight:
            out.append(scores)
        else:  # a repeat that evens out the ranks' forwards: kept in the graph (its backward runs too), worth 0
            padding = padding + scores.sum() * 0.0
    mine = torch.cat(out) if out else torch.zeros(0, device=device)
    if not isinstance(padding, float):
        mine = mine + padding
    return dist.gather_shares(mine[0::2], len(pairs)), dist.gather_shares(mine[1::2], len(pairs))


def _prompt_and_reference(record: dict):
    """What to prompt with and the reference answer: a conversation up to its last assistant turn."""
    prompt, response = record["prompt"], record["response"]
    if isinstance(response, list):
        msgs = list(prompt) + list(response)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    return prompt, response


def sample_completions(model, tokenizer, records, cfg, max_new_tokens: int = 64) -> list[dict]:
    """Greedy completions of the first cfg.log_samples held-out prompts: what the model now
    writes, for samples.jsonl (prompt, completion, and the reference response). The global RNG
    is left as it was (resume stays exact)."""
    from fastrlhf.rollout.hf import HFEngine

    rows = [_prompt_and_reference(r) for r in records[: cfg.log_samples]]
    rows = [(p, ref, data.prompt_ids(tokenizer, p)) for p, ref in rows if p]
    rows = [r for r in rows if len(r[2]) < cfg.max_len]
    if not rows:
        return []
    new = max(1, min(max_new_tokens, cfg.max_len - max(len(ids) for _, _, ids in rows)))
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        groups = HFEngine(model, tokenizer).generate([ids for _, _, ids in rows], n=1, temperature=0.0,
                                                     max_tokens=new, seed=0)
    return [{"prompt": p, "completion": tokenizer.decode(g[0].completion_ids, skip_special_tokens=True),
             "reference": ref} for (p, ref, _), g in zip(rows, groups)]
