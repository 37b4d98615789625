"""`epmoe plan`: plan expert placement from a recorded load file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .placement import Placement, as_load_array, balancedness, rank_load
from .planner import STRATEGIES, plan

__all__ = ["main", "add_parser", "read_load"]


def read_load(path) -> np.ndarray:
    """Reads a [L, E] load from `.pt` (a tensor), `.npy` or `.json` (nested list, or a dict with a "load" field)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".npy", ".json"):
        raise ValueError(f"LOAD must be a .pt, .npy or .json file, got {path.name}")
    if not path.is_file():
        raise FileNotFoundError(2, "LOAD file not found", str(path))
    try:
        if suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            data = json.loads(path.read_text())
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of the user's file is a bad input
        raise ValueError(f"{path}: not a readable {suffix} file ({str(exc).strip().splitlines()[0]})") from exc
    if isinstance(data, dict):
        if "load" not in data:
            raise ValueError(f"{path}: a JSON object must hold the load in a 'load' field")
        data = data["load"]
    return as_load_array(data, f"LOAD ({path.name})")


def _read_previous(path) -> Placement:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "--previous file not found", str(path))
    try:
        return Placement.load(path)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"--previous {path}: not a placement JSON written by `epmoe plan` ({exc})") from exc


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `plan` subcommand to the `epmoe` command's subparsers."""
    from epmoe.cli import non_negative_int, positive_int

    parser = subparsers.add_parser("plan", help="plan EPLB expert placement from a load file",
                                   description="Plan EPLB expert placement from a recorded [L, E] load: prints the "
                                   "balancedness before (the --previous placement, or the one a new layer starts "
                                   "with) and after, writes the plan JSON and a PNG plot next to it.")
    parser.add_argument("load", metavar="LOAD", help="[L, E] load statistics (.pt, .npy or .json)")
    parser.add_argument("--slots", type=positive_int, required=True, help="physical slots per layer (experts + "
                        "redundant)")
    parser.add_argument("--ranks", type=positive_int, required=True, help="EP ranks")
    parser.add_argument("--strategy", choices=STRATEGIES, default="global",
                        help="global: replicas anywhere; hierarchical: expert groups packed onto nodes (needs "
                        "--nodes and --groups)")
    parser.add_argument("--nodes", type=positive_int, default=None, help="nodes (--strategy hierarchical only)")
    parser.add_argument("--groups", type=positive_int, default=None,
                        help="expert groups (--strategy hierarchical only)")
    parser.add_argument("--previous", help="current placement JSON to start from (keeps experts in place)")
    parser.add_argument("--max-moves", type=non_negative_int, default=None,
                        help="repair --previous with at most this many slot changes per layer")
    parser.add_argument("-o", "--output", required=True, help="where to write the plan JSON (the plot goes next "
                        "to it, as .png)")
    parser.set_defaults(func=_run)
    return parser


def _check_options(args) -> None:
    """Option combinations that would do nothing are errors."""
    from epmoe.cli import UsageError

    hierarchical_opts = [opt for opt, value in (("--nodes", args.nodes), ("--groups", args.groups)) if value]
    if args.strategy == "hierarchical" and len(hierarchical_opts) < 2:
        raise UsageError("--strategy hierarchical needs --nodes and --groups")
    if args.strategy != "hierarchical" and hierarchical_opts:
        verb = "apply" if len(hierarchical_opts) > 1 else "applies"
        raise UsageError(f"{' and '.join(hierarchical_opts)} only {verb} to --strategy hierarchical")
    if args.max_moves is not None and args.previous is None:
        raise UsageError("--max-moves needs --previous (the placement to repair)")
    folder = Path(args.output).parent
    if not folder.is_dir():  # checked before planning: nothing is printed for a plan that cannot be written
        raise UsageError(f"--output: the folder {folder} does not exist")


def _starting_placement(num_layers: int, num_experts: int, num_slots: int, num_ranks: int) -> tuple:
    """What a fresh plan replaces: the identity placement without redundancy, else the uniform-load plan a new
    `epmoe.MoE` layer starts with."""
    if num_slots == num_experts:
        return Placement(np.tile(np.arange(num_experts), (num_layers, 1)), num_experts, num_ranks), "identity"
    uniform = np.ones((num_layers, num_experts))
    return plan(uniform, num_slots, num_ranks), "uniform placement, as a new layer starts"


def _run(args) -> int:
    _check_options(args)
    load = read_load(args.load)
    num_layers, num_experts = load.shape
    previous = _read_previous(args.previous) if args.previous else None
    nodes, groups = args.nodes or 1, args.groups or 1
    placement = plan(load, args.slots, args.ranks, num_nodes=nodes, num_groups=groups, strategy=args.strategy,
                     previous=previous, max_moves=args.max_moves)
    if previous is not None:
        start, label = previous, "previous placement"
    else:
        start, label = _starting_placement(num_layers, num_experts, args.slots, args.ranks)
    before, after = balancedness(load, start), balancedness(load, placement)
    strategy = args.strategy + (f" ({nodes} nodes, {groups} groups)" if args.strategy == "hierarchical" else "")
    print(f"layers {num_layers}, experts {num_experts}, slots {args.slots}, ranks {args.ranks}, strategy {strategy}")
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
    output = Path(args.output)
    placement.save(output)
    png = _plot(load, start, placement, label, output.with_suffix(".png"))
    print(f"wrote {output}" + (f", plot {png}" if png else " (matplotlib missing: no plot)"))
    return 0


def _plot(load: np.ndarray, before: Placement, after: Placement, label: str, path: Path) -> Path | None:
    """Balancedness per layer before/after, and the per-rank load of the least balanced layer before/after."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bal_before, bal_after = balancedness(load, before), balancedness(load, after)
    worst = int(np.argmin(bal_before))
    ranks = np.arange(before.num_ranks)
    layers = np.arange(load.shape[0])
    fig, (ax_layers, ax_ranks) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_layers.bar(layers - 0.2, bal_before, width=0.4, label=f"before ({label})")
    ax_layers.bar(layers + 0.2, bal_after, width=0.4, label="after")
    ax_layers.set(xlabel="layer", ylabel="balancedness (mean / max rank load)", ylim=(0, 1.05),
                  title="balancedness per layer")
    ax_layers.legend(fontsize=7)
    ax_ranks.bar(ranks - 0.2, rank_load(load, before)[worst], width=0.4, label="before")
    ax_ranks.bar(ranks + 0.2, rank_load(load, after)[worst], width=0.4, label="after")
    ax_ranks.axhline(load[worst].sum() / before.num_ranks, color="gray", linestyle="--", linewidth=1, label="mean")
    ax_ranks.set(xlabel="EP rank", ylabel="load", title=f"per-rank load, layer {worst} (least balanced before)")
    ax_ranks.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """Runs `epmoe plan` with `argv` (without the program and subcommand names); returns the exit status."""
    from epmoe.cli import main as epmoe_main

    return epmoe_main(["plan", *(sys.argv[1:] if argv is None else argv)])
