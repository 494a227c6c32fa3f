"""What the online trainers (grpo.py, ppo.py) share before and after the update: prompts,
the rollout through the phase switch, rewards (a function's or a reward model's), evaluation,
samples.jsonl rows. The step's tensors are batch.RolloutBatch's; the update is update.py's.

Shapes: P prompts per step, G samples per prompt, B = P * G samples.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import random
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf import data, dist, models
from fastrlhf.algos.batch import sequences
from fastrlhf.rollout import Sample
from fastrlhf.task import EVAL_SAMPLES, EVAL_TEMPERATURE


@dataclass
class Prompt:
    record: dict  # the prompt's JSONL record: "prompt", "answer", any other fields
    ids: list[int]


# ----------------------------------------------------------------------------------------
# prompts and rewards
# ----------------------------------------------------------------------------------------


def load_prompt_sets(cfg, task, tokenizer, counters: dict) -> tuple[list[Prompt], list[Prompt]]:
    """The task's training and held-out prompts, tokenized. A prompt that leaves no room for
    max_new_tokens in max_len is skipped and counted."""
    train, heldout = task.prompts()

    def tokenize(records, what):
        out = []
        for r in records:
            if data.too_long(r["prompt"], cfg.max_len):
                counters["skipped_long_prompts"] = counters.get("skipped_long_prompts", 0) + 1
                continue
            ids = data.prompt_ids(tokenizer, r["prompt"])
            if len(ids) + cfg.max_new_tokens > cfg.max_len:
                counters["skipped_long_prompts"] = counters.get("skipped_long_prompts", 0) + 1
                continue
            out.append(Prompt(r, ids))
        if not out:
            raise data.DataError(f"{what}: no prompt leaves room for max_new_tokens={cfg.max_new_tokens} "
                                 f"in max_len={cfg.max_len}")
        return out

    return tokenize(train, "prompts"), tokenize(heldout, "held-out prompts")


class RewardError(ValueError):
    """The reward could not be computed for any sample of a step (the run stops, exit 2)."""


class RewardFunction:
    """A user's Python reward function "module:function" (or "path/to/file.py:function"; the
    working directory is importable, as with `python -m`), called the way it is written:

      TRL's batched form, when its parameters include `prompts` or `completions`:
          fn(prompts=[...], completions=[...], completion_ids=[...], **{field: [...]}) -> list[float | None]
        one call per step; completions are strings for string prompts and
        [{"role": "assistant", "content": text}] for conversational ones, as TRL passes them;
        the prompt records' other fields (e.g. answer) arrive as lists; None marks a sample
        the function cannot score;
      ours, per sample, otherwise:  fn(prompt, response, **fields) -> float.

    A sample whose score fails (an exception, None, or a non-finite number) is marked failed
    (counted in reward_failures, not trained on); the first failure's traceback is printed
    once; a step where every sample failed stops the run with that error (RewardError)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = _import_function(spec)
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            params = {}
        self.batched = "completions" in params or "prompts" in params
        self.reported = False

    def __call__(self, samples: list[Sample], prompts: list[Prompt], tokenizer, counters: dict) -> None:
        """Fill sample.reward (and sample.info["failed"] where scoring failed)."""
        if not samples:
            return
        records = [prompts[s.prompt_index].record for s in samples]
        texts = [tokenizer.decode(s.completion_ids, skip_special_tokens=True) for s in samples]
        if self.batched:
            scores, errors = self._batched(samples, records, texts)
        else:
            scores, errors = zip(*(self._one(rec, text) for rec, text in zip(records, texts)))
        first = None
        for s, r, err in zip(samples, scores, errors):
            if err is not None:
                s.info["failed"] = err[0]
                counters["reward_failures"] = counters.get("reward_failures", 0) + 1
                first = first or err
                r = 0.0
            s.reward = r
        if first is not None and not self.reported:
            self.reported = True
            print(f"reward function {self.spec} failed on a sample ({first[0]}); failed samples are counted in "
                  f"reward_failures and not trained on. This traceback is shown once:\n{first[1]}",
                  file=sys.stderr, flush=True)
        if all("failed" in s.info for s in samples):
            raise RewardError(f"reward function {self.spec}: every sample of the step failed; the first: {first[0]}")

    def _one(self, rec: dict, text: str):
        extra = {k: v for k, v in rec.items() if k != "prompt"}
        return _scored(lambda: self.fn(rec["prompt"], text, **extra))

    def _batched(self, samples, records, texts):
        fields = {k for rec in records for k in rec if k != "prompt"}
        kwargs = {k: [rec.get(k) for rec in records] for k in sorted(fields)}
        completions = [[{"role": "assistant", "content": t}] if isinstance(rec["prompt"], list) else t
                       for rec, t in zip(records, texts)]
        try:
            out = list(self.fn(prompts=[rec["prompt"] for rec in records], completions=completions,
                               completion_ids=[list(s.completion_ids) for s in samples], **kwargs))
            if len(out) != len(samples):
                raise ValueError(f"returned {len(out)} scores for {len(samples)} completions")
        except Exception as e:  # the whole call failed: every sample of it did
            return [0.0] * len(samples), [_failure(e)] * len(samples)
        return tuple(zip(*(_scored(lambda r=r: r) for r in out)))


