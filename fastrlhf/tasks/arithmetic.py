"""The built-in task: integer addition, small enough to train on a CPU in minutes.

    prompt "37+58="  ->  response "95"

Everything the pipeline needs comes from here, with no downloads:
  - a character tokenizer (digits, '+', '=', and the special tokens), saved with
    `PreTrainedTokenizerFast.save_pretrained`, so the model directory loads in transformers
    and vLLM;
  - a tiny Llama-architecture model built from a config (random init; head_dim 64 because
    vLLM's CPU backend needs head_dim >= 32);
  - data generators that imitate the human parts of RLHF:
      * SFT demonstrations from imperfect demonstrators: a share of answers is wrong by a
        little (a carry forgotten, a digit off by one), as people's demonstrations are;
      * preference pairs: two demonstrators' different answers to a prompt (mostly one right,
        one wrong, as two samples of an SFT model are), labelled by a simulated annotator who
        prefers the correct answer, or else the one closer to it, and picks the other one with
        probability `label_noise`;
      * held-out prompts with their ground truth, the exact-match reward for them, and the
        accuracy every stage reports (greedy, or sampled at temperature 1).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from fastrlhf.task import EVAL_SAMPLES, EVAL_TEMPERATURE

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARS = list("0123456789+=")
VOCAB = [PAD, BOS, EOS, UNK] + CHARS


@dataclass(frozen=True)
class ArithmeticTask:
    """Addition of two integers with up to `digits` digits each."""

    digits: int = 2
    seed: int = 0

    def prompt(self, a: int, b: int) -> str:
        return f"{a}+{b}="

    def sample_operands(self, rng: random.Random) -> tuple[int, int]:
        hi = 10**self.digits - 1
        return rng.randint(0, hi), rng.randint(0, hi)

    def split(self, n: int, which: str) -> list[tuple[int, int]]:
        """Deterministic operand pairs; "train" and "test" never share a pair."""
        rng = random.Random(f"{self.seed}-{which}")
        n = min(n, self.split_size(which))  # all of the split when more is asked for
        out, seen = [], set()
        while len(out) < n:
            a, b = self.sample_operands(rng)
            if (which == "test") == _held_out(a, b) and (a, b) not in seen:
                seen.add((a, b))
                out.append((a, b))
        return out

    def split_size(self, which: str) -> int:
        """How many distinct operand pairs the split holds (2 digits: 986 test, 9014 train)."""
        test = _held_out_count(self.digits)
        return test if which == "test" else 10 ** (2 * self.digits) - test


@functools.cache
def _held_out_count(digits: int) -> int:
    r = range(10**digits)
    return sum(_held_out(a, b) for a in r for b in r)


def _held_out(a: int, b: int) -> bool:
    """A fixed ~10% of operand pairs, chosen by a hash with no arithmetic structure (a split
    by (k1*a + k2*b) mod 10 would hold out exactly the sums ending in one digit)."""
    return hashlib.sha256(f"{a},{b}".encode()).digest()[0] < 26


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A human-like mistake: a forgotten carry, or one digit off by one."""
    c = a + b
    if rng.random() < 0.5 and (a % 10) + (b % 10) >= 10:
        return c - 10  # forgot the carry
    digits = list(str(c))
    i = rng.randrange(len(digits))
    d = int(digits[i])
    digits[i] = str(d + 1 if d < 9 and (d == 0 or rng.random() < 0.5) else d - 1)
    w = int("".join(digits))
    return w if w != c else c + 1


def sft_examples(task: ArithmeticTask, n: int, *, error_rate: float = 0.15, seed: int = 0):
    """{"prompt", "response"} demonstrations, `error_rate` of them wrong."""
    rng = random.Random(seed)
    out = []
    for a, b in task.split(n, "train"):
        ans = demonstrator_answer(a, b, rng, error_rate)
        out.append({"prompt": task.prompt(a, b), "response": str(ans)})
    return out


def demonstrator_answer(a: int, b: int, rng: random.Random, error_rate: float = 0.15) -> int:
    """One imperfect demonstrator's answer: right, or with probability error_rate a human-like
    mistake (wrong_answer)."""
    return wrong_answer(a, b, rng) if rng.random() < error_rate else a + b


