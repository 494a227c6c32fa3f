"""Datasets: JSONL / parquet readers, the record formats, tokenisation and packing.

Formats (docs/models-and-data.md has them all, TRL's included):
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


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs, `where` being "<file>:<line>" (JSONL) or "<path>:row <n>", from
      - a .jsonl file (one JSON object per line; also .json holding a list of objects);
      - a .parquet file;
      - a directory written by `datasets`' save_to_disk: a Dataset, or a DatasetDict whose
        "train" split is read (name another split as DIR:SPLIT).
    Parquet and datasets directories go through the `datasets` library (pyarrow alone reads
    parquet when it is not installed)."""
    spec = str(path)
    split = None
    if not Path(spec).exists() and ":" in spec and Path(spec.rsplit(":", 1)[0]).is_dir():
        spec, split = spec.rsplit(":", 1)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        rows = _read_saved_dataset(path, split)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    elif path.suffix == ".json" and (text := path.read_text(encoding="utf-8")).lstrip().startswith("["):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows = [(f"{path}:item {i}", r) for i, r in enumerate(loaded)]
    else:
        rows = _read_jsonl(path)
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            out.append((f"{path}:{lineno}", rec))
    return out


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import datasets

        rows = datasets.Dataset.from_parquet(str(path)).to_list()
    except ImportError:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs `datasets` or pyarrow (pip install datasets)") from e
        rows = pq.read_table(path).to_pylist()
    return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]


def _read_saved_dataset(path: Path, split: str | None) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: a directory of data needs the `datasets` library (pip install datasets)") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with `datasets` save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError(f"{path}: no split {name!r} (has {sorted(ds)}); name one as {path}:SPLIT")
        ds, path = ds[name], Path(f"{path}:{name}")
    elif split is not None:
        raise DataError(f"{path}: holds a single Dataset, not splits; drop ':{split}'")
    return [(f"{path}:row {i}", r) for i, r in enumerate(ds.to_list())]


def _field(rec: dict, name: str, where: str, kinds=(str,)):
    if name not in rec:
        raise DataError(f"{where}: missing field {name!r} (has {sorted(rec)})")
    if not isinstance(rec[name], kinds):
        raise DataError(f"{where}: field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {type(rec[name]).__name__}")
    return rec[name]


def _check_messages(msgs, where: str, name: str = "messages") -> list[dict]:
    if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: {name!r} must be a non-empty list of {{'role', 'content'}} objects "
                        "with string values")
    return msgs


def _text_or_messages(rec: dict, name: str, where: str):
    """A field that is a string or a list of messages (TRL's standard / conversational)."""
    if name not in rec:
        raise DataError(f"{where}: missing field {name!r} (has {sorted(rec)})")
    value = rec[name]
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}: field {name!r} must be a string or a list of messages, got {type(value).__name__}")
    return _check_messages(value, where, name) if isinstance(value, list) else value


