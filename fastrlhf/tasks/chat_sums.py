"""The real-model task: sums asked in chat, verified by the last number of the reply.

    {"prompt": [{"role": "user", "content": "What is 3 + 5?"}], "answer": "8"}
    {"prompt": [{"role": "user", "content": "Tom has 12 apples and gets 7 more. How many apples does
                 Tom have now?"}], "answer": "19"}

SmolLM2-135M-Instruct solves these partly: greedy it is right on about 70% of the bare sums and 45%
of the word problems, sampled at temperature 1 on 10-20% (it rambles, and its sampled arithmetic
drifts). That gap between its mode and its samples is what RL closes, and the verifier makes the
reward exact. Everything here is data and a reward function in the formats any user passes
(`--data`, `--eval_data`, `--reward_fn fastrlhf.tasks.chat_sums:reward`), so the real-model demo
(fastrlhf.demo --model smollm2) runs the trainers exactly as a user does.

    prompts(n, split)        held-out and training prompts, disjoint ("test" / "train")
    reward(...)              TRL's batched reward: 1.0 where the reply's last number is the answer
    label_pairs(pairs, ...)  a simulated annotator for `fastrlhf pairs` output: chosen = the reply
                             the verifier accepts, rejected = the one it does not
"""

from __future__ import annotations

import hashlib
import random
import re

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Zoe")
ITEMS = ("apples", "pencils", "books", "cookies", "marbles", "stickers")
_NUMBER = re.compile(r"-?\d+")


def _question(rng: random.Random, word_problem: bool) -> tuple[str, int]:
    if not word_problem:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        return f"What is {a} + {b}?", a + b
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b


def _held_out(question: str) -> bool:
    """A fixed ~20% of the questions, by a hash of their text (no arithmetic structure)."""
    return hashlib.sha256(question.encode()).digest()[0] < 51


def prompts(n: int, split: str, seed: int = 0) -> list[dict]:
    """n distinct prompt records of one split ("train" or "test"; no question is in both): bare
    sums and word problems drawn alternately (the bare sums, 144 in all, run out first), in a
    fixed order."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: expected train or test")
    rng, out, seen = random.Random(f"{seed}-{split}"), [], set()
    for attempt in range(200 * n):
        if len(out) == n:
            break
        q, ans = _question(rng, word_problem=attempt % 2 == 1)
        if q not in seen and _held_out(q) == (split == "test"):
            seen.add(q)
            out.append({"prompt": [{"role": "user", "content": q}], "answer": str(ans)})
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {split} prompts (asked for {n})")
    return out


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 where the reply's last number is the answer, else 0.0 (TRL's batched form)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(last_number(t) == a) for t, a in zip(texts, answer)]


def label_pairs(pairs: list[dict]) -> tuple[list[dict], int]:
    """`fastrlhf pairs` rows ({"prompt", "a", "b", "answer"}) as preference records: the reply the
    verifier accepts is chosen, the other rejected; pairs where both or neither are right carry no
    preference for it and are dropped (counted). Returns (preferences, dropped)."""
    import json

    out, dropped = [], 0
    for p in pairs:
        ok_a, ok_b = (last_number(p[k]) == p["answer"] for k in ("a", "b"))
        if ok_a == ok_b:
            dropped += 1
            continue
        prompt = json.loads(p["prompt"]) if p["prompt"].startswith("[") else p["prompt"]
        chosen, rejected = (p["a"], p["b"]) if ok_a else (p["b"], p["a"])
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out, dropped