def two_answers(a: int, b: int, rng: random.Random, error_rate: float = 0.15) -> tuple[int, int]:
    """Two different answers to compare, as the annotator sees them: two demonstrators (or two
    samples of a policy trained on them) answering the same prompt, drawn again while they
    agree (identical responses carry no preference)."""
    for _ in range(100):
        x, y = demonstrator_answer(a, b, rng, error_rate), demonstrator_answer(a, b, rng, error_rate)
        if x != y:
            return x, y
    return a + b, wrong_answer(a, b, rng)


def preference_pairs(task: ArithmeticTask, n: int, *, label_noise: float = 0.1, seed: int = 1,
                     candidates=None, split: str = "train"):
    """{"prompt", "chosen", "rejected"} from a simulated annotator.

    candidates(a, b, rng) -> (x, y) gives the two responses to compare (default: two_answers,
    two imperfect demonstrators' different answers, so most pairs hold one right and one wrong
    answer, as in comparisons of an SFT model's samples); the annotator prefers the one whose
    value is closer to a + b (ties broken at random) and flips with probability label_noise.
    """
    rng = random.Random(seed)
    out = []
    for a, b in task.split(n, split):
        x, y = (candidates or two_answers)(a, b, rng)
        better = annotate(a, b, x, y, rng, label_noise)
        chosen, rejected = (x, y) if better == 0 else (y, x)
        out.append({"prompt": task.prompt(a, b), "chosen": str(chosen), "rejected": str(rejected)})
    return out


def annotate(a: int, b: int, x: int, y: int, rng: random.Random, label_noise: float) -> int:
    """0 if the annotator prefers x, 1 if y."""
    dx, dy = abs(x - (a + b)), abs(y - (a + b))
    pick = 0 if dx < dy else 1 if dy < dx else rng.randrange(2)
    return 1 - pick if rng.random() < label_noise else pick


def heldout_prompts(task: ArithmeticTask, n: int):
    """{"prompt", "answer"} for evaluation and rule rewards."""
    return [{"prompt": task.prompt(a, b), "answer": str(a + b)} for a, b in task.split(n, "test")]


def train_prompts(task: ArithmeticTask, n: int):
    """{"prompt", "answer"} from the training split: the prompts online RL samples on."""
    return [{"prompt": task.prompt(a, b), "answer": str(a + b)} for a, b in task.split(n, "train")]


def exact_match(prompt: str, response: str, answer: str, **_) -> float:
    """The rule reward: 1.0 if the response (up to the end token) is the answer. Usable as
    `reward_fn: fastrlhf.tasks.arithmetic:exact_match` (other record fields are ignored)."""
    return 1.0 if response.split(EOS)[0].strip() == answer else 0.0


def write_jsonl(rows, path: str | os.PathLike) -> Path:
    """Write rows atomically (tmp file + rename)."""
    from fastrlhf.files import write_atomic

    path = Path(path)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------
# tokenizer and model
# ----------------------------------------------------------------------------------------


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast over VOCAB (bos added, eos appended by us)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters back into one string, no spaces
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB.index(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side="right")


# head_dim = hidden / heads = 64 in both: vLLM's CPU backend needs head_dim >= 32
MODEL_SIZES = {
    "tiny": dict(hidden_size=128, layers=2, heads=2),  # 0.4M parameters: for fast tests
    "small": dict(hidden_size=256, layers=4, heads=4),  # 3.2M parameters: the examples and demo
    "medium": dict(hidden_size=256, layers=8, heads=4),  # 6.3M parameters: depth for reward models
}