def _as_turns(response):
    """A response next to a conversational prompt: a string is the assistant's one turn."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return response


def _pair_with_prompt(prompt, response, where: str, name: str):
    """(prompt, response) of one consistent kind: both strings, or messages + messages."""
    if isinstance(prompt, list):
        return prompt, _as_turns(response)
    if isinstance(response, list):
        raise DataError(f"{where}: {name!r} is a list of messages but 'prompt' is a string; give both as "
                        "messages (conversational) or both as strings")
    return prompt, response


def load_sft(path) -> list[dict]:
    """[{"prompt": str | messages, "response": str | messages}] from any of
        {"prompt", "response"}       ours        {"prompt", "completion"}   TRL prompt-completion
        {"messages": [...]}          TRL conversational: every assistant turn is trained on
        {"text": str}                TRL language modelling: every token is trained on
    with prompt / completion as strings or as lists of messages (conversational: rendered with
    the tokenizer's chat template; the loss covers the assistant turns only)."""
    out = []
    for where, rec in read_records(path):
        if "messages" in rec:
            msgs = _check_messages(rec["messages"], where)
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{where}: 'messages' has no assistant turn to train on")
            out.append({"prompt": [], "response": msgs})
        elif "text" in rec and "prompt" not in rec:
            out.append({"prompt": "", "response": _field(rec, "text", where)})
        else:
            prompt = _text_or_messages(rec, "prompt", where)
            name = "completion" if "completion" in rec else "response"
            out.append(dict(zip(("prompt", "response"),
                                _pair_with_prompt(prompt, _text_or_messages(rec, name, where), where, name))))
    return out


def extract_prompt(chosen, rejected):
    """TRL's implicit prompt: the longest common start of chosen and rejected (leading messages,
    or leading characters, not ending inside a word's leading space)."""
    n = 0
    for n in range(min(len(chosen), len(rejected)) + 1):
        if n == min(len(chosen), len(rejected)) or chosen[n] != rejected[n]:
            break
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def load_preferences(path) -> list[dict]:
    """[{"prompt", "chosen", "rejected"}] from
        {"prompt", "chosen", "rejected"}          strings, or messages (TRL conversational)
        {"chosen", "rejected"}                    TRL's implicit prompt: their common start
        {"prompt", "responses": [best, ..., worst]}  a ranking: its K(K-1)/2 pairs."""
    out = []
    for where, rec in read_records(path):
        if "prompt" not in rec and "responses" not in rec:
            chosen, rejected = _text_or_messages(rec, "chosen", where), _text_or_messages(rec, "rejected", where)
            if type(chosen) is not type(rejected):
                raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both messages")
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
            if not prompt:
                raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no common start to take "
                                "it from (TRL's implicit-prompt format)")
            if not chosen or not rejected:
                raise DataError(f"{where}: 'chosen' and 'rejected' are the same after their common prompt")
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            continue
        prompt = _text_or_messages(rec, "prompt", where)
        if "responses" in rec:
            ranked = _field(rec, "responses", where, (list,))
            if len(ranked) < 2 or not all(isinstance(r, (str, list)) for r in ranked):
                raise DataError(f"{where}: 'responses' must list at least 2 responses, best first")
            ranked = [_pair_with_prompt(prompt, r, where, "responses")[1] for r in ranked]
            out += [{"prompt": prompt, "chosen": ranked[i], "rejected": ranked[j]}
                    for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
        else:
            _, chosen = _pair_with_prompt(prompt, _text_or_messages(rec, "chosen", where), where, "chosen")
            _, rejected = _pair_with_prompt(prompt, _text_or_messages(rec, "rejected", where), where, "rejected")
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    kept = [p for p in out if p["chosen"] != p["rejected"]]
    if len(kept) < len(out):
        warnings.warn(f"{path}: {len(out) - len(kept)} pairs whose chosen and rejected are the same skipped "
                      "(they carry no preference)", stacklevel=2)
    if not kept:
        raise DataError(f"{path}: no pair has different chosen and rejected responses")
    return kept


def split_key(record: dict):
    """What a record is split on (split_heldout): its prompt; a record with no prompt of its own
    (SFT's {"messages"} and {"text"}) by its content: a conversation by its turns up to and
    including the first user turn (conversations asking the same first question stay on one side;
    a shared system prompt does not make them one), a text by itself."""
    if record.get("prompt"):
        return record["prompt"]
    response = record.get("response")
    if isinstance(response, list):
        first_user = next((i for i, m in enumerate(response) if m["role"] == "user"), len(response) - 1)
        return response[: first_user + 1]
    return response


def split_heldout(records: list[dict], share: float = 0.05) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a hash of each record's split_key (its prompt, or for prompt-less SFT
    records its first user turn or text): deterministic, and disjoint by content (a prompt that
    appears twice lands on one side only, so duplicated records cannot leak into the held-out
    split). At least one record is held out and one kept. Records that all share one key (one
    prompt repeated) are split by position instead, with a warning that the held-out records
    repeat training content; a single record cannot be split (DataError: give eval data)."""
    import hashlib

    if len(records) < 2:
        raise DataError(f"{len(records)} record: nothing to hold out beside it; give eval data (--eval_data)")
    buckets = [int(hashlib.sha256(json.dumps(split_key(r), sort_keys=True).encode()).hexdigest()[:12], 16)
               for r in records]  # one per record, equal for equal content
    distinct = sorted(set(buckets))
    if len(distinct) < 2:
        warnings.warn(f"{len(records)} records that all share one prompt: the held-out split is by position, so "
                      "held-out scores repeat training content; give eval data (--eval_data) for a real one",
                      stacklevel=2)
        n = max(1, int(share * len(records)))
        return records[:-n], records[-n:]
    cut = distinct[max(0, min(len(distinct) - 2, int(share * len(distinct)) - 1))]  # the held-out share
    return ([r for r, b in zip(records, buckets) if b > cut], [r for r, b in zip(records, buckets) if b <= cut])


def load_prompts(path) -> list[dict]:
    """[{"prompt": str | messages, "answer": str | None, ...the other fields}]."""
    out = []
    for where, rec in read_records(path):
        _text_or_messages(rec, "prompt", where)
        if "answer" in rec and not isinstance(rec["answer"], str):
            raise DataError(f"{where}: field 'answer' must be str, got {type(rec['answer']).__name__}")
        out.append(dict(rec, answer=rec.get("answer")))
    return out


# ----------------------------------------------------------------------------------------
# tokenising
# ----------------------------------------------------------------------------------------


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of messages rendered by the tokenizer's chat template (transformers 5 returns
    a mapping from apply_chat_template(tokenize=True): read its input_ids)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the data holds chat messages but the tokenizer has no chat_template: give the "
                        "model directory a tokenizer with one, or use string prompts")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt: a plain string (with BOS when the tokenizer adds one), or
    messages through the chat template with the assistant's turn opened."""
    if isinstance(prompt, list):
        return chat_ids(tokenizer, prompt, add_generation_prompt=True)
    return tokenizer(prompt)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response, ended with EOS (no BOS)."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def conversation(tokenizer, messages: list[dict], train_from: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered by the chat template, labels = the token
    on assistant turns at index >= train_from (what the template writes for the turn up to and
    including its first EOS, the end-of-turn token generation stops at) and IGNORE elsewhere
    (system, user, tool turns, each assistant turn's header, what follows its EOS). Found by
    rendering each prefix of the conversation: the template
    must render a conversation as a continuation of its shorter prefixes (ChatML, Llama 3,
    Mistral, Gemma and Phi-3 templates do; a template that rewrites earlier turns, e.g. drops
    their reasoning, is refused with the turn it changed)."""
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        full = chat_ids(tokenizer, messages[: i + 1])
        start = len(ids)
        if msg["role"] == "assistant" and i >= train_from:
            head = chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else \
                _generation_header(tokenizer)
            _check_continues(ids, head, i, "the assistant header")
            _check_continues(head, full, i, "the assistant turn")
            turn = full[len(head):]
            end = turn.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in turn else len(turn)
            ids += full[start:]  # header, then the turn, its end-of-turn (EOS) token included
            labels += [IGNORE] * (len(head) - start) + turn[:end] + [IGNORE] * (len(turn) - end)
        else:
            _check_continues(ids, full, i, "the turn")
            ids += full[start:]
            labels += [IGNORE] * (len(full) - start)
    return ids, labels


def _generation_header(tokenizer) -> list[int]:
    """The tokens before a first-message assistant turn's content (a template may refuse to render
    an empty conversation): everything up to where the turn's content starts."""
    try:
        return chat_ids(tokenizer, [], add_generation_prompt=True)
    except Exception:  # noqa: BLE001 (any template error): no header
        return []


