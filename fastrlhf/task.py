"""The seam between the trainers and where their data comes from.

A trainer takes a Task and never knows which one it is: the built-in arithmetic task
(fastrlhf.tasks.arithmetic.Arithmetic) or the user's files (FileData). The composition root
chooses (fastrlhf.tasks.for_config, called by the CLI and the demo): the user's files for what
--data / --eval_data give, the built-in task for the rest.

    task.base_model(out_dir)   the model to start from when --model is empty (an HF directory)
    task.tokenizer()           its tokenizer (before that model is written)
    task.demonstrations()      SFT records ({"prompt", "response"}): (train, held-out)
    task.preference_pairs()    pairs ({"prompt", "chosen", "rejected"}): (train, held-out)
    task.prompts()             prompts ({"prompt", + "answer" for rule rewards}): (train, held-out)
    task.reward_fn             the reward function for its prompts ("module:function"; "": none)
    task.evaluate(model, tokenizer, sampled=False)
                               {"accuracy": ..., ["sample_accuracy": ...]} on its held-out
                               prompts, or {} when it has no evaluator

Records are in the formats of docs/models-and-data.md, the same a user's files hold. The data
is read when asked for, before the base model is written: a data error stops a run first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fastrlhf import data

# the sampled evaluation protocol every stage reports (eval/sample_accuracy): draws per
# held-out prompt, at the policy's own distribution
EVAL_SAMPLES = 4
EVAL_TEMPERATURE = 1.0


class Task(Protocol):
    reward_fn: str

    def base_model(self, out_dir: Path) -> Path: ...

    def tokenizer(self): ...

    def demonstrations(self) -> tuple[list[dict], list[dict]]: ...

    def preference_pairs(self) -> tuple[list[dict], list[dict]]: ...

    def prompts(self) -> tuple[list[dict], list[dict]]: ...

    def evaluate(self, model, tokenizer, *, sampled: bool = False) -> dict: ...


class FileData:
    """The user's files (cfg.data, cfg.eval_data) in front of a fallback task: training data from
    cfg.data when given, held-out data from cfg.eval_data, else a 5% split of cfg.data by prompt
    (a duplicated prompt cannot land on both sides), else the fallback's; the fallback's base
    model and tokenizer (used only without --model); no evaluator and no default reward for the
    user's own data (a reward must be named)."""

    def __init__(self, cfg, fallback: Task):
        self.cfg, self.fallback = cfg, fallback
        self.reward_fn = "" if cfg.data else fallback.reward_fn

    def base_model(self, out_dir: Path) -> Path:
        return self.fallback.base_model(out_dir)

    def tokenizer(self):
        return self.fallback.tokenizer()

    def _split(self, load, builtin) -> tuple[list[dict], list[dict]]:
        if not self.cfg.data:
            train, heldout = builtin()
            return train, load(self.cfg.eval_data) if self.cfg.eval_data else heldout
        train = load(self.cfg.data)
        if self.cfg.eval_data:
            return train, load(self.cfg.eval_data)
        return data.split_heldout(train)

    def demonstrations(self):
        return self._split(data.load_sft, self.fallback.demonstrations)

    def preference_pairs(self):
        return self._split(data.load_preferences, self.fallback.preference_pairs)

    def prompts(self):
        return self._split(data.load_prompts, self.fallback.prompts)

    def evaluate(self, model, tokenizer, *, sampled: bool = False) -> dict:
        return {} if self.cfg.data else self.fallback.evaluate(model, tokenizer, sampled=sampled)
