"""EPLB benchmark: epmoe.eplb.plan() against the DeepSeek-compatible rebalance_experts, the replica policies, and
the cluster simulator.

Synthetic loads: per layer w_e = exp(sigma * N(0, 1)) normalised to 10^6 tokens, fixed seeds. Balancedness is
epmoe.eplb.balancedness (mean / max of rank loads) under the "hash" (even split) or "weighted" (plan-time shares)
replica policy. Incremental: plan on the next window (load * exp(0.2 * N(0, 1))) from the previous plan with
max_moves=16, vs a fresh plan on that window. Times are medians of repeated calls (wall clock; CPU time alongside).
Policy cost: map_to_physical(policy="balanced") against epmoe.route on the same batch (T=4096, k=8, E=256), CPU.
Without --quick: `epmoe simulate` of 200 DeepSeek-V3 steps at EP64 and EP320 (time, realised balancedness).

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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import epmoe  # noqa: E402
from epmoe.eplb import Placement, balancedness, map_to_physical, plan, rebalance_experts, simulate  # noqa: E402

# name, layers, experts, groups, ranks, redundant, nodes, strategy
CASES = [
    ("DSV3 EP8 +16", 58, 256, 8, 8, 16, 1, "global"),
    ("DSV3 EP32 +32 global", 58, 256, 8, 32, 32, 1, "global"),
    ("DSV3 EP32 +32 hier 4n", 58, 256, 8, 32, 32, 4, "hierarchical"),
    ("DSV3 EP64 +64", 58, 256, 8, 64, 64, 1, "global"),
    ("Qwen3 EP16 +16", 48, 128, 1, 16, 16, 1, "global"),
    ("DSV3 EP16 +16 hier 2n", 58, 256, 8, 16, 16, 2, "hierarchical"),
]
SIGMAS = (0.5, 1.0, 1.5)
MAX_MOVES = 16


def synthetic_load(num_layers, num_experts, sigma, seed):
    rng = np.random.default_rng(seed)
    w = np.exp(sigma * rng.standard_normal((num_layers, num_experts)))
    return w / w.sum(axis=1, keepdims=True) * 1e6


def timed(fn, repeats):
    """(result, median wall seconds, median CPU seconds of this process)."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return out, statistics.median(times), statistics.median(cpu)


