"""Training-step benchmark: packed vs padded batches, fused vs materialised log-probs.

    python -m benchmarks.bench_train [--model-size small] [--sequences 64] [--vocab 32000]

A realistic length mix: sequence lengths drawn log-normally between 32 and 1024 tokens
(median ~128). One SFT forward+backward over the same sequences:
  packed      data.pack into micro-batches of `--tokens` tokens, varlen attention, no padding
  padded      right-padded (B, T) batches of the same number of sequences
and for the packed run, log-probs through
  fused       fastrlhf.kernels.linear_logprob (no logits)
  materialised  model(...).logits + log_softmax + gather
Reports training tokens/s (real tokens only) and extra peak memory; CSV rows as the other
benchmarks (op "train_step"). The model is the built-in Llama at the chosen size with the
vocabulary widened to --vocab so the lm_head matters as it does in a real model.
"""

from __future__ import annotations

import random
import sys

import torch

from benchmarks import common
from benchmarks.baselines import eager_logprob
from fastrlhf import data, models
from fastrlhf.tasks import arithmetic as ar


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [int(min(1024, max(32, rng.lognormvariate(4.85, 0.8)))) for _ in range(n)]


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    p = common.arg_parser(__doc__, ["train_step"], ["packed-fused", "packed-materialised", "padded-fused"],
                          ["full"])
    p.add_argument("--model-size", default="small", choices=list(ar.MODEL_SIZES))
    p.add_argument("--sequences", type=int, default=48)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per packed micro-batch")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    size = dict(ar.MODEL_SIZES[args.model_size])
    model = ar.build_model(**size, max_positions=1024)
    model.resize_token_embeddings(args.vocab)
    models._register_attention()
    model.config._attn_implementation = models.ATTN
    model = model.to(device, torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    lens = lengths(args.sequences)
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(4, args.vocab, (n,), generator=g).tolist(),) * 2 for n in lens]
    n_tokens = sum(lens)
    params = [p for p in model.parameters()]

    def run(kind):
        def fn():
            if kind == "padded-fused":
                for i in range(0, len(seqs), 8):
                    batch = {k: v.to(device) for k, v in data.pad_batch(seqs[i:i + 8], 0).items()}
                    (-models.token_logprobs(model, batch).sum()).backward()
                return None
            for mb in data.pack(seqs, args.tokens):
                mb = data.to_device(mb, device)
                if kind == "packed-fused":
                    lp = models.token_logprobs(model, mb)
                else:
                    h = models.hidden_states(model, mb)
                    lp = eager_logprob(model.get_output_embeddings()(h), mb["labels"])
                (-lp.sum()).backward()
            return None
        return fn

    def clear():
        for t in params:
            t.grad = None

    size_label = f"seqs={len(seqs)},tokens={n_tokens},V={args.vocab},model={args.model_size}"
    cases = [common.Case("train_step", k, "full", size_label, run(k), clear)
             for k in args.providers.split(",")]
    rows = common.run_cases(cases, device, warmup=1, reps=args.reps or 3)
    for r in rows:
        r["tokens_per_s"] = round(n_tokens / (r["median_ms"] / 1e3), 1)
        print(f"  {r['provider']:<22} {r['tokens_per_s']:>10.0f} tokens/s   {r['peak_mem_mb']:>8.1f} MB")
    common.report([{k: v for k, v in r.items() if k in common.FIELDS} for r in rows], device,
                  {"train_step": "full"}, baseline="packed-fused", save=not args.no_save)
    return rows


if __name__ == "__main__":
    main()