def build_model(*, hidden_size: int = 128, layers: int = 2, heads: int = 2, seed: int = 0,
                max_positions: int = 1024):
    """The tiny Llama for the task (head_dim = hidden_size / heads = 64)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=VOCAB.index(BOS), eos_token_id=VOCAB.index(EOS), pad_token_id=VOCAB.index(PAD),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_base_model(out_dir: str | os.PathLike, **model_kw) -> Path:
    """Write the untrained model + tokenizer as an HF directory (config, safetensors,
    tokenizer), atomically."""
    from transformers.utils import logging as hf_logging

    from fastrlhf.models import save_pretrained_atomic

    hf_logging.disable_progress_bar()
    return save_pretrained_atomic(build_model(**model_kw), build_tokenizer(), out_dir)


# ----------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------


def answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 5, temperature: float = 0.0,
            samples: int = 1, seed: int = 0) -> list[list[str]]:
    """Completions of each prompt: greedy (temperature 0, one per prompt) or `samples` draws at
    `temperature` from the full distribution (no top-k/top-p), seeded without touching the
    global RNG. Batched by prompt length (no padding needed for this task)."""
    import torch

    sample = temperature > 0
    n = samples if sample else 1
    model.eval()
    out: list[list[str]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    device = next(model.parameters()).device
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=n) if sample \
        else dict(do_sample=False)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, idx in sorted(by_len.items()):
            ids = torch.tensor([encoded[i] for i in idx], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw)
            rows = gen[:, length:].tolist()  # (len(idx) * n, new tokens), each prompt's n rows together
            for j, i in enumerate(idx):
                out[i] = [tokenizer.decode(r, skip_special_tokens=True) for r in rows[j * n:(j + 1) * n]]
    return out




def accuracy(model, tokenizer, heldout: list[dict], *, max_new_tokens: int = 5, temperature: float = 0.0,
             samples: int = 1, seed: int = 0) -> float:
    """Share of held-out answers that are exact: greedy by default; with temperature > 0 the
    mean over `samples` draws per prompt (the policy's behaviour when sampled, which greedy
    decoding hides: a model that copied 15% wrong demonstrations is usually right at its mode)."""
    got = answers(model, tokenizer, [r["prompt"] for r in heldout], max_new_tokens=max_new_tokens,
                  temperature=temperature, samples=samples, seed=seed)
    hits = [a == r["answer"] for outs, r in zip(got, heldout) for a in outs]
    return sum(hits) / max(1, len(hits))


def sampled_accuracy(model, tokenizer, heldout: list[dict], max_new_tokens: int = 5) -> float:
    """The sampled protocol every stage reports: accuracy over EVAL_SAMPLES draws per prompt at
    EVAL_TEMPERATURE."""
    return accuracy(model, tokenizer, heldout, max_new_tokens=max_new_tokens, temperature=EVAL_TEMPERATURE,
                    samples=EVAL_SAMPLES)


# ----------------------------------------------------------------------------------------
# the task behind the trainers' interface (fastrlhf.task.Task)
# ----------------------------------------------------------------------------------------


class Arithmetic:
    """The built-in task as a trainer sees it, sized by the run's config (its task_* fields and
    seed): the tiny model (task_model_size), the imperfect demonstrations, the annotator's pairs,
    the prompt splits, exact match as the reward and the accuracy evaluator."""

    reward_fn = "fastrlhf.tasks.arithmetic:exact_match"

    def __init__(self, cfg):
        self.cfg = cfg
        self.problems = ArithmeticTask(seed=cfg.seed)

    def base_model(self, out_dir: str | os.PathLike) -> Path:
        size = MODEL_SIZES[self.cfg.task_model_size] if hasattr(self.cfg, "task_model_size") else {}
        return save_base_model(out_dir, seed=self.cfg.seed, **size)

    def tokenizer(self):
        return build_tokenizer()

    def demonstrations(self) -> tuple[list[dict], list[dict]]:
        """The demonstrations (distinct operand pairs): the first 5% held out."""
        records = sft_examples(self.problems, self.cfg.task_examples, error_rate=self.cfg.task_error_rate,
                               seed=self.cfg.seed)
        n_eval = max(1, len(records) // 20)
        return records[n_eval:], records[:n_eval]

    def preference_pairs(self) -> tuple[list[dict], list[dict]]:
        kw = dict(label_noise=self.cfg.task_label_noise)
        return (preference_pairs(self.problems, self.cfg.task_pairs, seed=self.cfg.seed + 1, **kw),
                preference_pairs(self.problems, self.cfg.task_eval_pairs, seed=self.cfg.seed + 2, split="test", **kw))

    def prompts(self) -> tuple[list[dict], list[dict]]:
        return train_prompts(self.problems, self.cfg.task_prompts), self.heldout

    @functools.cached_property
    def heldout(self) -> list[dict]:
        return heldout_prompts(self.problems, self.cfg.task_eval_prompts)

    def evaluate(self, model, tokenizer, *, sampled: bool = False) -> dict:
        """Greedy exact match on the held-out prompts (accuracy) and, sampled=True, over
        EVAL_SAMPLES draws per prompt at EVAL_TEMPERATURE (sample_accuracy); {} without prompts."""
        if not self.heldout:
            return {}
        out = {"accuracy": accuracy(model, tokenizer, self.heldout)}
        if sampled:
            out["sample_accuracy"] = sampled_accuracy(model, tokenizer, self.heldout)
        return out
