"""`epmoe bench`: runs the benchmark scripts of the checkout (routing, experts, dispatch, EPLB, whole layer), writes
their JSON into one folder, prints a summary table of every script's ratios against its targets, and plots them.

Each script writes JSON with a "summary" list of rows {"metric", "value", "target", "met"}; the table is those rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = ("bench_route", "bench_experts", "bench_dispatch", "bench_eplb", "bench_layer", "bench_scale")


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    if not here.is_dir():
        raise SystemExit("epmoe bench: the benchmarks/ folder is not next to this install (use a source checkout)")
    return here


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks and print a summary table")
    p.add_argument("--only", nargs="*", choices=SCRIPTS, help="run only these scripts")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--out", default="build/bench", help="folder for the JSON files and plots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bench_dir, out_dir = _benchmarks_dir(), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed, rows = [], []
    for name in args.only or SCRIPTS:
        cmd = [sys.executable, str(bench_dir / f"{name}.py"), "--out", str(out_dir / f"{name}.json")]
        if args.quick:
            cmd.append("--quick")
        print(f"=== {name}", flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(name)
            continue
        summary = json.loads((out_dir / f"{name}.json").read_text()).get("summary", [])
        rows += [(name, row) for row in summary]
    _print_table(rows)
    _plot(rows, out_dir / "summary.png")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def _print_table(rows) -> None:
    print(f"\n{'script':15} {'metric':58} {'value':>10} {'target':>10}  met")
    for name, row in rows:
        met = {True: "yes", False: "NO", None: "-"}[row.get("met")]
        target = row.get("target") or "-"
        print(f"{name:15} {row['metric']:58} {row['value']:>10.3g} {target:>10}  {met}")


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ratios = [(f"{name}: {row['metric']}", row["value"]) for name, row in rows if "ratio" in row["metric"].lower()]
    if not ratios:
        return
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(ratios) + 1))
    ax.barh([label for label, _ in ratios], [value for _, value in ratios])
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("ratio (higher is better for epmoe)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
