"""Benchmark the RL loss ops against eager torch and torch.compile (and Liger's GRPO loss).

    python -m benchmarks.bench_losses                     # this machine's default sizes
    python -m benchmarks.bench_losses --tokens 1048576 --ops policy_loss

Sizes are B*T tokens with T = 1024 (B = tokens / T sequences; preference pairs and
group-advantage rewards get B of them). Providers:
    fastrlhf       the Triton kernels (CUDA)
    torch-eager    the plain torch formula (the ops' `*_ref`, run in the input dtype)
    torch-compile  torch.compile of torch-eager (not for gae: its T-step loop would unroll)
    liger          Liger's triton_grpo_loss, against logprob_from_logits + policy_loss
                   on the same logits (op "grpo_from_logits", CUDA)
Same CSV schema, table and plot as bench_logprob.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from benchmarks import common
from fastrlhf import kernels as K

OPS = ["kl_penalty", "policy_loss", "policy_loss_cispo", "policy_loss_gspo", "policy_loss_sapo", "value_loss", "gae",
       "group_advantages", "preference_loss", "grpo_from_logits"]
# the policy-loss variants: CISPO (TRL's epsilon_high 5), GSPO's sequence-level ratio, SAPO's soft gate
VARIANTS = {"policy_loss_cispo": dict(surrogate="cispo", clip_low=1.0, clip_high=4.0),
            "policy_loss_gspo": dict(ratio_level="sequence"), "policy_loss_sapo": dict(surrogate="sapo")}
PROVIDERS = ["fastrlhf", "torch-eager", "torch-compile", "liger"]
MODES = ["forward", "backward", "full"]
T = 1024
DEFAULT_TOKENS = {"cuda": [16384, 262144, 1048576, 4194304], "cpu": [16384, 262144, 1048576]}
NO_GRAD_OPS = {"gae", "group_advantages"}


def _op_fns(op: str, B: int, dtype, device):
    """(inputs that get gradients, constant inputs, fused fn, eager fn) for one op."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    if op == "kl_penalty":
        grads = [(rnd(B, T) - 2).to(dtype).requires_grad_()]
        const = [(rnd(B, T) - 2).to(dtype)]
        return grads, const, lambda x, y: K.kl_penalty(x, y, "k3", impl="triton"), \
            lambda x, y: K.kl_penalty_ref(x.float(), y.float(), "k3")
    if op == "policy_loss" or op in VARIANTS:
        grads = [(rnd(B, T) * 0.3 - 2).to(dtype).requires_grad_()]
        old, ref = (grads[0].detach().float() + rnd(B, T) * 0.1).to(dtype), \
            (grads[0].detach().float() + rnd(B, T) * 0.1).to(dtype)
        adv, mask = rnd(B), torch.rand(B, T, generator=g).to(device) > 0.1
        kw = dict(clip_high=0.28, ref_logprobs=ref, kl_coef=0.04, loss_agg="token-mean") | VARIANTS.get(op, {})
        fused = lambda lp, o, a, m: K.policy_loss(lp, o, a, m, impl="triton", **kw)[0]  # noqa: E731
        if op in VARIANTS:  # eager: the torch path, the sequence ratio's pre-step included
            return grads, [old, adv, mask], fused, lambda lp, o, a, m: K.policy_loss(lp, o, a, m, impl="torch", **kw)[0]
        return grads, [old, adv, mask], fused, \
            lambda lp, o, a, m: K.policy_loss_ref(lp, o, a[:, None].expand(B, T), m, **kw)[0]
    if op == "value_loss":
        grads = [rnd(B, T).to(dtype).requires_grad_()]
        const = [(grads[0].detach().float() + rnd(B, T) * 0.2).to(dtype), rnd(B, T).to(dtype),
                 torch.rand(B, T, generator=g).to(device) > 0.1]
        return grads, const, lambda v, o, r, m: K.value_loss(v, o, r, m, impl="triton")[0], \
            lambda v, o, r, m: K.value_loss_ref(v, o, r, m)[0]
    if op == "gae":
        const = [rnd(B, T), rnd(B, T), torch.rand(B, T, generator=g).to(device) > 0.1]
        return [], const, lambda r, v, m: K.gae(r, v, m, gamma=1.0, lam=0.95, impl="triton"), \
            lambda r, v, m: K.gae_ref(r, v, m, gamma=1.0, lam=0.95)
    if op == "group_advantages":
        return [], [rnd(B * 16)], lambda r: K.group_advantages(r, 16, impl="triton"), \
            lambda r: K.group_advantages_ref(r, 16)
    if op == "preference_loss":
        grads = [(rnd(B) * 5 - 200).requires_grad_(), (rnd(B) * 5 - 200).requires_grad_()]
        const = [rnd(B) * 5 - 200, rnd(B) * 5 - 200]
        return grads, const, lambda c, r, rc, rr: K.preference_loss(c, r, rc, rr, impl="triton")[0], \
            lambda c, r, rc, rr: K.preference_loss_ref(c, r, rc, rr)
    raise ValueError(op)