def _check_continues(prefix: list[int], ids: list[int], turn: int, what: str) -> None:
    if ids[: len(prefix)] != prefix:
        raise DataError(f"the chat template renders {what} at message {turn} so that the conversation before it "
                        "changes (it is not a continuation of the shorter conversation); per-turn loss masks "
                        "cannot be derived from this template")


@dataclass
class Truncations:
    """Counts what did not fit; warns once at the end of tokenisation."""
    truncated: int = 0
    skipped: int = 0
    examples: list = field(default_factory=list)

    def report(self, what: str, max_len: int) -> None:
        if self.truncated or self.skipped:
            warnings.warn(f"{what}: {self.truncated} sequences truncated to {max_len} tokens, "
                          f"{self.skipped} skipped (no response token within {max_len})", stacklevel=2)


MAX_CHARS_PER_TOKEN = 64  # no tokenizer's token is longer: text past max_len * this cannot fit


def too_long(text, max_len: int) -> bool:
    """A string longer than max_len tokens whatever the tokenizer: skipped without tokenising."""
    return isinstance(text, str) and len(text) > max_len * MAX_CHARS_PER_TOKEN


def _capped(text: str, max_len: int) -> str:
    """The start of a text that can still matter in max_len tokens: tokenising a 50 MB response
    to keep its first 1024 tokens took 11.8 GB."""
    return text[: max_len * MAX_CHARS_PER_TOKEN]


