"""`epmoe plan`: plan expert placement from a recorded load file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .placement import Placement, as_load_array, balancedness
from .planner import STRATEGIES, plan

__all__ = ["main", "add_parser", "read_load"]


def read_load(path) -> np.ndarray:
    """Reads a [L, E] load from `.pt` (a tensor), `.npy` or `.json` (nested list, or a dict with a "load" field)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            if "load" not in data:
                raise ValueError(f"{path}: a JSON object must hold the load in a 'load' field")
            data = data["load"]
    else:
        raise ValueError(f"LOAD must be a .pt, .npy or .json file, got {path.name}")
    arr = as_load_array(data, "LOAD")
    return arr


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("load", metavar="LOAD", help="[L, E] load statistics (.pt, .npy or .json)")
    parser.add_argument("--slots", type=int, required=True, help="physical slots per layer (experts + redundant)")
    parser.add_argument("--ranks", type=int, required=True, help="EP ranks")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (hierarchical strategy)")
    parser.add_argument("--groups", type=int, default=1, help="expert groups (hierarchical strategy)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="global")
    parser.add_argument("--previous", help="current placement JSON to start from (keeps experts in place)")
    parser.add_argument("--max-moves", type=int, default=None, help="with --previous: slot changes per layer")
    parser.add_argument("-o", "--output", required=True, help="where to write the plan JSON")
    parser.set_defaults(func=_run)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `plan` subcommand to an argparse subparsers object (for the `epmoe` CLI)."""
    return _configure(subparsers.add_parser("plan", help="plan EPLB expert placement from a load file"))


def _run(args) -> int:
    load = read_load(args.load)
    num_layers, num_experts = load.shape
    previous = Placement.load(args.previous) if args.previous else None
    if previous is None and args.max_moves is not None:
        raise ValueError("--max-moves needs --previous")
    placement = plan(load, args.slots, args.ranks, num_nodes=args.nodes, num_groups=args.groups,
                     strategy=args.strategy, previous=previous, max_moves=args.max_moves)
    if previous is not None:
        before = balancedness(load, previous)
        label = "previous placement"
    else:
        # Without a previous plan: one slot per expert, experts spread in order over the ranks.
        before = None
        label = "no redundancy"
        if args.slots == num_experts:
            before = balancedness(load, Placement(np.tile(np.arange(num_experts), (num_layers, 1)), num_experts,
                                                  args.ranks))
    after = balancedness(load, placement)
    print(f"layers {num_layers}, experts {num_experts}, slots {args.slots}, ranks {args.ranks}, "
          f"strategy {args.strategy}")
    if before is not None:
        print(f"balancedness before ({label}): min {before.min():.4f} mean {before.mean():.4f}")
    print(f"balancedness after:  min {after.min():.4f} mean {after.mean():.4f}")
    weighted = balancedness(load, placement, policy="weighted")
    print(f"balancedness after, weighted replica shares: min {weighted.min():.4f} mean {weighted.mean():.4f}")
    print(f"replicas per expert: max {int(placement.logcnt.max())}, same-rank duplicates "
          f"{placement.num_same_rank_duplicates()}")
    if previous is not None:
        moves = placement.moves_from(previous)
        print(f"moves: {moves.changed_slots} slots changed, {moves.remote_copies} remote copies, "
              f"{moves.local_copies} local copies")
    placement.save(args.output)
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    """Runs `epmoe plan` with `argv` (without the program and subcommand names); returns the exit status."""
    parser = _configure(argparse.ArgumentParser(prog="epmoe plan", description="Plan EPLB expert placement."))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"epmoe plan: error: {exc}")
        return 2
