"""The `fastrlhf` command. Subcommands land with their issues; today: bench."""

from __future__ import annotations

import argparse
import sys


BENCH_SUITES = ("logprob", "losses")


def _bench(rest: list[str]) -> int:
    """fastrlhf bench [logprob|losses|all] [benchmark arguments...]"""
    suite = rest.pop(0) if rest and rest[0] in BENCH_SUITES + ("all",) else "all"
    try:
        from benchmarks import bench_logprob, bench_losses
    except ImportError:
        print("fastrlhf bench: the benchmarks/ folder is not importable; run it from a checkout "
              "of the repository (the benchmarks are not part of the installed package)",
              file=sys.stderr)
        return 2
    for name, mod in (("logprob", bench_logprob), ("losses", bench_losses)):
        if suite in (name, "all"):
            mod.main(list(rest))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="fastrlhf", description="Performance-first RLHF.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="benchmark the kernels: fastrlhf bench [logprob|losses|all] "
                   "[arguments of benchmarks/bench_<suite>.py]", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    return 1


if __name__ == "__main__":
    sys.exit(main())
