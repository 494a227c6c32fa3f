"""What a run reports: metrics.jsonl every step (TensorBoard, Weights & Biases when installed),
samples.jsonl of generated text, a one-line progress bar; resumable (rows after the checkpoint
are dropped, a row torn by a crash too). Only the main process writes (fastrlhf.dist).
DeviceMetrics keeps a step's statistics on the device until one read-back."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from fastrlhf import dist
from fastrlhf.files import write_atomic


def _read_rows(path: Path, keep_step: int) -> list[str]:
    """The JSONL rows up to keep_step; a row cut short by a crash (the last) is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= keep_step:
            kept.append(line)
    return kept


class DeviceMetrics:
    """A step's statistics as device tensors, read back to the host together: each fetch() is
    one device->host copy (one .tolist()), carrying the values its caller needs now (an
    optimiser step's finite flag and gradient norm) and every statistic added since the last.

        add(key, t)      summed over the fetches (the update's micro-batch-weighted losses)
        maximum(key, t)  the largest (rollout/logprob_diff_max)
        set(key, t)      one value (a step's KL, explained variance)

    After the last fetch, `values` holds them as floats; `syncs` counts the read-backs."""

    def __init__(self):
        self._pending: dict[str, tuple[str, torch.Tensor]] = {}
        self.values: dict[str, float] = {}
        self.syncs = 0

    def _put(self, how: str, key: str, t: torch.Tensor, combine) -> None:
        t = t.detach().float().reshape(())
        old = self._pending.get(key)
        self._pending[key] = (how, t if old is None else combine(old[1], t))

    def add(self, key: str, t: torch.Tensor) -> None:
        self._put("sum", key, t, torch.add)

    def maximum(self, key: str, t: torch.Tensor) -> None:
        self._put("max", key, t, torch.maximum)

    def set(self, key: str, t: torch.Tensor) -> None:
        self._put("set", key, t, lambda old, new: new)

    def fetch(self, *now: torch.Tensor) -> list[float]:
        """Read back `now` (returned, as floats) and every pending statistic (into values).
        Sharded (torchrun): the statistics are first combined over the ranks on the device (sums
        summed, maxima the largest, a set value averaged); `now` is taken as it is."""
        keys = list(self._pending)
        if dist.world_size() > 1 and keys:
            self._reduce(keys)
        ts = [t.detach().float().reshape(()) for t in now] + [self._pending[k][1] for k in keys]
        if not ts:
            return []
        host = torch.stack(ts).tolist()  # the one device -> host copy
        self.syncs += 1
        for k, v in zip(keys, host[len(now):]):
            how, old = self._pending[k][0], self.values.get(k)
            self.values[k] = v if old is None or how == "set" else old + v if how == "sum" else max(old, v)
        self._pending.clear()
        return host[: len(now)]

    def _reduce(self, keys: list[str]) -> None:
        for how in ("sum", "max", "set"):
            mine = [k for k in keys if self._pending[k][0] == how]
            if not mine:
                continue
            t = torch.stack([self._pending[k][1] for k in mine])
            if how == "max":
                dist.max_over_ranks_tensor(t)
            else:
                dist.all_reduce_sum(t)
                t = t / dist.world_size() if how == "set" else t
            for k, v in zip(mine, t):
                self._pending[k] = (how, v)


class MetricsLog:
    """metrics.jsonl (one JSON object per step, flushed), TensorBoard when installed, Weights &
    Biases when installed and asked for (FASTRLHF_WANDB_PROJECT=<project>), and a one-line
    progress bar on stderr. Resuming from the checkpoint of step resume_step keeps the rows up to
    it and drops the later ones (logged before a crash, or by a finished run rerun), which the
    resumed run logs again."""

    def __init__(self, out_dir: Path, total_steps: int, *, desc: str, resume_step: int | None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl" if dist.is_main() else Path(os.devnull)
        resume = resume_step is not None
        if resume and self.path.exists() and dist.is_main():
            write_atomic(self.path, "".join(line + "\n" for line in _read_rows(self.path, resume_step)))
        self.file = open(self.path, "a" if resume else "w")
        self.total, self.desc, self.t0 = total_steps, desc, time.time()
        self.tb = None
        try:
            if not dist.is_main():
                raise ImportError("only the main process logs")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard not installed: jsonl only
            pass
        self.wandb = None
        project = os.environ.get("FASTRLHF_WANDB_PROJECT") if dist.is_main() else None
        if project:
            try:
                import wandb
            except ImportError:
                print("FASTRLHF_WANDB_PROJECT is set but wandb is not installed: logging to "
                      f"{self.path} only", file=sys.stderr)
            else:
                self.wandb = wandb.init(project=project, name=f"{desc}-{out_dir.name}", dir=str(out_dir),
                                        resume="allow" if resume else None)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.progress(step, row)

    def progress(self, step: int, row: dict) -> None:
        if not sys.stderr.isatty() and step % max(1, self.total // 10) and step != self.total:
            return
        frac = step / max(1, self.total)
        bar = "#" * int(20 * frac)
        shown = {k: v for k, v in row.items()
                 if k.startswith(("loss", "eval/", "reward/mean")) and isinstance(v, float)}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        end = "\r" if sys.stderr.isatty() and step != self.total else "\n"
        print(f"{self.desc} [{bar:<20}] {step}/{self.total} {time.time() - self.t0:.0f}s {text}",
              file=sys.stderr, end=end, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class SampleLog:
    """samples.jsonl: {"step", ...} rows of generated text (prompt, completion, reward), flushed;
    resuming from the checkpoint of step resume_step drops the rows written after it."""

    def __init__(self, out_dir: Path, *, resume_step: int | None):
        self.path = out_dir / "samples.jsonl" if dist.is_main() else Path(os.devnull)
        if resume_step is not None and self.path.exists() and dist.is_main():
            write_atomic(self.path, "".join(line + "\n" for line in _read_rows(self.path, resume_step)))
        self.file = open(self.path, "a" if resume_step is not None else "w")

    def write(self, step: int, rows: list[dict]) -> None:
        for row in rows:
            self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _num(v):
    """A logged number with 7 significant digits (a fixed count of decimals logged a warm-up
    learning rate of 5e-8 as 0.0 and a sampler gap of 5.74e-5 as 5.7e-05)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    return float(f"{v:.7g}") if isinstance(v, float) else v
