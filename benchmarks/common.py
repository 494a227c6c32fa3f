"""What every benchmark shares: timing, peak memory, one CSV schema, a table and a plot.

CSV (appended, one file per device): benchmarks/results/<device>.csv
    op,provider,mode,size,median_ms,p20_ms,p80_ms,peak_mem_mb,device,commit,peak_mem_tuned_mb
`peak_mem_mb` is the extra memory of one call above what was allocated before it (inputs
and parameters excluded, outputs and gradients included): torch's allocator peak on CUDA,
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on CPU, with
glibc's default allocator as a user's process has it; `peak_mem_tuned_mb` is the second, labelled
CPU figure with every allocation over 128 KB its own mmap (the same as peak_mem_mb on CUDA).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# FASTRLHF_RESULTS_DIR: somewhere else (the GPU suite's output folder)
RESULTS = Path(os.environ.get("FASTRLHF_RESULTS_DIR") or Path(__file__).parent / "results")
FIELDS = ["op", "provider", "mode", "size", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
          "device", "commit", "peak_mem_tuned_mb"]


class _Malloc:
    """glibc knobs for honest CPU peak-memory numbers. With its default dynamic mmap
    threshold, glibc keeps freed buffers of up to 32 MB in the heap, so a provider can run
    inside memory a previous one freed and its peak would not show in the RSS. While
    measuring memory we force every allocation over 128 KB to be its own mmap (returned to
    the OS on free); for timing we go back to reusing buffers, as a default process does."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self):
        try:
            import ctypes
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    def trim(self) -> None:
        """Give the heap's free pages back to the OS (what a fresh process would not have)."""
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def measure_mode(self, on: bool) -> None:
        if self.libc is None:
            return
        self.libc.mallopt(self.M_MMAP_THRESHOLD, 128 * 1024 if on else 32 * 2**20)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024 if on else 64 * 2**20)
        if on:
            self.libc.malloc_trim(0)


_MALLOC = _Malloc()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {os.cpu_count()} cores {model}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return (sha or "unknown") + ("-dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field)))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int, reps: int,
            setup: Callable[[], object] | None = None) -> tuple[float, float, float]:
    """Median, p20, p80 in ms of fn() over reps runs; setup() runs untimed before each."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(x) for x in q)


def peak_mem_mb(fn: Callable[[], object], device: str,
                setup: Callable[[], object] | None = None, *, tuned: bool = False) -> float:
    """Extra memory of one fn() call above the memory in use before it. On CPU, as a process
    with glibc's default allocator sees it (the heap's free pages returned first, so memory an
    earlier call freed is counted again when touched), or tuned=True: every allocation over
    128 KB its own mmap (the second figure: what the op asks for, whatever the allocator keeps)."""
    if setup:
        setup()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    # The process-wide peak can also catch memory that something else (a previous case's
    # garbage, torch.compile's workers) touches during the call: measure twice, keep the lower.
    peaks = []
    for i in range(2):
        if i and setup:
            setup()
        gc.collect()
        _MALLOC.trim()
        _MALLOC.measure_mode(tuned)
        try:
            base = _rss_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            out = fn()
            peaks.append(_rss_kb("VmHWM") - base)
            del out
        finally:
            _MALLOC.measure_mode(False)
    return max(min(peaks), 0) / 1024


@dataclass
class Case:
    """One (provider, mode) measurement of an op at one size."""
    op: str
    provider: str
    mode: str
    size: str
    fn: Callable[[], object]
    setup: Callable[[], object] | None = None


def arg_parser(doc: str, ops: list[str], providers: list[str], modes: list[str]) -> argparse.ArgumentParser:
    """The options every benchmark has; each adds its size and dtype options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--ops", default=",".join(ops), help=f"comma list of {ops}")
    p.add_argument("--providers", default=",".join(providers), help=f"comma list of {providers}")
    p.add_argument("--modes", default=",".join(modes), help=f"comma list of {modes}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default per device)")
    p.add_argument("--no-save", action="store_true", help="print only; no CSV, no plot")
    return p


def mode_cases(op: str, provider: str, size: str, fn: Callable[[], torch.Tensor],
               leaves: list[torch.Tensor], modes: list[str]) -> list[Case]:
    """Cases for fn() (returning a tensor) in each mode: forward (grad enabled, as in
    training), backward (of an untimed forward's output), full (forward + backward). The
    upstream gradient is ones (out.sum()); leaves' .grad is cleared before every call."""
    state = {}

    def clear():
        for t in leaves:
            t.grad = None
        state.clear()

    def forward_then_clear():
        clear()
        state["out"] = fn()

    builders = {
        "forward": (fn, clear),
        "backward": (lambda: state["out"].sum().backward(), forward_then_clear),
        "full": (lambda: fn().sum().backward(), clear),
    }
    return [Case(op, provider, mode, size, *builders[mode]) for mode in modes]