def _scored(score) -> tuple[float, tuple[str, str] | None]:
    """(the score score() gives, None), or (0.0, (the error, its traceback)) when it raises or
    gives None or a non-finite number: a user's function's failure is the sample's, not the run's."""
    try:
        r = score()
        if r is None:
            raise ValueError("returned None")
        r = float(r)
        if not math.isfinite(r):
            raise ValueError(f"returned {r}")
        return r, None
    except Exception as e:
        return 0.0, _failure(e)


def _failure(e: Exception) -> tuple[str, str]:
    return f"{type(e).__name__}: {e}", traceback.format_exc()


def _import_function(spec: str):
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise data.DataError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.exists():
                raise ImportError(f"no such file {path}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # `fastrlhf` (a console script) does not add it
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise data.DataError(f"reward function {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise data.DataError(f"reward function {spec!r} is not callable")
    return fn


def resolve_reward(cfg, task) -> RewardFunction | None:
    """The run's reward function: --reward_fn; none with a reward model; else the task's own for
    its prompts (the built-in task's exact match). Your own prompts need a reward."""
    if cfg.reward_model:
        if cfg.reward_fn:
            raise ValueError("give reward_fn or reward_model, not both")
        return None
    if cfg.reward_fn or task.reward_fn:
        return RewardFunction(cfg.reward_fn or task.reward_fn)
    raise ValueError(f"data={cfg.data!r} needs a reward: --reward_fn module:function (TRL's batched "
                     "fn(prompts, completions, **fields) or fn(prompt, response, **fields)) or --reward_model DIR")


@torch.no_grad()
def score_with_model(rm, samples: list[Sample], budget: int, device) -> None:
    """Fill sample.reward with the reward model's score (models.sequence_rewards); one read-back
    for the step (the scores are the samples': samples.jsonl, failed-sample imputation)."""
    rm.eval()
    packs = data.pack(sequences(samples), budget)
    repeats = 0
    if models.is_sharded(rm):  # every rank runs as many forwards (each gathers the model's layers)
        repeats = dist.max_over_ranks(len(packs)) - len(packs)  # agreed before any forward
    scores = [models.sequence_rewards(rm, data.to_device(mb, device)).float() for mb in packs]
    if repeats:
        filler = packs[0] if packs else data.pack([([0, 0], [data.IGNORE, 0])], budget)[0]
        for _ in range(repeats):
            models.sequence_rewards(rm, data.to_device(filler, device))
    for s, r in zip(samples, torch.cat(scores).tolist() if scores else []):
        s.reward = r


def impute_failed(groups: list[list[Sample]]) -> None:
    """A failed sample takes its group's mean valid reward: it then moves neither the group's
    baseline nor anyone's advantage (its own advantage is ~0 and it is not trained on)."""
    for g in groups:
        ok = [s.reward for s in g if "failed" not in s.info]
        mean = sum(ok) / len(ok) if ok else 0.0
        for s in g:
            if "failed" in s.info:
                s.reward = mean


def check_processes(cfg) -> None:
    """On several processes (torchrun) each rank generates its share of the prompts on its own
    vLLM engine (or, rollout_tp > 1, its group's): the HF engine (a sharded model's generate needs
    every rank in every forward), fewer prompts than ranks and TP groups that do not divide the
    ranks are refused before anything runs."""
    if dist.launched() and cfg.engine == "hf":
        raise ValueError("on several processes each rank generates with its own vLLM engine: engine=vllm (or auto)")
    if cfg.prompts_per_step < dist.launched_size():
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step}: fewer prompts than the "
                         f"{dist.launched_size()} ranks")
    tp, n = cfg.rollout_tp, dist.launched_size()
    if tp > 1 and (n == 1 or n % tp):
        where = "one process has no ranks to group" if n == 1 else f"the {n} ranks do not split into groups of {tp}"
        raise ValueError(f"rollout_tp={tp}: {where}; expected a divisor of torchrun's --nproc_per_node")
    if tp > 1 and cfg.engine != "vllm":
        raise ValueError(f"rollout_tp={tp}: tensor-parallel generation is vLLM's; "
                         f"set engine=vllm (engine={cfg.engine})")


