"""The `fastrlhf` command. Subcommands land with their issues; today: bench."""

from __future__ import annotations

import argparse
import sys


def _bench(rest: list[str]) -> int:
    try:
        from benchmarks import bench_logprob
    except ImportError:
        print("fastrlhf bench: the benchmarks/ folder is not importable; run it from a checkout "
              "of the repository (the benchmarks are not part of the installed package)",
              file=sys.stderr)
        return 2
    bench_logprob.main(rest)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="fastrlhf", description="Performance-first RLHF.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="benchmark the fused kernels (arguments go to the benchmark; "
                   "see --help there)", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    return 1


if __name__ == "__main__":
    sys.exit(main())
