"""Compile every Triton kernel for the H100 (sm_90a) with the launches the GPU really makes.

No GPU is needed. The public launchers run on `meta` tensors of the production shapes
(default N=16384, H=4096, V=152064) with each kernel's `.run` replaced by a recorder, so the
argument lists, strides, grids and tile configurations are exactly those of a CUDA launch.
Each recorded launch goes through Triton's own argument binder for an sm_90 target (the same
specialisation a real launch gets: constexpr 1-strides, 16-divisibility hints), is compiled to
PTX, and `ptxas-blackwell -arch=sm_90a -v` reports registers and spills.

    python tests/kernels/compile_sm90.py [--n 16384 --h 4096 --v 152064] [--json OUT]

Prints one JSON line per compiled kernel variant: name, dtype, config, registers, spill
stores/loads, shared memory bytes. Must run WITHOUT TRITON_INTERPRET (compiled kernels).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastrlhf.kernels import _common

# import_module, not `from ... import`: each module's name is also the name of its public op
ll = importlib.import_module("fastrlhf.kernels.linear_logprob")
lfl = importlib.import_module("fastrlhf.kernels.logprob_from_logits")

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_LIMIT = 227 * 1024  # bytes a block may use on H100
H100_SMS = 132


class _Ptr:
    """A stand-in for a CUDA tensor argument: 16-byte aligned, with a dtype."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr():
        return 0


def all_kernels():
    """Every @triton.jit kernel (name ending in _kernel) of every module of the package."""
    import pkgutil

    import fastrlhf.kernels as pkg
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastrlhf.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, JITFunction):
                found[name] = obj
    return found


def custom_ops():
    """Every torch.library custom op (fastrlhf::*) the package registers."""
    import pkgutil

    from torch._library.custom_ops import CustomOpDef

    import fastrlhf.kernels as pkg
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastrlhf.kernels.{info.name}")
        found.update({obj._name: obj for obj in vars(mod).values() if isinstance(obj, CustomOpDef)})
    return found


def _launchers_on_meta():
    """On meta tensors a custom op runs its fake implementation; register each op's real one for
    the meta device instead (this process only), so that its launchers run and are recorded."""
    for op in custom_ops().values():
        op.register_kernel("meta", op._init_fn)


def _record_launches():
    """Patch every kernel's `.run` to record (kernel, args, kwargs) instead of launching."""
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append((kernel, args, kwargs))
        return run

    stack = ExitStack()
    for k in all_kernels().values():
        stack.enter_context(mock.patch.object(k, "run", recorder(k)))
    return stack, launches


def _ptxas_report(ptx: str, name: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "ptxas-blackwell")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name}:\n{text}")
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill_st, spill_ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                            text).groups())
    return {"registers": regs, "spill_stores": spill_st, "spill_loads": spill_ld}


def _compile(kernel, args, kwargs) -> dict:
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [(_Ptr(a.dtype) if isinstance(a, torch.Tensor) else a) for a in args]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                              options=options.__dict__)
    report = {"kernel": kernel.__name__, "shared_bytes": compiled.metadata.shared,
              "num_warps": options.num_warps, "num_stages": options.num_stages,
              "constexprs": {k: (v if isinstance(v, (int, bool, str)) else str(v))
                             for k, v in kwargs.items() if k.isupper()}}
    report.update(_ptxas_report(compiled.asm["ptx"], kernel.__name__))
    return report


def _signature_key(kernel, args, kwargs):
    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    return (kernel.__name__, dtypes, tuple(sorted(kwargs.items())))


