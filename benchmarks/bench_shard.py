"""Training state per rank under FSDP2: measured at small scale, modelled at real scale.

    python -m benchmarks.bench_shard [--model-size small] [--ranks 1,2]

Measured: the built-in Llama (--model-size) trained one SFT step (packed micro-batch, fused
log-probs, AdamW) by `torchrun --nproc_per_node N` with gloo on CPU, once per N. Each rank reports
the bytes it holds of the float32 master parameters, their gradients and AdamW's two moments
(the local shards: numel x 4 bytes), and its process's peak RSS (which also holds torch, the
interpreter and the activations; the state columns are what sharding divides).

Modelled (--table): per-GPU memory of full fine-tuning with float32 masters + AdamW (16 bytes per
parameter: 4 master, 4 gradient, 8 moments) sharded N ways, plus the bf16 all-gathered copy of the
largest unit in flight (two decoder layers, FSDP2's prefetch) and a vLLM engine's bf16 weights
(2 bytes per parameter, unsharded: each rank's engine holds the whole model; with --rollout_tp N
one engine sharded over the N ranks, 2 / N bytes per parameter on each) for the colocated online
trainers; activations excluded (gradient checkpointing makes them small next to this at
these batch sizes). An H100 has 80 GB.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from benchmarks import common

# parameters, decoder layers (Qwen2.5 sizes)
MODELS = {"1.5B": (1.54e9, 28), "7B": (7.62e9, 28), "14B": (14.8e9, 48)}


def child(args) -> None:
    """One rank: shard, one step, report its bytes (run under torchrun)."""
    import torch

    from fastrlhf import data, dist, models, optim
    from fastrlhf.algos.sft import SFTConfig
    from fastrlhf.tasks import arithmetic as ar

    dist.setup(torch.device("cpu"))
    out = dist.on_main(lambda: ar.save_base_model(args.work, **ar.MODEL_SIZES[args.model_size]))
    cfg = SFTConfig(device="cpu", disable_dropout=True)
    model = models.load_trained(out, cfg, torch.device("cpu"))
    opt = optim.make_optimizer(model.parameters(), 1e-4, 0.0)
    tok = ar.build_tokenizer()
    seqs = [(ids, [data.IGNORE] * 4 + ids[4:]) for ids in
            (tok(f"{a}+{b}={a + b}")["input_ids"] + [tok.eos_token_id] for a, b in zip(range(64), range(64, 128)))]
    for mb, weight in data.pack_for_rank(seqs, 512):
        (-models.token_logprobs(model, data.to_device(mb, "cpu")).sum() * weight).backward()
    opt.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    nbytes = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    params = list(model.parameters())
    row = {"rank": dist.rank(), "params_mb": nbytes(params) / 2**20,
           "grads_mb": nbytes(p.grad for p in params if p.grad is not None) / 2**20,
           "adam_mb": nbytes(v for st in opt.state.values() for k, v in st.items()
                             if k in ("exp_avg", "exp_avg_sq")) / 2**20,
           "peak_rss_mb": common._rss_kb("VmHWM") / 1024}
    rows = [None] * dist.world_size()
    if dist.world_size() > 1:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if dist.is_main():
        print(json.dumps(rows))
    dist.teardown()


def measure(args) -> list[dict]:
    results = []
    for n in [int(x) for x in args.ranks.split(",")]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                   "127.0.0.1", "--master_port", str(port), "-m", "benchmarks.bench_shard", "--child",
                   "--model-size", args.model_size, "--work", f"{tmp}/model"]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        for row in json.loads(proc.stdout.strip().splitlines()[-1]):
            results.append({"ranks": n, **row})
    print(f"\ntraining state per rank, built-in Llama {args.model_size}, one SFT step, gloo on CPU")
    print(f"  {'ranks':>5} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'AdamW MB':>9} {'state MB':>9} "
          f"{'peak RSS MB':>12}")
    for r in results:
        state = r["params_mb"] + r["grads_mb"] + r["adam_mb"]
        print(f"  {r['ranks']:>5} {r['rank']:>4} {r['params_mb']:>10.2f} {r['grads_mb']:>9.2f} {r['adam_mb']:>9.2f} "
              f"{state:>9.2f} {r['peak_rss_mb']:>12.0f}")
    return results


def table() -> list[dict]:
    """The modelled per-GPU GB (module docstring)."""
    rows = []
    print("\nmodelled per-GPU memory, GB: full fine-tuning, fp32 masters + AdamW sharded over N, bf16 unit in flight"
          " (+ a colocated vLLM's bf16 weights: an engine per rank | --rollout_tp N, one engine sharded N ways)")
    print(f"  {'model':>6} " + " ".join(f"{f'N={n}':>22}" for n in (1, 2, 4, 8)))
    for name, (params, layers) in MODELS.items():
        cells = []
        for n in (1, 2, 4, 8):
            state = 16 * params / n / 1e9
            in_flight = 2 * 2 * params / layers / 1e9  # two decoder layers, bf16, gathered
            vllm = 2 * params / 1e9
            rows.append({"model": name, "ranks": n, "train_gb": state + in_flight,
                         "with_vllm_gb": state + in_flight + vllm,
                         "with_vllm_tp_gb": state + in_flight + vllm / n})
            train = state + in_flight
            cells.append(f"{train:5.1f} ({train + vllm:5.1f} | {train + vllm / n:5.1f})")
        print(f"  {name:>6} " + " ".join(f"{c:>22}" for c in cells))
    return rows


def argparse_namespace(**kw):
    """The arguments measure() reads, for callers outside the command line."""
    import argparse

    return argparse.Namespace(**kw)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="small", choices=["tiny", "small", "medium"])
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--table", action="store_true", help="print only the modelled table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        child(args)
        sys.stdout.flush()
        os._exit(0)  # past the closing barrier: skip the process group's destructors (fastrlhf/__main__.py: why)
    if not args.table:
        measure(args)
    table()


if __name__ == "__main__":
    main()