def _grpo_from_logits(B: int, dtype, device, providers):
    """Liger's fused GRPO-from-logits vs logprob_from_logits + policy_loss (V = 32768)."""
    V, L = 32768, T
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(B, L + 1, V, generator=g)).to(device, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, L), generator=g).to(device)
    old = torch.randn(B, L, generator=g).to(device) * 0.1 - 10
    ref = old + 0.01
    adv = torch.randn(B, generator=g).to(device)
    mask = torch.ones(B, L, device=device)
    fns = {}
    if "fastrlhf" in providers and device == "cuda":
        def ours():
            lp = K.logprob_from_logits(logits[:, :-1], ids, temperature=0.9, impl="triton")
            return K.policy_loss(lp, old, adv, mask, clip_high=0.28, ref_logprobs=ref, kl_coef=0.04,
                                 impl="triton")[0]
        fns["fastrlhf"] = ours
    if "liger" in providers and device == "cuda" and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        fns["liger"] = lambda: triton_grpo_loss(logits, old, ref, ids, adv, mask, temperature=0.9,
                                                beta=0.04, eps_low=0.2, eps_high=0.28,
                                                inplace=False, loss_type="dapo", reduce=True)[0]
    return [logits], fns


def make_cases(op, tokens, dtype, device, providers, modes):
    B = max(1, tokens // T)
    size = f"tokens={B * T},B={B},T={T}"
    if op == "grpo_from_logits":
        leaves, fns = _grpo_from_logits(max(1, B // 64), dtype, device, providers)
        size = f"tokens={max(1, B // 64) * T},V=32768"
        call = {name: (lambda f=f: f()) for name, f in fns.items()}
    else:
        leaves, const, fused, eager = _op_fns(op, B, dtype, device)
        call = {}
        for p in providers:
            if p == "fastrlhf" and device == "cuda":
                call[p] = lambda f=fused: f(*leaves, *const)
            elif p == "torch-eager":
                call[p] = lambda f=eager: f(*leaves, *const)
            elif p == "torch-compile" and op != "gae":
                compiled = torch.compile(eager, dynamic=False)
                call[p] = lambda f=compiled: f(*leaves, *const)
    cases = []
    for name, f in call.items():
        op_modes = ["forward"] if op in NO_GRAD_OPS else modes
        cases += common.mode_cases(op, name, size, f, leaves, op_modes)
    return cases


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    p = common.arg_parser(__doc__, OPS, PROVIDERS, MODES)
    p.add_argument("--tokens", default=None, help="comma list of B*T sizes (default per device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        print("  [note] fastrlhf (Triton) and liger need CUDA; on CPU only the torch providers run")
    dtype = getattr(torch, args.dtype)
    tokens = [int(x) for x in args.tokens.split(",")] if args.tokens else DEFAULT_TOKENS[device]
    reps = args.reps or (50 if device == "cuda" else 5)
    providers, modes = args.providers.split(","), args.modes.split(",")
    print(f"device: {common.device_name(device)}  dtype: {dtype}  reps: {reps}")
    rows = []
    for op in args.ops.split(","):
        for n in tokens:
            rows += common.run_cases(make_cases(op, n, dtype, device, providers, modes), device,
                                     warmup=2, reps=reps)
    plots = {op: "forward" if op in NO_GRAD_OPS else "full" for op in args.ops.split(",")}
    common.report(rows, device, plots, save=not args.no_save)
    return rows


if __name__ == "__main__":
    main()
