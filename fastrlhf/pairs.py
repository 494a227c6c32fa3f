"""fastrlhf pairs: two responses per prompt from a model, to be compared by people.

    fastrlhf pairs --model DIR --prompts FILE --out PAIRS.jsonl [--engine auto] [--temperature 1.0]

Closes the loop: model -> pairs (this) -> people (`fastrlhf label`) -> preferences
(`fastrlhf label --export`) -> reward model / DPO (`fastrlhf rm|dpo --data`) -> a better model.
Samples `--samples` responses per prompt (vLLM when installed, else transformers generate) and
keeps the first two that differ; a prompt whose samples are all identical is skipped and counted
(an identical pair carries no preference). Output lines: {"id", "prompt", "a", "b", "model"} plus
the prompt record's other fields.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from fastrlhf import data, models
from fastrlhf.config import DTYPES, resolve_device
from fastrlhf.files import write_atomic
from fastrlhf.optim import Precision


def main(argv: list[str] | None = None) -> dict:
    from fastrlhf.rollout import Colocated, make_engine

    p = argparse.ArgumentParser(prog="fastrlhf pairs", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--prompts", required=True, help="prompts JSONL/parquet ({\"prompt\": ...})")
    p.add_argument("--out", required=True, help="PAIRS.jsonl for fastrlhf label")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--samples", type=int, default=4,
                   help="responses drawn per prompt (the first two distinct are kept)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.samples < 2:
        p.error("--samples must be at least 2")

    records = data.load_prompts(args.prompts)
    tok = models.load_tokenizer(args.model)
    device = resolve_device(args.device)
    prec = Precision(args.dtype, device)
    policy = models.load_frozen(args.model, device=device, dtype=prec.dtype)
    ids = [data.prompt_ids(tok, r["prompt"]) for r in records]
    max_len = max(len(x) for x in ids) + args.max_new_tokens
    engine = make_engine(args.engine, model_dir=args.model, policy=policy, tokenizer=tok, max_model_len=max_len,
                         dtype=prec.dtype,
                         seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization)
    with Colocated(engine, policy) as colocated, colocated.generating() as gen:
        groups = gen.generate(ids, n=args.samples, temperature=args.temperature, max_tokens=args.max_new_tokens,
                              seed=args.seed)
    lines, same = [], 0
    for rec, group in zip(records, groups):
        texts = list(dict.fromkeys(tok.decode(s.completion_ids, skip_special_tokens=True) for s in group))
        if len(texts) < 2:
            same += 1
            continue
        prompt = rec["prompt"] if isinstance(rec["prompt"], str) else json.dumps(rec["prompt"])
        pid = hashlib.sha256(json.dumps([prompt, texts[0], texts[1]]).encode()).hexdigest()[:16]
        extra = {k: v for k, v in rec.items() if k not in ("prompt", "id", "a", "b")}
        lines.append(json.dumps({"id": pid, "prompt": prompt, "a": texts[0], "b": texts[1],
                                 "model": str(args.model), **extra}) + "\n")
    write_atomic(Path(args.out), "".join(lines))
    summary = {"pairs": len(lines), "skipped_identical": same, "engine": engine.name}
    print(f"wrote {len(lines)} pairs to {args.out} ({same} prompts skipped: all samples identical; "
          f"engine {engine.name})")
    return summary


if __name__ == "__main__":
    main()
