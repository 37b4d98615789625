"""`epmoe bench`: runs the benchmark scripts of the checkout (routing, experts, dispatch, EPLB, whole layer, real-size
construction), writes their JSON into one folder, prints a summary table of every script's ratios against its
targets, and plots them.

Each script writes JSON with a "summary" list of rows {"metric", "value", "target", "met"}; the table is those rows.
Progress: one line (or a bar on a terminal) per script with the ETA of the rest, from the durations of the last run
in the same folder (`timings.json`) or the figures below. `--quick` gives each script a time budget (QUICK_BUDGET_S,
together under 2 minutes on the 2-core build machine): a script over its budget is reported, and one over
`--timeout` (default: 3x its budget with --quick, none without) is stopped and counted as failed. Each script's
output is echoed (not with -q) and kept in `<out>/<script>.log`; `<out>/runs.json` records durations and status;
`<out>/summary.md` is the summary table in Markdown (README.md's benchmark table).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from epmoe._progress import Progress, format_seconds

SCRIPTS = ("bench_route", "bench_experts", "bench_dispatch", "bench_eplb", "bench_layer", "bench_scale",
           "bench_training")
# --quick budget of each script in seconds (sum 118 s < 2 min), also the ETA before a first run.
QUICK_BUDGET_S = {"bench_route": 15, "bench_experts": 35, "bench_dispatch": 12, "bench_eplb": 10, "bench_layer": 20,
                  "bench_scale": 8, "bench_training": 18}
# Durations of the full runs on the 2-core build machine (the ETA before a first run).
FULL_ESTIMATE_S = {"bench_route": 20, "bench_experts": 75, "bench_dispatch": 15, "bench_eplb": 10, "bench_layer": 70,
                   "bench_scale": 10, "bench_training": 30}


def _benchmarks_dir() -> Path:
    from epmoe.cli import UsageError

    here = Path(__file__).resolve().parents[2] / "benchmarks"
    if not here.is_dir():
        raise UsageError("the benchmarks/ folder is not next to this install (run it from a source checkout)")
    return here


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks and print a summary table",
                              description="Run benchmarks/bench_*.py, print each script's ratios against its "
                              "targets, write JSON, logs and a plot into --out.")
    p.add_argument("--only", nargs="+", choices=SCRIPTS, metavar="SCRIPT",
                   help=f"run only these scripts (of {', '.join(SCRIPTS)})")
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes and repeats, a time budget per script (all under 2 minutes)")
    p.add_argument("--timeout", type=_positive_seconds, default=None,
                   help="stop a script after this many seconds (default: 3x its budget with --quick, none without)")
    p.add_argument("--out", default="build/bench", help="folder for the JSON files, logs and plots")
    p.set_defaults(func=run)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {value:g}")
    return value


def _estimates(out_dir: Path, quick: bool) -> dict:
    """Seconds per script for the ETA: the last run's durations in this folder, else the built-in figures."""
    estimates = dict(QUICK_BUDGET_S if quick else FULL_ESTIMATE_S)
    try:
        runs = json.loads((out_dir / "runs.json").read_text())
        estimates.update({name: run["seconds"] for name, run in runs.get("quick" if quick else "full", {}).items()
                          if run.get("status") == "ok"})
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return estimates


def _run_script(cmd: list, log_path: Path, echo, timeout: float | None) -> tuple[str, float]:
    """Runs one script, copying its output (stdout and stderr) line by line to `log_path` and to `echo`; returns
    (status, seconds) with status "ok", "failed (exit N)" or "timed out after Ts"."""
    start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        # A new session, so that a timeout stops the script's own worker processes too.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)

        def copy() -> None:
            for line in proc.stdout:
                log.write(line)
                if echo is not None:
                    echo(line.rstrip("\n"))

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {format_seconds(timeout)}"
        reader.join(timeout=5)
    return status, time.monotonic() - start


def run(args: argparse.Namespace) -> int:
    bench_dir, out_dir = _benchmarks_dir(), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(args.only or SCRIPTS))
    quiet = getattr(args, "quiet", False)
    estimates = _estimates(out_dir, args.quick)
    progress = Progress(len(names), "epmoe bench" + (" --quick" if args.quick else ""), enabled=not quiet)
    echo = None if quiet else progress.write
    runs, rows = {}, []
    for i, name in enumerate(names):
        eta = sum(estimates[n] for n in names[i:])
        progress.set_label(f"{name} (ETA {format_seconds(eta)})")
        cmd = [sys.executable, str(bench_dir / f"{name}.py"), "--out", str(out_dir / f"{name}.json")]
        if args.quick:
            cmd.append("--quick")
        budget = QUICK_BUDGET_S[name] if args.quick else None
        timeout = args.timeout if args.timeout is not None else (3 * budget if budget else None)
        status, seconds = _run_script(cmd, out_dir / f"{name}.log", echo, timeout)
        over = budget is not None and status == "ok" and seconds > budget
        runs[name] = {"status": status, "seconds": round(seconds, 2), "budget_s": budget, "over_budget": over}
        note = f", over its {budget} s --quick budget" if over else ""
        progress.step(f"{name} {status} in {format_seconds(seconds)}{note}")
        if status == "ok":
            summary = json.loads((out_dir / f"{name}.json").read_text()).get("summary", [])
            rows += [(name, row) for row in summary]
    progress.close()
    _save_runs(out_dir, args.quick, runs)
    _print_table(rows)
    (out_dir / "summary.md").write_text(markdown_table(rows))
    _print_runs(runs, args.quick)
    _plot(rows, out_dir / "summary.png")
    failed = [name for name, r in runs.items() if r["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {out_dir})")
    return 1 if failed else 0


def _save_runs(out_dir: Path, quick: bool, runs: dict) -> None:
    path = out_dir / "runs.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("quick" if quick else "full", {}).update(runs)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _print_table(rows) -> None:
    print(f"\n{'script':15} {'metric':58} {'value':>10} {'target':>10}  met")
    for name, row in rows:
        met = {True: "yes", False: "NO", None: "-"}[row.get("met")]
        target = row.get("target") or "-"
        print(f"{name:15} {row['metric']:58} {row['value']:>10.3g} {target:>10}  {met}")


def markdown_table(rows) -> str:
    """The summary rows as the Markdown table README.md's benchmark section is made of (`<out>/summary.md`)."""
    lines = ["| script | metric | value | target | met |", "|---|---|---|---|---|"]
    for name, row in rows:
        met = {True: "yes", False: "**no**", None: "-"}[row.get("met")]
        lines.append(f"| `{name}` | {row['metric']} | {row['value']:.3g} | {row.get('target') or '-'} | {met} |")
    return "\n".join(lines) + "\n"


def _print_runs(runs: dict, quick: bool) -> None:
    total = sum(r["seconds"] for r in runs.values())
    print(f"\n{'script':15} {'seconds':>8} {'budget':>7}  status")
    for name, r in runs.items():
        budget = f"{r['budget_s']}" if r["budget_s"] is not None else "-"
        flag = "  OVER BUDGET" if r["over_budget"] else ""
        print(f"{name:15} {r['seconds']:>8.1f} {budget:>7}  {r['status']}{flag}")
    print(f"{'total':15} {total:>8.1f}" + (f" {sum(QUICK_BUDGET_S[n] for n in runs):>7}" if quick else ""))


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
    ax.set_xlabel("ratio (targets in the table: some are 'higher is better', some 'lower')")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
