"""Training-step benchmark: what `epmoe.sync_grads` costs relative to one training step of the whole-layer
benchmark's layer (benchmarks/bench_layer.py: E=64, 8 groups / 4 kept, top-6, sigmoid + bias, one shared expert,
H=512, I=256, T=2048 tokens in total, T/R per rank, fp32, CPU, gloo).

A step is forward + backward + `sync_grads` + AdamW `step`; each part is timed on every rank after a barrier and
the slowest rank's time counts. Every rank runs one thread: on a shared 2-core machine two-thread regions of small
ops (sync_grads' per-slot copies) wait for the second core and would measure the scheduler, not the work.
Runs EP=1 and EP=2, each without and with 16 redundant experts (with redundancy, replica gradients are summed
across slots and ranks). Reports median ms and the ratio sync_grads / step.

    python benchmarks/bench_training.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from bench_common import run_gloo_ranks

HIDDEN, INTER, NUM_EXPERTS, TOP_K, TOTAL_TOKENS = 512, 256, 64, 6, 2048
PARTS = ("fwd_bwd", "sync_grads", "optimizer")


def make_layer(num_redundant: int, group=None):
    from epmoe.layer import MoE, MoEConfig

    cfg = MoEConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=NUM_EXPERTS, top_k=TOP_K,
                    scoring="sigmoid", num_groups=8, topk_groups=4, use_bias=True, renormalize=True,
                    scaling_factor=2.5, num_shared_experts=1, num_redundant_experts=num_redundant)
    torch.manual_seed(0)
    return MoE(cfg, group)


def run(rank: int, world: int, num_redundant: int, reps: int) -> dict:
    import epmoe

    torch.set_num_threads(1)
    moe = make_layer(num_redundant, dist.group.WORLD if world > 1 else None)
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOTAL_TOKENS, HIDDEN, generator=gen).chunk(world)[rank].contiguous()

    def timed(fn) -> float:
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        elapsed = torch.tensor(time.perf_counter() - t0)
        if world > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed) * 1e3

    samples = {part: [] for part in PARTS}
    for rep in range(reps + 1):  # the first step warms up
        opt.zero_grad(set_to_none=True)
        times = {"fwd_bwd": timed(lambda: moe(x).square().mean().backward()),
                 "sync_grads": timed(lambda: epmoe.sync_grads(moe)),
                 "optimizer": timed(opt.step)}
        if rep > 0:
            for part, value in times.items():
                samples[part].append(value)
    result = {part: statistics.median(values) for part, values in samples.items()}
    result["step"] = sum(result[part] for part in PARTS)
    return result


def bench(world: int, num_redundant: int, reps: int) -> dict:
    if world == 1:
        return run(0, 1, num_redundant, reps)
    return run_gloo_ranks(run, world, num_redundant, reps, timeout_s=300)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    reps = 3 if args.quick else 9
    print(f"training step of the DeepSeek-V3-style benchmark layer: E={NUM_EXPERTS}, top-{TOP_K}, H={HIDDEN}, "
          f"I={INTER}, T={TOTAL_TOKENS} total, fp32, AdamW, CPU ({os.cpu_count()} cores, 1 thread per rank), "
          f"median of {reps}")
    print(f"{'ranks':>5} {'redundant':>9} {'fwd+bwd ms':>11} {'sync ms':>8} {'adamw ms':>9} {'step ms':>8} "
          f"{'sync/step':>9}")
    rows, summary = [], []
    for world in (1, 2):
        for num_redundant in (0, 16):
            r = bench(world, num_redundant, reps)
            ratio = r["sync_grads"] / r["step"]
            print(f"{world:5d} {num_redundant:9d} {r['fwd_bwd']:11.1f} {r['sync_grads']:8.2f} {r['optimizer']:9.1f} "
                  f"{r['step']:8.1f} {ratio:9.3f}")
            rows.append({"ranks": world, "num_redundant_experts": num_redundant, **r, "sync_over_step": ratio})
            # Without replicas sync_grads is bookkeeping (target); with them it all-reduces every replica's
            # gradients over the EP group, a transfer gloo on localhost makes slow (reported).
            target = "<0.1" if num_redundant == 0 else None
            summary.append({"metric": f"sync_grads / training step, EP={world}, {num_redundant} redundant",
                            "value": ratio, "target": target, "met": ratio < 0.1 if target else None})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
