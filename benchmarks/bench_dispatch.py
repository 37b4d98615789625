"""EP dispatch+combine round trip on CPU gloo ranks: epmoe (deduplicated per destination rank) against a
Megatron-style baseline (torch.distributed.all_to_all_single of all T*k slot rows, no deduplication).

Layer: DeepSeek-V2-Lite-like scaled (E=64, k=6, H=1024, T=2048 tokens per rank, bf16, uniform random top-k).
Reports per world size the median round-trip time of each, the bytes sent per rank, the byte ratio
(deduplicated rows / T*k rows) and the time ratio, and a "summary" list of {metric, value, target, met} rows
(byte ratio < 1, time ratio <= 1 at each world size) for `epmoe bench`.
Usage: python benchmarks/bench_dispatch.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from bench_common import run_gloo_ranks  # noqa: E402


def baseline_round_trip(x, topk_idx, topk_weights, num_experts, world):
    """Megatron-style: one row per (token, slot), sorted by expert, all_to_all_single, identity experts, back,
    weighted sum. Counts are exchanged first and read on the host (as Megatron's dropless A2A does)."""
    num_tokens, top_k = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    rows = x.index_select(0, order // top_k)
    experts_per_rank = num_experts // world
    send_counts = torch.bincount(flat // experts_per_rank, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    recv = x.new_empty(sum(recv_splits), x.shape[1])
    dist.all_to_all_single(recv, rows, recv_splits, send_splits)
    back = torch.empty_like(rows)
    dist.all_to_all_single(back, recv, send_splits, recv_splits)  # identity experts
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32)
    weights = topk_weights.reshape(-1)[order].unsqueeze(1)
    out.index_add_(0, order // top_k, back.float() * weights)
    remote_rows = sum(n for r, n in enumerate(send_splits) if r != dist.get_rank())
    return out.to(x.dtype), 2 * remote_rows * x.shape[1] * x.element_size()


def _worker(rank, world, cfg):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import epmoe

    gen = torch.Generator().manual_seed(rank)
    num_tokens, hidden, num_experts, top_k = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["top_k"]
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    topk_weights, topk_idx = torch.rand(num_tokens, num_experts, generator=gen).softmax(-1).topk(top_k, dim=-1)
    topk_idx = topk_idx.to(torch.int32)
    ep = epmoe.EPGroup()

    def run_epmoe():
        before = ep.bytes_sent
        d = ep.dispatch(x, topk_idx, topk_weights, num_experts)
        y = ep.combine(d.recv_x, d.handle)
        return y, ep.bytes_sent - before

    def run_baseline():
        return baseline_round_trip(x, topk_idx, topk_weights, num_experts, world)

    y_ep, _ = run_epmoe()
    y_base, _ = run_baseline()
    max_diff = (y_ep.float() - y_base.float()).abs().max().item() if num_tokens else 0.0
    times = {"epmoe": [], "baseline": []}
    sent = {}
    for _ in range(cfg["repeats"]):
        for name, fn in (("epmoe", run_epmoe), ("baseline", run_baseline)):
            dist.barrier()
            start = time.perf_counter()
            _, nbytes = fn()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the round trip ends when the slowest rank is done
            times[name].append(elapsed.item())
            sent[name] = nbytes
    ep.destroy()
    return {"times": times, "bytes": sent, "max_abs_diff": max_diff}


def bench(world, cfg):
    results = dict(enumerate(run_gloo_ranks(_worker, world, cfg, timeout_s=120)))
    t_ep = statistics.median(results[0]["times"]["epmoe"])
    t_base = statistics.median(results[0]["times"]["baseline"])
    b_ep = sum(r["bytes"]["epmoe"] for r in results.values()) / world
    b_base = sum(r["bytes"]["baseline"] for r in results.values()) / world
    return {
        "world_size": world,
        "epmoe_round_trip_s": t_ep,
        "baseline_round_trip_s": t_base,
        "time_ratio": t_ep / t_base,
        "epmoe_bytes_sent_per_rank": b_ep,
        "baseline_bytes_sent_per_rank": b_base,
        "byte_ratio": b_ep / b_base,
        "max_abs_diff_vs_baseline": max(r["max_abs_diff"] for r in results.values()),
    }


def summarize(results):
    """The rows `epmoe bench` prints: epmoe/baseline byte and time ratios per world size, with their targets."""
    summary = []
    for row in results:
        world = row["world_size"]
        summary.append(
            {
                "metric": f"dispatch+combine byte ratio vs all_to_all_single, R={world}",
                "value": row["byte_ratio"],
                "target": "<1",
                "met": row["byte_ratio"] < 1,
            }
        )
        summary.append(
            {
                "metric": f"dispatch+combine time ratio vs all_to_all_single, R={world}",
                "value": row["time_ratio"],
                "target": "<=1",
                "met": row["time_ratio"] <= 1,
            }
        )
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512 tokens per rank, 3 repeats")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    cfg = {
        "experts": 64,
        "top_k": 6,
        "hidden": 1024,
        "tokens": 512 if args.quick else 2048,
        "repeats": 3 if args.quick else 9,
        "dtype": "bfloat16",
    }
    report = {"config": cfg, "baseline": "Megatron-style all_to_all_single of T*k slot rows", "results": []}
    for world in (2, 4):
        row = bench(world, cfg)
        report["results"].append(row)
        print(
            f"R={world}: epmoe {row['epmoe_round_trip_s'] * 1e3:.1f} ms, baseline "
            f"{row['baseline_round_trip_s'] * 1e3:.1f} ms (time ratio {row['time_ratio']:.2f}); bytes/rank "
            f"{row['epmoe_bytes_sent_per_rank'] / 2**20:.1f} MiB vs {row['baseline_bytes_sent_per_rank'] / 2**20:.1f} "
            f"MiB (byte ratio {row['byte_ratio']:.2f}); max |diff| {row['max_abs_diff_vs_baseline']:.3g}",
            flush=True,
        )
    report["summary"] = summarize(report["results"])
    for item in report["summary"]:
        status = "met" if item["met"] else "MISSED"
        print(f"{item['metric']:58} {item['value']:8.3f}  target {item['target']:4} {status}", flush=True)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
