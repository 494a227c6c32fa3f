"""The GPU session's one command: validate and measure everything, into one folder.

    bash benchmarks/gpu_suite.sh [--dry-run] [--out DIR]        (make gpu-suite)

Written for a bare H100/H200 machine with torch, triton and transformers preinstalled and no
network, where a session has about 15 minutes in all and a command at most 10: every part runs
under its own time limit and the suite within 8 minutes (BUDGET_S), prints its progress, and the suite
goes on past a part that fails or times out; each part's status, seconds and last lines are in
the summary. What comes back is at most 8 files in DIR (default gpu-results/):

    summary.md     the environment (GPU, driver, torch / triton / transformers / vLLM / Liger
                   versions), every part's status and seconds, the benchmark tables
    <device>.csv   every benchmark row (benchmarks/common.py's schema)
    log.txt        every part's full output
    *.png          the benchmarks' plots (at most 5)

The parts, in order:
  install      pip install --no-deps --no-build-isolation -e . (the project, from the tree), and
               every wheel carried in wheels/ (put them there before the session, e.g.
               `pip download --no-deps liger-kernel -d wheels/`; vllm and flash-attn only if carried)
  tests        the kernel tests on the GPU (FASTRLHF_TEST_CUDA=1: every kernel compiled and run
               for real, against float64 references), then the trainer tests that have a CUDA path
  logprob      linear_logprob and logprob_from_logits, bf16, fwd / bwd / full, vs eager, compile
               and Liger, at the issue's sizes (N=8192 H=4096 V=131072; N=16384 H=4096 V=152064)
  losses       policy_loss and the other loss kernels at 1M tokens vs eager and torch.compile
  train        one packed SFT step: fused log-probs vs materialised logits
  grpo         one GRPO step, fastrlhf (each engine installed) vs TRL's GRPOTrainer when TRL is
               installed; the training state left on the GPU while generating is in its metrics
  compile      registers, spills and shared memory of every kernel compiled for sm_90

--dry-run runs the same parts on the CPU with tiny shapes (the tests part: a quick kernel file
under the interpreter; install: only reported), writing the same summary: the script is tested
where it is written (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_PLOTS, MAX_MB = 8, 5, 16
BUDGET_S = 470  # the whole suite on a GPU: within 8 minutes, the summary included


@dataclass
class Part:
    name: str
    command: list[str]
    limit_s: int  # on a GPU
    dry_command: list[str] | None = None  # --dry-run's (None: the same, run as is)
    needs: str = ""  # a module that must import, else the part is skipped


def parts(py: str) -> list[Part]:
    m = lambda mod, *a: [py, "-m", mod, *a]  # noqa: E731
    wheels = sorted(str(w) for w in (ROOT / "wheels").glob("*.whl")) if (ROOT / "wheels").is_dir() else []
    return [
        Part("install", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                         "-e", str(ROOT), *wheels], 60,
             dry_command=[py, "-c", f"print('would install the project and {len(wheels)} carried wheel(s)')"]),
        Part("tests", m("pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/kernels",
                        "tests/trainer/test_task_data_models.py"), 120,
             dry_command=m("pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/kernels/test_advantages_preference.py")),
        Part("logprob", m("benchmarks.bench_logprob", "--sizes", "8192,4096,131072;16384,4096,152064",
                          "--dtype", "bfloat16", "--reps", "10"), 90,
             dry_command=m("benchmarks.bench_logprob", "--sizes", "64,32,512", "--reps", "1",
                           "--providers", "fastrlhf-torch,torch-eager")),
        Part("losses", m("benchmarks.bench_losses", "--tokens", "1048576", "--dtype", "bfloat16"), 60,
             dry_command=m("benchmarks.bench_losses", "--tokens", "2048", "--reps", "1", "--providers", "torch-eager")),
        Part("train", m("benchmarks.bench_train", "--model-size", "medium", "--vocab", "131072", "--tokens", "8192"),
             30,
             dry_command=m("benchmarks.bench_train", "--model-size", "tiny", "--sequences", "4", "--vocab", "512",
                           "--tokens", "256")),
        Part("grpo", m("benchmarks.bench_step", "--model-size", "small", "--steps", "3",
                       "--providers", ",".join(p for p, mod in (("fastrlhf-vllm", "vllm"), ("fastrlhf-hf", "torch"),
                                                                ("trl", "trl")) if _has(mod))), 90,
             dry_command=m("benchmarks.bench_step", "--model-size", "tiny", "--steps", "2", "--prompts", "2",
                           "--group", "2", "--max-new-tokens", "2", "--providers", "fastrlhf-hf", "--no-save"),
             needs="transformers"),
        Part("lora", m("benchmarks.bench_lora", "--device", "cuda", "--hidden", "1536", "--layers", "4", "--vocab",
                       "151936", "--tokens", "8192", "--rounds", "1"), 60,
             dry_command=m("benchmarks.bench_lora", "--hidden", "64", "--layers", "1", "--vocab", "512", "--tokens",
                           "128", "--reps", "1", "--rounds", "1", "--no-save"),
             needs="peft"),
        Part("compile", [py, "tests/kernels/compile_sm90.py"], 45),
    ]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def environment(py: str) -> list[str]:
    """Lines for the summary: the machine and the versions that matter."""
    code = ("import importlib, torch\n"
            "print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',\n"
            "      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')\n"
            "for m in ('triton', 'transformers', 'vllm', 'liger_kernel', 'flash_attn', 'trl'):\n"
            "    try:\n"
            "        print(m, getattr(importlib.import_module(m), '__version__', '?'))\n"
            "    except Exception as e:\n"
            "        print(m, 'not installed' if isinstance(e, ImportError) else f'broken: {e}')\n")
    out = [f"host: {platform.node()} | {platform.platform()} | python {platform.python_version()}"]
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        out.append(f"nvidia-smi: {q.stdout.strip() or q.stderr.strip()}")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return out + (r.stdout.strip().splitlines() or [f"(versions not read: {r.stderr.strip()[-300:]})"])


def run_part(part: Part, dry: bool, env: dict, log, left_s: float) -> dict:
    command = part.dry_command if dry and part.dry_command else part.command
    if part.needs and not _has(part.needs):
        return {"status": f"skipped ({part.needs} not installed)", "seconds": 0.0, "tail": ""}
    limit = 300 if dry else int(min(part.limit_s, left_s))
    if limit < 5:
        return {"status": "skipped (the suite's 8 minutes are spent)", "seconds": 0.0, "tail": ""}
    print(f"== {part.name}: {' '.join(command)} (limit {limit} s)", flush=True)
    log.write(f"\n==== {part.name}: {' '.join(command)}\n")
    t0 = time.time()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
        status, text = ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:  # (what it printed comes as bytes here, even with text=True)
        status = f"timed out after {limit} s"
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
    seconds = time.time() - t0
    log.write(text)
    log.flush()
    print(f"   {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "seconds": seconds, "tail": "\n".join(text.strip().splitlines()[-25:])}


def write_summary(out: Path, env_lines: list[str], results: dict, dry: bool, total_s: float) -> Path:
    lines = [f"# fastrlhf GPU suite{' (dry run, CPU)' if dry else ''}", "", "## Environment", ""]
    lines += [f"- {x}" for x in env_lines]
    lines += ["", f"## Parts ({total_s:.0f} s in all)", "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']:.0f} |" for name, r in results.items()]
    for name, r in results.items():
        if r["tail"]:
            lines += ["", f"## {name}: last lines", "", "```", r["tail"], "```"]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def limit_outputs(out: Path) -> list[str]:
    """At most MAX_PLOTS plots and MAX_FILES files of at most MAX_MB each; returns what was dropped."""
    dropped = []
    first = ("linear_logprob", "policy_loss", "train_step", "logprob_from_logits", "grpo_step")  # kept first
    plots = sorted(out.glob("*.png"), key=lambda p: next((i for i, op in enumerate(first) if p.stem.endswith(op)), 99))
    for p in plots[MAX_PLOTS:]:
        dropped.append(p.name)
        p.unlink()
    for p in sorted(out.iterdir()):
        if p.is_file() and p.stat().st_size > MAX_MB * 2**20:
            dropped.append(f"{p.name} (over {MAX_MB} MiB)")
            p.unlink()
    return dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same parts on the CPU with tiny shapes")
    p.add_argument("--out", default=str(ROOT / "gpu-results"))
    p.add_argument("--parts", default="", help="comma list of part names (default: all)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "FASTRLHF_RESULTS_DIR": str(out), "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)  # (set by a test run; the tests part's own conftest sets it on a CPU)
    if not args.dry_run:
        env["FASTRLHF_TEST_CUDA"] = "1"
    t0 = time.time()
    env_lines = environment(py)
    print("\n".join(env_lines), flush=True)
    chosen = [x for x in args.parts.split(",") if x]
    results = {}
    with open(out / "log.txt", "w") as log:
        for part in parts(py):
            if chosen and part.name not in chosen:
                continue
            results[part.name] = run_part(part, args.dry_run, env, log, BUDGET_S - (time.time() - t0))
            write_summary(out, env_lines, results, args.dry_run, time.time() - t0)  # as it goes: a cut session keeps it
    dropped = limit_outputs(out)
    summary = write_summary(out, env_lines, results, args.dry_run, time.time() - t0)
    if dropped:
        with open(summary, "a") as f:
            f.write(f"\nleft out to stay within {MAX_FILES} files: {', '.join(dropped)}\n")
    files = [x for x in out.iterdir() if x.is_file()]
    print(f"wrote {len(files)} files to {out} in {time.time() - t0:.0f} s: {summary}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
