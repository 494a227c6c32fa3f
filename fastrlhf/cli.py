"""The `fastrlhf` command: demo (the whole pipeline), sft | rm | dpo (offline), grpo | ppo
(online RL), pairs | label (human feedback) and bench.

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


# command -> (module with main(argv), help, whether main returns a summary to print)
COMMANDS = {
    "demo": ("fastrlhf.demo", "the whole pipeline on the built-in task: SFT -> RM -> PPO (vLLM) -> DPO, GRPO", False),
    "sft": ("fastrlhf.algos.sft", "supervised fine-tuning on demonstrations", True),
    "rm": ("fastrlhf.algos.reward", "reward model on preference pairs (Bradley-Terry)", True),
    "dpo": ("fastrlhf.algos.dpo", "DPO-family training on preference pairs", True),
    "grpo": ("fastrlhf.algos.grpo", "online RL without a critic: GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++", True),
    "ppo": ("fastrlhf.algos.ppo", "online RL with a critic: PPO against a reward model", True),
    "pairs": ("fastrlhf.pairs", "sample two responses per prompt for people to compare", False),
    "label": ("fastrlhf.label", "serve the pairwise comparison page / export preferences", False),
}


def _run(command: str, rest: list[str]) -> int:
    import importlib

    from fastrlhf.data import DataError
    from fastrlhf.rollout import EngineError
    from fastrlhf.optim import TrainingError

    module, _, prints_summary = COMMANDS[command]
    try:
        summary = importlib.import_module(module).main(rest)
    except (DataError, FileNotFoundError, EngineError, ValueError, TrainingError, OSError) as e:  # one line
        print(f"fastrlhf {command}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a bad flag or config value (load_config): its one line, exit status 2
        if not isinstance(e.code, str):
            raise  # --help (0), argparse's own usage errors (2)
        print(e.code, file=sys.stderr)
        return 2
    if prints_summary:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="fastrlhf", description="Performance-first RLHF.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, doc, _) in COMMANDS.items():
        sub.add_parser(name, help=f"{doc} (fastrlhf {name} --help)", add_help=False)
    sub.add_parser("bench", help="benchmark: fastrlhf bench [logprob|losses|all (the kernels)|train|step] "
                   "[arguments of benchmarks/bench_<suite>.py]", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    return _run(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