def run_case(case, sigma, repeats, incremental):
    name, num_layers, num_experts, num_groups, num_ranks, num_redundant, num_nodes, strategy = case
    num_slots = num_experts + num_redundant
    seed = int(sigma * 100) + num_ranks
    load = synthetic_load(num_layers, num_experts, sigma, seed)
    ours, t_ours, cpu_ours = timed(lambda: plan(load, num_slots, num_ranks, num_nodes=num_nodes,
                                                num_groups=num_groups, strategy=strategy), repeats)
    ds_groups = num_groups if strategy == "hierarchical" else 1  # 1 % N == 0 only for N = 1: global
    ref, t_ref, _ = timed(lambda: rebalance_experts(load, num_slots, ds_groups, num_nodes if ds_groups > 1 else 1,
                                                    num_ranks), max(1, repeats // 2))
    ref = Placement(ref[0], num_experts, num_ranks)
    b_ours, b_ref = balancedness(load, ours), balancedness(load, ref)
    b_weighted = balancedness(load, ours, policy="weighted")
    row = {
        "case": name, "sigma": sigma, "strategy": strategy,
        "plan_ms": t_ours * 1e3, "plan_cpu_ms": cpu_ours * 1e3, "deepseek_ms": t_ref * 1e3,
        "plan_bal_mean": float(b_ours.mean()), "plan_bal_min": float(b_ours.min()),
        "plan_weighted_bal_mean": float(b_weighted.mean()),
        "weighted_layers_below_hash": int(np.count_nonzero(b_weighted < b_ours - 1e-12)),
        "deepseek_bal_mean": float(b_ref.mean()), "deepseek_bal_min": float(b_ref.min()),
        "layers_worse_than_deepseek": int(np.count_nonzero(b_ours < b_ref - 1e-12)),
        "plan_same_rank_dups": ours.num_same_rank_duplicates(),
        "deepseek_same_rank_dups": ref.num_same_rank_duplicates(),
    }
    if incremental:
        rng = np.random.default_rng(seed + 1)
        nxt = load * np.exp(0.2 * rng.standard_normal(load.shape))
        inc, t_inc, _ = timed(lambda: plan(nxt, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                                           strategy=strategy, previous=ours, max_moves=MAX_MOVES), 3)
        fresh = plan(nxt, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups, strategy=strategy)
        kept = plan(nxt, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups, strategy=strategy,
                    previous=ours)
        b_stale, b_inc, b_fresh = balancedness(nxt, ours), balancedness(nxt, inc), balancedness(nxt, fresh)
        row.update({
            "stale_bal_mean": float(b_stale.mean()),
            "incremental_bal_mean": float(b_inc.mean()), "incremental_bal_min": float(b_inc.min()),
            "incremental_weighted_bal_mean": float(balancedness(nxt, inc, policy="weighted").mean()),
            "incremental_ms": t_inc * 1e3,
            "incremental_copies": inc.moves_from(ours).remote_copies,
            "fresh_bal_mean": float(b_fresh.mean()),
            "fresh_copies": fresh.moves_from(ours).remote_copies,
            "fresh_relabelled_copies": kept.moves_from(ours).remote_copies,
        })
    return row


def policy_cost(repeats):
    """Median seconds of epmoe.route and of map_to_physical(policy="balanced") on the same batch (T=4096, k=8,
    E=256 softmax logits skewed by a lognormal load; DSV3 EP32 +32 placement planned for that load), CPU, one
    thread each (the balanced op is serial)."""
    rng = np.random.default_rng(0)
    load = synthetic_load(1, 256, 1.0, 7)
    placement = plan(load, 288, 32)
    logits = torch.from_numpy(rng.standard_normal((4096, 256)) + np.log(load[0])).float()
    _, topk_idx = epmoe.route(logits, 8)
    route_times, balanced_times = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(repeats):  # alternating, so that both see the same machine
        _, t_route, _ = timed(lambda: epmoe.route(logits, 8), 1)
        _, t_bal, _ = timed(lambda: map_to_physical(topk_idx, placement, 0, policy="balanced"), 1)
        route_times.append(t_route)
        balanced_times.append(t_bal)
    torch.set_num_threads(threads)
    return statistics.median(route_times), statistics.median(balanced_times)


def simulate_cases():
    """`epmoe simulate` of 200 generated DeepSeek-V3 steps at EP64 and EP320: wall seconds and realised balance."""
    out = {}
    for num_ranks in (64, 320):
        start = time.perf_counter()
        report = simulate(preset="deepseek-v3", num_steps=200, num_ranks=num_ranks, interval=50)
        out[num_ranks] = {"seconds": time.perf_counter() - start, "num_slots": report["config"]["num_slots"],
                          **{f"{p}_mean": v["mean"] for p, v in report["policies"].items()}}
    return out


def summarize(rows, cost=None, sims=None):
    """Target rows {"metric": str, "value": float, "target": str, "met": bool | None} from the benchmark rows."""
    ep64 = [r for r in rows if r["case"] == "DSV3 EP64 +64"]
    h16 = [r for r in rows if r["case"] == "DSV3 EP16 +16 hier 2n"]
    g32 = [r for r in rows if r["case"] == "DSV3 EP32 +32 global" and r["sigma"] == 1.0]
    # Hierarchical plans are excluded from the incremental balancedness target: a fresh hierarchical plan itself
    # stays far below 0.98 (node imbalance cannot be repaired inside a node).
    incs = [r for r in rows if "incremental_bal_mean" in r]
    inc_global = [r for r in incs if r["strategy"] == "global"]
    inc32 = [r for r in incs if r["case"] == "DSV3 EP32 +32 global"]
    plan_ms = max(r["plan_ms"] for r in ep64)
    h16_ms = max(r["plan_ms"] for r in h16)
    all_ms = max(r["plan_ms"] for r in rows)
    worse = sum(r["layers_worse_than_deepseek"] for r in rows)
    below = sum(r["weighted_layers_below_hash"] for r in rows)
    bal32 = min(r["plan_bal_mean"] for r in g32)
    inc_w32 = min(r["incremental_weighted_bal_mean"] for r in inc32)
    copies = min(r["fresh_copies"] / max(r["incremental_copies"], 1) for r in incs)
    inc_ms = max(r["incremental_ms"] for r in incs if r["case"] in ("DSV3 EP32 +32 global", "DSV3 EP64 +64"))
    out = [
        {"metric": "plan() ms, DSV3 EP64 +64 global (worst sigma, median)", "value": plan_ms, "target": "<= 20",
         "met": plan_ms <= 20.0},
        {"metric": "plan() ms, DSV3 EP16 +16 hierarchical 2 nodes (worst sigma)", "value": h16_ms,
         "target": "<= 50", "met": h16_ms <= 50.0},
        {"metric": "plan() ms, slowest case (median)", "value": all_ms, "target": "<= 50", "met": all_ms <= 50.0},
        {"metric": "layers where plan() is less balanced than DeepSeek", "value": float(worse), "target": "== 0",
         "met": worse == 0},
        {"metric": "layers where weighted shares predict less than hash", "value": float(below), "target": "== 0",
         "met": below == 0},
        {"metric": "plan() balancedness mean, DSV3 EP32 +32 global sigma=1", "value": bal32, "target": ">= 0.99",
         "met": bal32 >= 0.99},
        {"metric": f"incremental (max_moves={MAX_MOVES}) weighted balancedness, DSV3 EP32 +32", "value": inc_w32,
         "target": ">= 0.98", "met": inc_w32 >= 0.98},
        {"metric": f"incremental (max_moves={MAX_MOVES}) hash balancedness, worst global case",
         "value": min(r["incremental_bal_mean"] for r in inc_global), "target": "-", "met": None},
        {"metric": f"incremental (max_moves={MAX_MOVES}) weighted balancedness, worst global case",
         "value": min(r["incremental_weighted_bal_mean"] for r in inc_global), "target": "-", "met": None},
        {"metric": "fresh / incremental expert copies, worst case", "value": copies, "target": ">= 5",
         "met": copies >= 5.0},
        {"metric": f"incremental (max_moves={MAX_MOVES}) ms, DSV3 EP32/EP64 global (median)", "value": inc_ms,
         "target": "<= 100", "met": inc_ms <= 100.0},
    ]
    if cost is not None:
        ratio = cost[1] / cost[0]
        out.append({"metric": "balanced policy / route time ratio (T=4096, k=8, E=256, CPU)", "value": ratio,
                    "target": "<= 0.5", "met": ratio <= 0.5})
    for num_ranks, sim in (sims or {}).items():
        out.append({"metric": f"simulate 200 DSV3 steps at EP{num_ranks}, seconds", "value": sim["seconds"],
                    "target": "< 60", "met": sim["seconds"] < 60})
        for policy in ("hash", "weighted", "balanced"):
            out.append({"metric": f"simulate EP{num_ranks} ({sim['num_slots']} slots) realised {policy}",
                        "value": sim[f"{policy}_mean"], "target": "-", "met": None})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sigma = 1 only, fewer repeats")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    sigmas = (1.0,) if args.quick else SIGMAS
    repeats = 3 if args.quick else 7
    rows = []
    header = (f"{'case':24} {'sig':>4} {'plan ms':>8} {'cpu ms':>7} {'ds ms':>8} {'bal mean/min':>14} "
              f"{'ds mean/min':>14} {'worse':>5} {'dups':>9} {'inc bal':>8} {'inc/fresh copies':>17} {'inc ms':>7}")
    print(header)
    print("-" * len(header))
    for case in CASES:
        for sigma in sigmas:
            row = run_case(case, sigma, repeats, incremental=sigma == 1.0)
            rows.append(row)
            inc = (f"{row['incremental_bal_mean']:8.4f} {row['incremental_copies']:>7}/{row['fresh_copies']:<9} "
                   f"{row['incremental_ms']:7.1f}" if "incremental_bal_mean" in row else "")
            print(f"{row['case']:24} {sigma:4.1f} {row['plan_ms']:8.1f} {row['plan_cpu_ms']:7.1f} "
                  f"{row['deepseek_ms']:8.1f} "
                  f"{row['plan_bal_mean']:7.4f}/{row['plan_bal_min']:.4f} "
                  f"{row['deepseek_bal_mean']:7.4f}/{row['deepseek_bal_min']:.4f} "
                  f"{row['layers_worse_than_deepseek']:5d} "
                  f"{row['plan_same_rank_dups']:>4}/{row['deepseek_same_rank_dups']:<4} "
                  f"{inc}", flush=True)
    cost = policy_cost(5 if args.quick else 21)
    print(f"route {cost[0] * 1e3:.2f} ms, map_to_physical(policy='balanced') {cost[1] * 1e3:.2f} ms (median, 1 thread)")
    sims = None if args.quick else simulate_cases()
    summary = summarize(rows, cost, sims)
    for item in summary:
        status = {True: "met", False: "MISSED", None: ""}[item["met"]]
        print(f"{item['metric']:70} {item['value']:10.4f}  target {item['target']:8} {status}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "policy_cost_s": cost, "simulate": sims,
                                              "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