def tokenize_pair(tokenizer, prompt, response, max_len: int, counts: Truncations):
    """(input_ids, labels) with labels = IGNORE on the prompt: plain strings (prompt tokens, then
    the response's and EOS), or a conversation (prompt and response lists of messages, rendered
    by the chat template; loss on the response's assistant turns). Longer than max_len:
    truncated and counted; None (counted) when no trained token fits."""
    if isinstance(prompt, list) or isinstance(response, list):
        msgs = [dict(m, content=_capped(m["content"], max_len)) for m in list(prompt) + list(_as_turns(response))]
        ids, labels = conversation(tokenizer, msgs, len(prompt))
    else:
        if too_long(prompt, max_len):
            counts.skipped += 1
            return None
        p = prompt_ids(tokenizer, prompt)
        r = response_ids(tokenizer, _capped(response, max_len))
        ids, labels = p + r, [IGNORE] * len(p) + r
    if all(y == IGNORE for y in labels[:max_len]):
        counts.skipped += 1
        return None
    if len(ids) > max_len:
        counts.truncated += 1
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


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


def pack_for_rank(sequences: list[tuple[list[int], list[int]]] | None, max_tokens: int, *,
                  shares: list[list] | None = None) -> list[tuple[dict, float]]:
    """This rank's share of a global batch, packed, each micro-batch with the weight of its loss:
    1, and 0 for the repeats that pad the list to the largest count on any rank (under FSDP every
    rank must run as many forwards and backwards: each one is a collective). The shares are
    dist.share's round-robin of `sequences`, or `shares` (every rank's list, e.g. whole pairs).
    One process: pack(sequences), every weight 1."""
    from fastrlhf import dist

    if dist.world_size() == 1:
        return [(mb, 1.0) for mb in pack(sequences if shares is None else shares[0], max_tokens)]
    if shares is None:
        shares = [dist.share(sequences, r) for r in range(dist.world_size())]
    packs = [pack(part, max_tokens) if part else [] for part in shares]
    mine = packs[dist.rank()]
    filler = mine[0] if mine else pack(next(part for part in shares if part)[:1], max_tokens)[0]
    return [(mb, 1.0) for mb in mine] + [(filler, 0.0)] * (max(map(len, packs)) - len(mine))


def n_targets(sequences: list[tuple[list[int], list[int]]]) -> int:
    """Loss positions of sequences once packed (pack shifts the labels by one)."""
    return sum(sum(y != IGNORE for y in labels[1:]) for _, labels in sequences)


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