def _loss_launches(dtype, B=256, T=4096):
    """Forward and backward of every loss op at B*T = 1M tokens, all options on and off."""
    from fastrlhf import kernels as K
    meta = dict(device="meta")
    tok = lambda: torch.empty(B, T, dtype=dtype, **meta).requires_grad_()  # noqa: E731
    mask = torch.empty(B, T, dtype=torch.bool, **meta)
    for kind in ("k1", "k2", "k3"):
        K.kl_penalty(tok(), tok(), kind, impl="triton").sum().backward()
    for full in (False, True):
        opt = dict(dual_clip=3.0, ref_logprobs=tok(), kl_coef=0.1, entropy=tok(), entropy_coef=0.01,
                   is_weights=tok()) if full else {}
        adv = torch.empty(B, dtype=dtype, **meta) if full else tok()
        K.policy_loss(tok(), tok(), adv, mask, impl="triton", **opt)[0].backward()
        for surrogate in ("cispo", "sapo"):
            K.policy_loss(tok(), tok(), adv, mask, impl="triton", surrogate=surrogate,
                          **{k: v for k, v in opt.items() if k != "dual_clip"})[0].backward()
    K.value_loss(tok(), tok(), tok(), mask, impl="triton")[0].backward()
    pair = lambda: torch.empty(B, dtype=dtype, **meta).requires_grad_()  # noqa: E731
    for lt in ("sigmoid", "robust", "ipo", "hinge"):
        K.preference_loss(pair(), pair(), pair(), pair(), loss_type=lt, impl="triton")[0].backward()
    K.preference_loss(pair(), pair(), loss_type="simpo", impl="triton")[0].backward()
    for scale, loo in (("std", False), ("none", True)):
        K.group_advantages(torch.empty(B * 16, dtype=torch.float32, **meta), 16, scale=scale,
                           leave_one_out=loo, impl="triton")
    K.gae(tok().detach(), tok().detach(), mask, impl="triton")


def collect_launches(N: int, H: int, V: int):
    """Run the launchers of both ops on meta tensors for bf16, fp16 and fp32."""
    props = mock.Mock(multi_processor_count=H100_SMS)
    _launchers_on_meta()
    stack, launches = _record_launches()
    with stack, mock.patch.object(torch.cuda, "get_device_properties", return_value=props), \
            mock.patch.object(_common, "INTERPRET", True):  # lets impl="triton" through resolve_impl
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            key = "fp32" if dtype == torch.float32 else "16bit"
            with mock.patch.object(ll, "config_key", return_value=key), \
                    mock.patch.object(lfl, "config_key", return_value=key), \
                    mock.patch.object(ll, "_num_splits",
                                      side_effect=lambda dev, n, v: max(1, min(v, triton.cdiv(2 * H100_SMS, n)))):
                meta = dict(device="meta")
                h = torch.empty(N, H, dtype=dtype, **meta)
                w = torch.empty(V, H, dtype=dtype, **meta)
                b = torch.empty(V, dtype=dtype, **meta)
                labels = torch.empty(N, dtype=torch.int64, **meta)
                vec = torch.empty(N, dtype=torch.float32, **meta)
                for bias in (None, b):
                    for ent in (False, True):
                        for xf in (ll.LogitTransform(), ll.LogitTransform(1.0, 30.0, 1.0)):  # softcap
                            ll._fwd_triton(h, w, bias, labels, xf, -100, ent)
                            ll._bwd_triton(h, w, bias, labels, vec, vec, vec, vec if ent else None,
                                           xf, -100, (True, True, bias is not None))
                # TRL's DPOTrainer asks for every statistic (integrations.trl), with and without the entropy
                for ent in (False, True):
                    ll._fwd_triton(h, w, b, labels, ll.LogitTransform(1.0, 30.0, 1.0), -100, ent, (True, True, True))
                logits = torch.empty(N, V, dtype=dtype, **meta)
                for ent in (False, True):
                    lfl._fwd_triton(logits, labels, 1.0, -100, ent)
                    lfl._bwd_triton(logits, labels, vec, vec, vec, vec if ent else None, 1.0, -100)
                _loss_launches(dtype)
    unique = {}
    for kernel, args, kwargs in launches:
        unique.setdefault(_signature_key(kernel, args, kwargs), (kernel, args, kwargs))
    return list(unique.values())


def main(argv=None):
    if _common.INTERPRET:
        sys.exit("compile_sm90.py must run without TRITON_INTERPRET=1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--h", type=int, default=4096)
    p.add_argument("--v", type=int, default=152064)
    args = p.parse_args(argv)
    launches = collect_launches(args.n, args.h, args.v)
    missing = set(all_kernels()) - {k.__name__ for k, _, _ in launches}
    print(json.dumps({"kernels": sorted(all_kernels()), "not_launched": sorted(missing)}), flush=True)
    for kernel, kargs, kwargs in launches:
        report = _compile(kernel, kargs, kwargs)
        report["dtype"] = str(next(a.dtype for a in kargs if isinstance(a, torch.Tensor)))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