def run_cases(cases: list[Case], device: str, *, warmup: int, reps: int) -> list[dict]:
    dev_name, sha = device_name(device), commit()
    rows = []
    for c in cases:
        try:
            mem = peak_mem_mb(c.fn, device, c.setup)
            tuned = peak_mem_mb(c.fn, device, c.setup, tuned=True) if device != "cuda" else mem
            med, p20, p80 = time_ms(c.fn, device, warmup=warmup, reps=reps, setup=c.setup)
        except torch.OutOfMemoryError:
            med = p20 = p80 = mem = tuned = float("nan")
            if device == "cuda":
                torch.cuda.empty_cache()
        row = dict(op=c.op, provider=c.provider, mode=c.mode, size=c.size, median_ms=round(med, 4),
                   p20_ms=round(p20, 4), p80_ms=round(p80, 4), peak_mem_mb=round(mem, 2),
                   device=dev_name, commit=sha, peak_mem_tuned_mb=round(tuned, 2))
        print(f"  {c.op:<16} {c.provider:<15} {c.mode:<9} {c.size:<28} {med:10.3f} ms  "
              f"{mem:10.1f} MB ({tuned:.1f} MB tuned)", flush=True)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------


def append_csv(rows: list[dict], device: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{slug(device_name(device))}.csv"
    new = not path.exists()
    if not new:  # a file written under an older schema: rewrite it with the new columns empty
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields, old_rows = reader.fieldnames, list(reader)
        if old_fields != FIELDS:
            if "peak_mem_tuned_mb" not in old_fields:  # older rows measured the tuned figure
                for r in old_rows:
                    r["peak_mem_tuned_mb"], r["peak_mem_mb"] = r["peak_mem_mb"], ""
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
                w.writeheader()
                w.writerows(old_rows)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def print_table(rows: list[dict], baseline: str) -> None:
    """Per (op, size, mode): each provider's time and memory, and the ratio to `baseline`."""
    print(f"\n{'op':<16} {'size':<28} {'mode':<9} {'provider':<15} {'median ms':>10} "
          f"{'x ' + baseline:>16} {'peak MB':>10} {'mem x':>8} {'tuned MB':>10}")
    key = lambda r: (r["op"], r["size"], r["mode"])  # noqa: E731
    for k in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == k]
        base = next((r for r in group if r["provider"] == baseline), None)
        for r in group:
            t_ratio = base["median_ms"] / r["median_ms"] if base and r["median_ms"] else float("nan")
            m_ratio = r["peak_mem_mb"] / base["peak_mem_mb"] if base and base["peak_mem_mb"] else float("nan")
            print(f"{r['op']:<16} {r['size']:<28} {r['mode']:<9} {r['provider']:<15} "
                  f"{r['median_ms']:>10.3f} {t_ratio:>15.2f}x {r['peak_mem_mb']:>10.1f} {m_ratio:>7.3f}x "
                  f"{r.get('peak_mem_tuned_mb', float('nan')):>10.1f}")


def report(rows: list[dict], device: str, plots: dict[str, str], *, baseline: str = "torch-eager",
           save: bool = True) -> None:
    """Print the table; unless save is off, append the CSV and draw one plot per op
    (plots: op -> the mode to draw)."""
    print_table(rows, baseline)
    if not save or not rows:
        return
    print(f"\nappended {len(rows)} rows to {append_csv(rows, device)}")
    for op, mode in plots.items():
        png = plot(rows, device, op, mode)
        if png:
            print(f"plot: {png}")


def plot(rows: list[dict], device: str, op: str, mode: str = "full") -> Path | None:
    """Time and peak memory per provider across sizes, for one op and mode."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
    if not sel:
        return None
    sizes = list(dict.fromkeys(r["size"] for r in sel))
    providers = list(dict.fromkeys(r["provider"] for r in sel))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        for ax, field in zip(axes, ("median_ms", "peak_mem_mb")):
            vals = [next((r[field] for r in sel if r["provider"] == p and r["size"] == s), float("nan"))
                    for s in sizes]
            ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=p)
    for ax, title in zip(axes, (f"{op} {mode}: median time (ms)", f"{op} {mode}: extra peak memory (MB)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))])
        ax.set_xticklabels([s.replace(",", "\n") for s in sizes], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(device_name(device), fontsize=10)
    fig.tight_layout()
    path = RESULTS / f"{slug(device_name(device))}-{op}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
