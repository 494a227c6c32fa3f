"""fastrlhf demo: the whole RLHF pipeline on the built-in arithmetic task, on one machine.

    fastrlhf demo [--output-dir runs/demo] [--fast] [--engine auto|vllm|hf]

Stages, in order (each its own trainer, each writing DIR/<stage>/metrics.jsonl and final/):
  1. sft   supervised fine-tuning on imperfect demonstrations (15% wrong)
  2. rm    a reward model on the simulated annotator's comparisons (10% label noise): the
           log-prob head, beta * log p(response | prompt) under a copy of the SFT model tuned
           with the Bradley-Terry loss (reward_model_start_accuracy: before that tuning)
  3. ppo   PPO from the SFT model against that reward model, KL penalty to the SFT model,
           generation by colocated vLLM (when installed); the output layer learns at its own
           rate (head_lr 1e-3, 20x the body's), as in grpo: RL's gain on this task is sharpening
  4. dpo   DPO (cDPO) from the SFT model on the same comparisons, for contrast
  5. grpo  GRPO from the SFT model with the task's exact-match checker as the reward (a
           verifier instead of a learned reward model), for contrast
Then every policy is evaluated with one protocol: the task's held-out prompts, transformers
generate (at most 5 new tokens), exact match, as the share of 4 samples per prompt at
temperature 1 that are right (<stage>_accuracy: the policy as it behaves when sampled, where
the demonstrators' copied mistakes show) and greedy (<stage>_greedy_accuracy: the policy's
mode, which hides them). DIR/summary.json holds the accuracies, the reward model's held-out
pairwise accuracy and the seconds per stage; DIR/report.png draws reward, KL and held-out
accuracy over the PPO steps (and GRPO's beside PPO's) and every stage's accuracy side by side.

Each stage runs with its example config, examples/<stage>.yaml (the very file
`fastrlhf <stage> --config examples/<stage>.yaml` reads), plus the paths between the stages.
`--fast` shrinks everything to the tiny model and a few steps per stage: a smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastrlhf import cli, files
from fastrlhf.tasks import arithmetic as ar

STAGES = ("sft", "rm", "ppo", "dpo", "grpo")


def example_config(stage: str) -> Path:
    """examples/<stage>.yaml: the settings the stage runs with (installed as fastrlhf.examples)."""
    import importlib.resources

    path = importlib.resources.files("fastrlhf.examples") / f"{stage}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"the example config {path} is missing: reinstall fastrlhf")
    return Path(str(path))


# --fast: overrides on top of the examples (a smoke run on the tiny model)
FAST = {
    "sft": {"task_model_size": "tiny", "task_examples": 300, "epochs": 1, "tokens_per_step": 128,
            "warmup_steps": 2, "eval_every": 1000, "task_eval_prompts": 16},
    "rm": {"task_pairs": 128, "task_eval_pairs": 32, "pairs_per_step": 32, "epochs": 1, "warmup_steps": 1},
    "ppo": {"prompts_per_step": 8, "steps": 2, "critic_warmup": 1, "eval_every": 1, "task_prompts": 64, "task_eval_prompts": 16,
            "enforce_eager": True, "gpu_memory_utilization": 0.05},
    "dpo": {"task_pairs": 64, "task_eval_pairs": 16, "pairs_per_step": 16, "epochs": 1, "warmup_steps": 1,
            "task_eval_prompts": 16},
    "grpo": {"prompts_per_step": 4, "group_size": 4, "steps": 2, "eval_every": 1, "task_prompts": 64,
             "task_eval_prompts": 16, "enforce_eager": True, "gpu_memory_utilization": 0.05},
}

EVAL_PROMPTS = 200  # held-out prompts for the final comparison (FAST: 16)


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def run_stage(name: str, argv: list[str], times: dict, fast: bool) -> dict:
    """One stage as `fastrlhf <name> --config examples/<name>.yaml ARGV` runs it."""
    print(f"== {name}", file=sys.stderr, flush=True)
    t0 = time.time()
    summary = cli.train(name, ["--config", str(example_config(name))] + (_flags(FAST[name]) if fast else []) + argv)
    times[f"{name}_seconds"] = round(time.time() - t0, 1)
    print(f"{name}: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)),
          file=sys.stderr, flush=True)
    return summary


def evaluate_policies(dirs: dict[str, Path], n_prompts: int) -> dict[str, float]:
    """The one protocol for every policy, on the same held-out prompts: <name>_accuracy is the
    exact-match rate of ar.EVAL_SAMPLES samples per prompt at temperature 1 (the policy as it
    behaves when sampled, where imitated mistakes show); <name>_greedy_accuracy is greedy."""
    from fastrlhf import models

    heldout = ar.heldout_prompts(ar.ArithmeticTask(), n_prompts)
    out = {}
    for name, d in dirs.items():
        model, tok = models.load_causal_lm(d), models.load_tokenizer(d)
        out[f"{name}_accuracy"] = ar.sampled_accuracy(model, tok, heldout)
        out[f"{name}_greedy_accuracy"] = ar.accuracy(model, tok, heldout)
    return out


def draw_report(out: Path, summary: dict) -> Path:
    """reward, KL and held-out accuracy over the PPO steps; every stage's accuracy side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/sample_accuracy" in r]
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    ax[0].plot([r["step"] for r in steps], [r["reward/mean"] for r in steps])
    ax[0].set(title="PPO: reward-model score of samples", xlabel="step")
    ax[1].plot([r["step"] for r in steps], [r["kl"] for r in steps], color="C1")
    ax[1].set(title="PPO: KL to the SFT model (per sample)", xlabel="step")
    ax[2].plot([r["step"] for r in evals], [r["eval/sample_accuracy"] for r in evals], marker="o",
               label="PPO (reward model)")
    g = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    g = [r for r in g if "eval/sample_accuracy" in r]
    ax[2].plot([r["step"] for r in g], [r["eval/sample_accuracy"] for r in g], marker="o", color="C2",
               label="GRPO (verifier)")
    ax[2].axhline(summary["sft_accuracy"], ls="--", color="gray", label="SFT")
    ax[2].set(title="held-out accuracy (sampled, T=1) over RL steps", xlabel="step", ylim=(0, 1))
    ax[2].legend()
    names = ["sft", "rlhf", "dpo", "grpo"]
    vals = [summary[f"{n}_accuracy"] for n in names] + [summary["reward_model_accuracy"]]
    bars = ax[3].bar(["SFT", "PPO\n(vs RM)", "DPO", "GRPO\n(verifier)", "RM\npairwise"], vals,
                     color=["gray", "C0", "C3", "C2", "C4"])
    ax[3].bar_label(bars, fmt="%.2f")
    ax[3].set(title="held-out accuracy by stage (sampled, T=1)", ylim=(0, 1))
    fig.tight_layout()
    path = out / "report.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="fastrlhf demo", description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="tiny model, a few steps per stage (a smoke run)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"], help="PPO's rollout engine")
    p.add_argument("--device", default="auto")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    import importlib.util

    can_plot = importlib.util.find_spec("matplotlib") is not None
    if not can_plot:  # said before 10 minutes of training, not as a crash after them
        print("fastrlhf demo: matplotlib is not installed: the stages run and summary.json is written, but no "
              "report.png (pip install matplotlib)", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--device", args.device]
    times: dict = {}

    sft_sum = run_stage("sft", common + ["--output_dir", str(out / "sft")], times, args.fast)
    sft_dir = out / "sft" / "final"
    rm_sum = run_stage("rm", common + ["--model", str(sft_dir), "--output_dir", str(out / "rm")], times, args.fast)
    run_stage("ppo", common + ["--model", str(sft_dir), "--reward_model", str(out / "rm" / "final"),
                               "--engine", args.engine, "--output_dir", str(out / "ppo")], times, args.fast)
    run_stage("dpo", common + ["--model", str(sft_dir), "--output_dir", str(out / "dpo")], times, args.fast)
    run_stage("grpo", common + ["--model", str(sft_dir), "--engine", args.engine, "--output_dir", str(out / "grpo")],
              times, args.fast)

    print("== evaluation (held-out prompts, exact match, sampled and greedy)", file=sys.stderr, flush=True)
    summary = evaluate_policies({"sft": sft_dir, "rlhf": out / "ppo" / "final", "dpo": out / "dpo" / "final",
                                 "grpo": out / "grpo" / "final"}, 16 if args.fast else EVAL_PROMPTS)
    summary.update({"reward_model_accuracy": rm_sum["eval/accuracy"],
                    "reward_model_start_accuracy": rm_sum.get("start/accuracy"),
                    "sft_eval_loss": sft_sum.get("eval/loss"), **times,
                    "total_seconds": round(sum(times.values()), 1), "fast": args.fast,
                    "eval_protocol": f"{16 if args.fast else EVAL_PROMPTS} held-out prompts, exact match, "
                                     f"at most 5 new tokens; *_accuracy: {ar.EVAL_SAMPLES} samples per prompt "
                                     "at temperature 1; *_greedy_accuracy: greedy"})
    files.write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if can_plot:
        draw_report(out, summary)
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items()
                   if k.endswith("accuracy") and "greedy" not in k and isinstance(v, float)) +
          f"  -> {out / 'summary.json'}, {out / 'report.png'}")
    return summary


if __name__ == "__main__":
    main()