def step_prompts(prompts: list, cfg, step: int) -> list:
    """The P prompts of a step: a seeded shuffle per pass over the prompts (resumable)."""
    per_epoch = max(1, len(prompts) // cfg.prompts_per_step)
    epoch, index = divmod(step, per_epoch)
    order = list(range(len(prompts)))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    return [prompts[i] for i in order[index * cfg.prompts_per_step:(index + 1) * cfg.prompts_per_step]]


def global_stats(values: list[float]) -> tuple[float, float]:
    """Mean and unbiased standard deviation of values over every rank's (one process: its own)."""
    n, s1, s2 = dist.sum_over_ranks([len(values), sum(values), sum(v * v for v in values)])
    mean = s1 / max(1, n)
    return mean, math.sqrt(max(0.0, s2 - n * mean * mean) / (n - 1)) if n > 1 else math.nan


def rollout(colocated, prompts: list[Prompt], cfg, step: int, indices: list[int] | None = None):
    """Step 3 of both trainers, through the phase switch (rollout.Colocated: the training state
    off the device, the policy's weights into the engine, the engine asleep and the state back
    afterwards): G samples for each prompt. indices: the prompts' places in the step's global
    batch (a rank's share: sampled as one process would). Returns (groups [[Sample] * G] * P,
    timing and memory metrics)."""
    with colocated.generating() as engine:
        groups = engine.generate([p.ids for p in prompts], n=cfg.group_size, temperature=cfg.temperature,
                                 top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + step,
                                 indices=indices)
    return groups, dict(colocated.metrics)


def make_scorer(reward_fn: RewardFunction | None, rm, tokenizer, budget: int, device):
    """scorer(samples, prompts, counters): fills sample.reward with the reward function's score,
    or the reward model's (models.sequence_rewards) when there is one."""
    if rm is not None:
        return lambda samples, prompts, counters: score_with_model(rm, samples, budget, device)
    return lambda samples, prompts, counters: reward_fn(samples, prompts, tokenizer, counters)


def start_evaluation(colocated, heldout, tokenizer, cfg, scorer, log) -> dict:
    """The held-out scores before any update, logged as step 0; returned as <metric>_start."""
    res = evaluate(colocated, heldout, tokenizer, cfg.max_new_tokens, scorer)
    log.log(0, {"rollout/engine": colocated.name, **res})
    return {f"{k}_start": v for k, v in res.items()}


def evaluate(colocated, heldout: list[Prompt], tokenizer, max_new_tokens: int, scorer=None) -> dict:
    """The held-out prompts with the current weights: eval/reward, the mean score (reward
    function or reward model, see make_scorer) of the greedy completions, and eval/sample_reward,
    theirs over EVAL_SAMPLES draws per prompt at EVAL_TEMPERATURE (the policy's own distribution:
    what RL changes most); where the prompts carry an answer, eval/accuracy (greedy, exact match)
    and eval/sample_accuracy (the draws, exact match). It goes through the same phase switch as a
    training rollout."""
    with_answers = all(p.record.get("answer") is not None for p in heldout)
    mine = dist.share(list(range(len(heldout))))  # sharded: each rank its share, the counts summed
    prompts = [heldout[i] for i in mine]
    with colocated.generating() as engine:
        groups = engine.generate([p.ids for p in prompts], n=1, temperature=0.0,
                                 max_tokens=max_new_tokens, seed=0, indices=mine)
        drawn = engine.generate([p.ids for p in prompts], n=EVAL_SAMPLES, temperature=EVAL_TEMPERATURE,
                                max_tokens=max_new_tokens, seed=0, indices=mine) \
            if with_answers or scorer is not None else None
    text = lambda s: tokenizer.decode(s.completion_ids, skip_special_tokens=True).strip()  # noqa: E731
    # greedy hits, prompts, sampled hits, draws, reward sum, scored (greedy, sampled)
    counts = [0, 0, 0, 0, 0.0, 0, 0.0, 0]
    if with_answers:
        hits = [text(s) == p.record["answer"] for g, p in zip(drawn, prompts) for s in g]
        counts[:4] = [sum(text(g[0]) == p.record["answer"] for g, p in zip(groups, prompts)), len(prompts),
                      sum(hits), len(hits)]
    if scorer is not None:
        samples = [g[0] for g in groups]
        scorer(samples, prompts, {})
        scored = [s.reward for s in samples if "failed" not in s.info]
        draws_scored = [s for g in drawn for s in g]
        scorer(draws_scored, prompts, {})
        sampled_scores = [s.reward for s in draws_scored if "failed" not in s.info]
        counts[4:] = [sum(scored), len(scored), sum(sampled_scores), len(sampled_scores)]
    greedy, n, sampled, draws, reward, n_scored, sample_reward, n_sampled = dist.sum_over_ranks(counts)
    out = {}
    if with_answers:
        out["eval/accuracy"] = greedy / n
        out["eval/sample_accuracy"] = sampled / draws
    if scorer is not None:
        out["eval/reward"] = reward / max(1, n_scored)
        out["eval/sample_reward"] = sample_reward / max(1, n_sampled)
    return out


def sample_rows(samples: list[Sample], prompts: list[Prompt], tokenizer, n: int) -> list[dict]:
    """The first n samples as samples.jsonl rows: prompt, completion text, reward (and why
    scoring failed, when it did)."""
    rows = []
    for s in samples[:n]:
        row = {"prompt": prompts[s.prompt_index].record["prompt"],
               "completion": tokenizer.decode(s.completion_ids, skip_special_tokens=True),
               "reward": s.reward, "finish_reason": s.finish_reason}
        if "failed" in s.info:
            row["reward_failed"] = s.info["failed"]
        rows.append(row)
    return rows


def rollout_stats(samples: list[Sample]) -> dict:
    """rollout/response_len (mean completion tokens) and rollout/overlong_frac (share that hit
    max_new_tokens), from the host's token ids, over every rank's samples; rollout/tokens (all)."""
    n, tokens, overlong = dist.sum_over_ranks([len(samples), sum(len(s.completion_ids) for s in samples),
                                               sum(s.finish_reason == "length" for s in samples)])
    return {"rollout/response_len": tokens / n, "rollout/overlong_frac": overlong / n, "rollout/tokens": int(tokens)}
