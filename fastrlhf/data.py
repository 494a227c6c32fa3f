"""Datasets: JSONL / parquet readers, the record formats, tokenisation and packing.

Formats (DESIGN.md):
    prompts      {"prompt": str | messages, "answer"?: str, ...}
    SFT          {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
    preferences  {"prompt", "chosen", "rejected"}  or  {"prompt", "responses": [best, ..., worst]}
A malformed record stops the run before training with `DataError("<file>:<line>: <problem>")`.

Packing (padding-free): sequences are concatenated into micro-batches of at most
`max_tokens` tokens. Each micro-batch carries `position_ids` restarting at 0 for every
sequence and `cu_seqlens` (cumulative lengths), which the attention function of models.py
uses to keep the sequences apart. No FLOPs are spent on padding.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the problem."""


# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a .jsonl or .parquet file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        return [(i + 1, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append((lineno, rec))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _field(rec: dict, name: str, where: str, kinds=(str,)):
    if name not in rec:
        raise DataError(f"{where}: missing field {name!r} (has {sorted(rec)})")
    if not isinstance(rec[name], kinds):
        raise DataError(f"{where}: field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {type(rec[name]).__name__}")
    return rec[name]


def _check_messages(msgs, where: str) -> list[dict]:
    if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    return msgs


def load_sft(path) -> list[dict]:
    """[{"prompt": str | messages, "response": str}] (messages: the last one is the response)."""
    out = []
    for lineno, rec in read_records(path):
        where = f"{path}:{lineno}"
        if "messages" in rec:
            msgs = _check_messages(rec["messages"], where)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's response")
            out.append({"prompt": msgs[:-1], "response": msgs[-1]["content"]})
        else:
            out.append({"prompt": _field(rec, "prompt", where, (str, list)),
                        "response": _field(rec, "response", where)})
    return out


def load_preferences(path) -> list[dict]:
    """[{"prompt", "chosen", "rejected"}]; a ranking of K responses gives its K(K-1)/2 pairs."""
    out = []
    for lineno, rec in read_records(path):
        where = f"{path}:{lineno}"
        prompt = _field(rec, "prompt", where, (str, list))
        if "responses" in rec:
            ranked = _field(rec, "responses", where, (list,))
            if len(ranked) < 2 or not all(isinstance(r, str) for r in ranked):
                raise DataError(f"{where}: 'responses' must list at least 2 strings, best first")
            out += [{"prompt": prompt, "chosen": ranked[i], "rejected": ranked[j]}
                    for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
        else:
            out.append({"prompt": prompt, "chosen": _field(rec, "chosen", where),
                        "rejected": _field(rec, "rejected", where)})
    return out


def load_prompts(path) -> list[dict]:
    """[{"prompt": str | messages, "answer": str | None, ...the other fields}]."""
    out = []
    for lineno, rec in read_records(path):
        where = f"{path}:{lineno}"
        _field(rec, "prompt", where, (str, list))
        if "answer" in rec and not isinstance(rec["answer"], str):
            raise DataError(f"{where}: field 'answer' must be str, got {type(rec['answer']).__name__}")
        out.append(dict(rec, answer=rec.get("answer")))
    return out


# ----------------------------------------------------------------------------------------
# tokenising
# ----------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt: a plain string (with BOS), or messages through the chat template."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    return tokenizer(prompt)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response, ended with EOS (no BOS)."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class Truncations:
    """Counts what did not fit; warns once at the end of tokenisation."""
    truncated: int = 0
    skipped: int = 0
    examples: list = field(default_factory=list)

    def report(self, what: str, max_len: int) -> None:
        if self.truncated or self.skipped:
            warnings.warn(f"{what}: {self.truncated} sequences truncated to {max_len} tokens, "
                          f"{self.skipped} skipped (prompt alone longer than {max_len})", stacklevel=2)


def tokenize_pair(tokenizer, prompt, response: str, max_len: int, counts: Truncations):
    """(input_ids, labels) with labels = IGNORE on the prompt; None if the prompt is too long."""
    p = prompt_ids(tokenizer, prompt)
    r = response_ids(tokenizer, response)
    if len(p) >= max_len:
        counts.skipped += 1
        return None
    if len(p) + len(r) > max_len:
        counts.truncated += 1
        r = r[: max_len - len(p)]
    return p + r, [IGNORE] * len(p) + r


def tokenize_pairs(tokenizer, pairs: list[dict], max_len: int, what: str):
    """Preference pairs -> [(chosen seq, rejected seq)] as (input_ids, labels); a pair with a
    side that does not fit is skipped and counted."""
    counts = Truncations()
    out = []
    for p in pairs:
        c = tokenize_pair(tokenizer, p["prompt"], p["chosen"], max_len, counts)
        r = tokenize_pair(tokenizer, p["prompt"], p["rejected"], max_len, counts)
        if c is not None and r is not None:
            out.append((c, r))
    counts.report(what, max_len)
    if not out:
        raise DataError(f"{what}: no preference pair fits in max_len={max_len}")
    return out


# ----------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------


def pack(sequences: list[tuple[list[int], list[int]]], max_tokens: int) -> list[dict]:
    """Greedy, order-keeping packing of (input_ids, labels) pairs into micro-batches of at most
    max_tokens tokens. Each micro-batch: input_ids, labels, position_ids (1, total) int64,
    cu_seqlens (n + 1,) int32, max_seqlen int, seq_index list (which sequences it holds).
    Labels are shifted for next-token prediction inside each sequence: labels[t] is the
    target at position t (the last position of every sequence gets IGNORE)."""
    batches, cur = [], []

    def flush():
        if not cur:
            return
        ids, labels, pos, cu, index = [], [], [], [0], []
        for i, (x, y) in cur:
            ids += x
            labels += y[1:] + [IGNORE]
            pos += list(range(len(x)))
            cu.append(cu[-1] + len(x))
            index.append(i)
        batches.append({
            "input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]), "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "max_seqlen": max(len(x) for _, (x, _) in cur), "seq_index": index,
        })
        cur.clear()

    used = 0
    for i, (x, y) in enumerate(sequences):
        if len(x) > max_tokens:
            raise ValueError(f"sequence {i} has {len(x)} tokens, more than max_tokens={max_tokens}")
        if used + len(x) > max_tokens:
            flush()
            used = 0
        cur.append((i, (x, y)))
        used += len(x)
    flush()
    return batches


def to_device(mb: dict, device) -> dict:
    """A micro-batch from pack / pad_batch with its tensors on device (seq_index etc. kept)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}


def pad_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """The padded alternative (for comparisons): right-padded (B, T) with an attention mask."""
    T = max(len(x) for x, _ in sequences)
    ids = torch.full((len(sequences), T), pad_id)
    labels = torch.full((len(sequences), T), IGNORE)
    attn = torch.zeros((len(sequences), T), dtype=torch.long)
    for b, (x, y) in enumerate(sequences):
        ids[b, : len(x)] = torch.tensor(x)
        labels[b, : len(x)] = torch.tensor(y[1:] + [IGNORE])
        attn[b, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}
