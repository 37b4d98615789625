"""EPLB planner benchmark: epmoe.eplb.plan() against the DeepSeek-compatible rebalance_experts.

Synthetic loads: per layer w_e = exp(sigma * N(0, 1)) normalised to 10^6 tokens, fixed seeds. Balancedness is
epmoe.eplb.balancedness (mean / max of rank loads). Incremental: plan on the next window
(load * exp(0.2 * N(0, 1))) from the previous plan with max_moves=16, vs a fresh plan on that window.

    python benchmarks/bench_eplb.py [--quick] [--out file.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from epmoe.eplb import Placement, balancedness, plan, rebalance_experts  # noqa: E402

# name, layers, experts, groups, ranks, redundant, nodes, strategy
CASES = [
    ("DSV3 EP8 +16", 58, 256, 8, 8, 16, 1, "global"),
    ("DSV3 EP32 +32 global", 58, 256, 8, 32, 32, 1, "global"),
    ("DSV3 EP32 +32 hier 4n", 58, 256, 8, 32, 32, 4, "hierarchical"),
    ("DSV3 EP64 +64", 58, 256, 8, 64, 64, 1, "global"),
    ("Qwen3 EP16 +16", 48, 128, 1, 16, 16, 1, "global"),
]
SIGMAS = (0.5, 1.0, 1.5)
MAX_MOVES = 16


def synthetic_load(num_layers, num_experts, sigma, seed):
    rng = np.random.default_rng(seed)
    w = np.exp(sigma * rng.standard_normal((num_layers, num_experts)))
    return w / w.sum(axis=1, keepdims=True) * 1e6


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def run_case(case, sigma, repeats, incremental):
    name, num_layers, num_experts, num_groups, num_ranks, num_redundant, num_nodes, strategy = case
    num_slots = num_experts + num_redundant
    seed = int(sigma * 100) + num_ranks
    load = synthetic_load(num_layers, num_experts, sigma, seed)
    ours, t_ours = timed(lambda: plan(load, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                                      strategy=strategy), repeats)
    ds_groups = num_groups if strategy == "hierarchical" else 1  # 1 % N == 0 only for N = 1: global
    ref, t_ref = timed(lambda: rebalance_experts(load, num_slots, ds_groups, num_nodes if ds_groups > 1 else 1,
                                                 num_ranks), max(1, repeats // 2))
    ref = Placement(ref[0], num_experts, num_ranks)
    b_ours, b_ref = balancedness(load, ours), balancedness(load, ref)
    row = {
        "case": name, "sigma": sigma, "strategy": strategy,
        "plan_ms": t_ours * 1e3, "deepseek_ms": t_ref * 1e3,
        "plan_bal_mean": float(b_ours.mean()), "plan_bal_min": float(b_ours.min()),
        "deepseek_bal_mean": float(b_ref.mean()), "deepseek_bal_min": float(b_ref.min()),
        "layers_worse_than_deepseek": int(np.count_nonzero(b_ours < b_ref - 1e-12)),
        "plan_same_rank_dups": ours.num_same_rank_duplicates(),
        "deepseek_same_rank_dups": ref.num_same_rank_duplicates(),
    }
    if incremental:
        rng = np.random.default_rng(seed + 1)
        nxt = load * np.exp(0.2 * rng.standard_normal(load.shape))
        inc, t_inc = timed(lambda: plan(nxt, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                                        strategy=strategy, previous=ours, max_moves=MAX_MOVES), 3)
        fresh = plan(nxt, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups, strategy=strategy)
        kept = plan(nxt, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups, strategy=strategy,
                    previous=ours)
        b_stale, b_inc, b_fresh = balancedness(nxt, ours), balancedness(nxt, inc), balancedness(nxt, fresh)
        row.update({
            "stale_bal_mean": float(b_stale.mean()),
            "incremental_bal_mean": float(b_inc.mean()), "incremental_bal_min": float(b_inc.min()),
            "incremental_ms": t_inc * 1e3,
            "incremental_copies": inc.moves_from(ours).remote_copies,
            "fresh_bal_mean": float(b_fresh.mean()),
            "fresh_copies": fresh.moves_from(ours).remote_copies,
            "fresh_relabelled_copies": kept.moves_from(ours).remote_copies,
        })
    return row


def summarize(rows):
    """Target rows {"metric": str, "value": float, "target": str, "met": bool} from the benchmark rows."""
    ep64 = [r for r in rows if r["case"] == "DSV3 EP64 +64"]
    g32 = [r for r in rows if r["case"] == "DSV3 EP32 +32 global" and r["sigma"] == 1.0]
    # Hierarchical plans are excluded from the incremental balancedness target: a fresh hierarchical plan itself
    # stays far below 0.98 (node imbalance cannot be repaired inside a node).
    incs = [r for r in rows if "incremental_bal_mean" in r]
    inc_global = [r for r in incs if r["strategy"] == "global"]
    plan_ms = max(r["plan_ms"] for r in ep64)
    worse = sum(r["layers_worse_than_deepseek"] for r in rows)
    bal32 = min(r["plan_bal_mean"] for r in g32)
    inc_bal = min(r["incremental_bal_mean"] for r in inc_global)
    copies = min(r["fresh_copies"] / max(r["incremental_copies"], 1) for r in incs)
    inc_ms = max(r["incremental_ms"] for r in incs if r["case"] in ("DSV3 EP32 +32 global", "DSV3 EP64 +64"))
    return [
        {"metric": "plan() ms, DSV3 EP64 +64 (worst sigma, median)", "value": plan_ms, "target": "<= 20",
         "met": plan_ms <= 20.0},
        {"metric": "layers where plan() is less balanced than DeepSeek", "value": float(worse), "target": "== 0",
         "met": worse == 0},
        {"metric": "plan() balancedness mean, DSV3 EP32 +32 global sigma=1", "value": bal32, "target": ">= 0.99",
         "met": bal32 >= 0.99},
        {"metric": f"incremental (max_moves={MAX_MOVES}) balancedness mean, worst global case", "value": inc_bal,
         "target": ">= 0.98", "met": inc_bal >= 0.98},
        {"metric": "fresh / incremental expert copies, worst case", "value": copies, "target": ">= 5",
         "met": copies >= 5.0},
        {"metric": f"incremental (max_moves={MAX_MOVES}) ms, DSV3 EP32/EP64 global (median)", "value": inc_ms,
         "target": "<= 100", "met": inc_ms <= 100.0},
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sigma = 1 only, fewer repeats")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    sigmas = (1.0,) if args.quick else SIGMAS
    repeats = 3 if args.quick else 7
    rows = []
    header = (f"{'case':24} {'sig':>4} {'plan ms':>8} {'ds ms':>8} {'bal mean/min':>14} {'ds mean/min':>14} "
              f"{'worse':>5} {'dups':>9} {'inc bal':>8} {'inc/fresh copies':>17} {'inc ms':>7}")
    print(header)
    print("-" * len(header))
    for case in CASES:
        for sigma in sigmas:
            row = run_case(case, sigma, repeats, incremental=sigma == 1.0)
            rows.append(row)
            inc = (f"{row['incremental_bal_mean']:8.4f} {row['incremental_copies']:>7}/{row['fresh_copies']:<9} "
                   f"{row['incremental_ms']:7.1f}" if "incremental_bal_mean" in row else "")
            print(f"{row['case']:24} {sigma:4.1f} {row['plan_ms']:8.1f} {row['deepseek_ms']:8.1f} "
                  f"{row['plan_bal_mean']:7.4f}/{row['plan_bal_min']:.4f} "
                  f"{row['deepseek_bal_mean']:7.4f}/{row['deepseek_bal_min']:.4f} "
                  f"{row['layers_worse_than_deepseek']:5d} "
                  f"{row['plan_same_rank_dups']:>4}/{row['deepseek_same_rank_dups']:<4} "
                  f"{inc}", flush=True)
    summary = summarize(rows)
    for item in summary:
        status = "met" if item["met"] else "MISSED"
        print(f"{item['metric']:64} {item['value']:10.4f}  target {item['target']:8} {status}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
