"""Benchmark the fused log-prob ops against eager torch, torch.compile and Liger.

    python -m benchmarks.bench_logprob                       # this machine's default sizes
    python -m benchmarks.bench_logprob --sizes 16384,4096,152064 --modes full

Providers (those that cannot run here are skipped with a note):
    fastrlhf        the Triton kernels (CUDA)
    fastrlhf-torch  fastrlhf's chunked torch path (impl="torch")
    torch-eager     materialised logits + log_softmax + gather
    torch-compile   torch.compile of torch-eager
    liger           Liger-Kernel's fused linear cross-entropy / cross-entropy, reduction="none"
Modes: forward (grad enabled, as in training), backward (after an untimed forward), full.
Every provider gets the same upstream gradient (ones: the one Liger's reduction="none"
handles exactly). Rows are appended to benchmarks/results/<device>.csv; a table is printed
and benchmarks/results/<device>-<op>.png drawn.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from benchmarks import common
from benchmarks.baselines import eager_linear_logprob, eager_logprob
from fastrlhf.kernels import linear_logprob, logprob_from_logits

PROVIDERS = ["fastrlhf", "fastrlhf-torch", "torch-eager", "torch-compile", "liger"]
MODES = ["forward", "backward", "full"]
OPS = ["linear_logprob", "logprob_from_logits"]

# (N, H, V): H is ignored by logprob_from_logits
DEFAULT_SIZES = {
    "cuda": [(1024, 4096, 152064), (4096, 4096, 152064), (16384, 4096, 152064),
             (4096, 4096, 32768), (4096, 4096, 65536)],
    "cpu": [(1024, 256, 32768), (4096, 256, 65536)],
}


def _liger_fns():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
    ce = LigerCrossEntropyLoss(reduction="none")
    return {"linear_logprob": lambda h, w, y: -flce(w, h, y),
            "logprob_from_logits": lambda z, y: -ce(z, y)}


def provider_fns(op: str, device: str, providers: list[str]) -> dict:
    """Provider name -> callable(*inputs) returning per-token log-probs (N,)."""
    fused = linear_logprob if op == "linear_logprob" else logprob_from_logits
    eager = eager_linear_logprob if op == "linear_logprob" else eager_logprob
    fns = {}
    for p in providers:
        if p == "fastrlhf":
            if device != "cuda":
                print("  [skip] fastrlhf (Triton) needs CUDA; on CPU it only runs interpreted")
                continue
            fns[p] = lambda *a: fused(*a, impl="triton")
        elif p == "fastrlhf-torch":
            fns[p] = lambda *a: fused(*a, impl="torch")
        elif p == "torch-eager":
            fns[p] = eager
        elif p == "torch-compile":
            fns[p] = torch.compile(eager, dynamic=False)
        elif p == "liger":
            liger = _liger_fns() if device == "cuda" else None
            if liger is None:
                print("  [skip] liger: needs liger-kernel installed and CUDA")
                continue
            fns[p] = liger[op]
    return fns


def make_cases(op: str, N: int, H: int, V: int, dtype: torch.dtype, device: str,
               providers: list[str], modes: list[str]) -> list[common.Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    if op == "linear_logprob":
        size = f"N={N},H={H},V={V}"
        leaves = [(torch.randn(N, H, generator=g) ).to(device, dtype).requires_grad_(),
                  (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_()]
    else:
        size = f"N={N},V={V}"
        leaves = [(torch.randn(N, V, generator=g) * 2).to(device, dtype).requires_grad_()]
    cases = []
    for name, fn in provider_fns(op, device, providers).items():
        cases += common.mode_cases(op, name, size, lambda fn=fn: fn(*leaves, labels), leaves, modes)
    return cases


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in text.split(";"):
        parts = [int(x) for x in item.split(",")]
        if len(parts) != 3:
            raise SystemExit(f"--sizes: expected N,H,V triples separated by ';', got {item!r}")
        sizes.append(tuple(parts))
    return sizes


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    p = common.arg_parser(__doc__, OPS, PROVIDERS, MODES)
    p.add_argument("--sizes", default=None, help="N,H,V;N,H,V (default: per device)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    sizes = parse_sizes(args.sizes) if args.sizes else DEFAULT_SIZES[device]
    reps = args.reps or (20 if device == "cuda" else 3)
    print(f"device: {common.device_name(device)}  dtype: {dtype}  reps: {reps}")
    rows = []
    for op in args.ops.split(","):
        for N, H, V in sizes:
            cases = make_cases(op, N, H, V, dtype, device, args.providers.split(","),
                               args.modes.split(","))
            rows += common.run_cases(cases, device, warmup=1 if device == "cpu" else 3, reps=reps)
    ops = args.ops.split(",")
    common.report(rows, device, {op: "full" for op in ops}, save=not args.no_save)
    return rows


if __name__ == "__main__":
    main()
