"""The `epmoe` command: `epmoe demo` (the main job), `epmoe bench` (benchmarks), `epmoe plan` (EPLB planner),
`epmoe simulate` (EPLB at any EP size, replayed from a load trace)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from epmoe import bench, demo
    from epmoe.eplb import cli as plan_cli
    from epmoe.eplb import simulator as simulate_cli

    parser = argparse.ArgumentParser(prog="epmoe", description="Expert Parallelism for Mixture-of-Experts models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(subparsers)
    bench.add_parser(subparsers)
    plan_cli.add_parser(subparsers)
    simulate_cli.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
