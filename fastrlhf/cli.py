"""The `fastrlhf` command: demo (the whole pipeline), sft | rm | dpo (offline), grpo | ppo
(online RL), pairs | label (human feedback), export (a sharded checkpoint as an HF directory)
and bench.

    fastrlhf sft --config examples/sft.yaml [--output-dir DIR] [--model PATH] [--data PATH] [--FIELD VALUE ...]

Every field of a trainer's config dataclass is a flag; a YAML file only overrides fields.
A data or model error prints one message naming the file (and line) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


BENCH_SUITES = ("logprob", "losses", "train", "step")  # "all": the two kernel suites


def _bench(rest: list[str]) -> int:
    """fastrlhf bench [logprob|losses|train|step|all] [benchmark arguments...]"""
    suite = rest.pop(0) if rest and rest[0] in BENCH_SUITES + ("all",) else "all"
    # the console script's sys.path has neither the checkout nor the working directory on it
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "common.py").exists() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            break
    try:
        import importlib

        mods = {name: importlib.import_module(f"benchmarks.bench_{name}") for name in BENCH_SUITES}
    except ImportError:
        print("fastrlhf bench: the benchmarks/ folder is not importable; run it from a checkout "
              "of the repository (the benchmarks are not part of the installed package)",
              file=sys.stderr)
        return 2
    for name, mod in mods.items():
        if suite == name or (suite == "all" and name in ("logprob", "losses")):
            mod.main(list(rest))
    return 0


# command -> (module, help); a trainer's module has train(cfg, task), the others main(argv)
COMMANDS = {
    "demo": ("fastrlhf.demo", "the whole pipeline on the built-in task: SFT -> RM -> PPO (vLLM) -> DPO, GRPO"),
    "sft": ("fastrlhf.algos.sft", "supervised fine-tuning on demonstrations"),
    "rm": ("fastrlhf.algos.reward", "reward model on preference pairs (Bradley-Terry)"),
    "dpo": ("fastrlhf.algos.dpo", "DPO-family training on preference pairs"),
    "grpo": ("fastrlhf.algos.grpo", "online RL without a critic: GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++"),
    "ppo": ("fastrlhf.algos.ppo", "online RL with a critic: PPO against a reward model"),
    "pairs": ("fastrlhf.pairs", "sample two responses per prompt for people to compare"),
    "label": ("fastrlhf.label", "serve the pairwise comparison page / export preferences"),
    "export": ("fastrlhf.checkpoints", "a sharded checkpoint (written under torchrun) as an HF directory"),
}
# trainer command -> its config class (in its module)
TRAINERS = {"sft": "SFTConfig", "rm": "RMConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig", "ppo": "PPOConfig"}


def train(command: str, argv: list[str] | None = None) -> dict:
    """Run one trainer as `fastrlhf <command> ARGS` does and return its summary: the config
    (defaults <- --config YAML <- flags, validated), the task those settings choose (the
    built-in task, the user's files in front of it: fastrlhf.tasks.for_config), train(cfg, task).
    The composition root: no trainer chooses its own data."""
    import importlib

    from fastrlhf import config, dist, tasks

    module = importlib.import_module(COMMANDS[command][0])
    cfg = config.load_config(getattr(module, TRAINERS[command]), argv, prog=f"fastrlhf {command}")
    summary = module.train(cfg, tasks.for_config(cfg))
    dist.teardown()  # all ranks together, after the run (a failing rank exits instead: torchrun stops the rest)
    return summary


def _run(command: str, rest: list[str]) -> int:
    import importlib

    from fastrlhf.data import DataError
    from fastrlhf.rollout import EngineError
    from fastrlhf.optim import TrainingError

    try:
        if command in TRAINERS:
            summary = train(command, rest)
        else:
            importlib.import_module(COMMANDS[command][0]).main(rest)
    except (DataError, FileNotFoundError, EngineError, ValueError, TrainingError, OSError) as e:  # one line
        print(f"fastrlhf {command}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a bad flag or config value (load_config): its one line, exit status 2
        if not isinstance(e.code, str):
            raise  # --help (0), argparse's own usage errors (2)
        print(e.code, file=sys.stderr)
        return 2
    if command in TRAINERS:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="fastrlhf", description="Performance-first RLHF.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, doc) in COMMANDS.items():
        sub.add_parser(name, help=f"{doc} (fastrlhf {name} --help)", add_help=False)
    sub.add_parser("bench", help="benchmark: fastrlhf bench [logprob|losses|all (the kernels)|train|step] "
                   "[arguments of benchmarks/bench_<suite>.py]", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    return _run(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
