"""Whole-layer benchmark: the epmoe expert-parallel MoE layer on 1, 2 and 4 ranks against the transformers
DeepseekV3MoE block it is built from (`MoE.from_hf`), run in one process on the same total work.

A DeepSeek-V3-style scaled layer (E=64, 8 groups / 4 kept, top-6, sigmoid + bias, one shared expert, H=512,
I=256), T=2048 tokens in total (T/R per rank), fp32, forward and forward+backward. The transformers block is timed
with its CPU experts implementations eager and grouped_mm (batched_mm copies the weights of every token-slot and
does not fit in memory at this size); the fastest one is the baseline.
On R ranks a step's time is the slowest rank's (ranks start together after a barrier). Reports the median ms and
ratio = baseline ms / epmoe ms (> 1: epmoe faster). On this 2-core machine 4 ranks oversubscribe the cores, so the
EP=4 figure measures correctness of the path under contention more than scaling.

    python benchmarks/bench_layer.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN, INTER, NUM_EXPERTS, TOP_K, TOTAL_TOKENS = 512, 256, 64, 6, 2048
IMPLEMENTATIONS = ("eager", "grouped_mm")  # batched_mm materialises [T*k, 2I, H] weights: too big here


def make_block(impl: str = "eager"):
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = transformers.DeepseekV3Config(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
        n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    cfg._experts_implementation = impl
    block = DeepseekV3MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        block.gate.e_score_correction_bias.copy_(torch.rand(NUM_EXPERTS, generator=gen))
    return block


def tokens(num_tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def time_steps(step, reps: int, sync=None) -> float:
    step()  # warm-up
    samples = []
    for _ in range(reps):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        step()
        elapsed = torch.tensor(time.perf_counter() - t0)
        if sync is not None:  # the step of R ranks takes as long as its slowest rank
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        samples.append(float(elapsed) * 1e3)
    return statistics.median(samples)


def make_step(module, x: torch.Tensor, backward: bool):
    def step():
        if backward:
            xi = x.clone().requires_grad_(True)
            module(xi).sum().backward()
            module.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                module(x)

    return step


def bench_transformers(reps: int) -> dict:
    x = tokens(TOTAL_TOKENS, 1)
    out = {}
    for impl in IMPLEMENTATIONS:
        block = make_block(impl)
        try:
            out[impl] = {b: time_steps(make_step(block, x, b == "fwd_bwd"), reps) for b in ("fwd", "fwd_bwd")}
        except Exception as exc:  # an implementation this transformers/torch cannot run on CPU
            out[impl] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _rank_worker(rank, world, port, reps, queue):
    try:
        from epmoe.layer import MoE

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        moe = MoE.from_hf(make_block(), dist.group.WORLD)
        x = tokens(TOTAL_TOKENS, 1).chunk(world)[rank].contiguous()
        result = {b: time_steps(make_step(moe, x, b == "fwd_bwd"), reps, sync=dist.barrier)
                  for b in ("fwd", "fwd_bwd")}
        result["bytes_sent_per_step"] = moe.ep.bytes_sent / (2 * (reps + 1))
        queue.put((rank, result))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, {"error": repr(exc)}))


def bench_epmoe(world: int, reps: int) -> dict:
    if world == 1:
        from epmoe.layer import MoE

        moe = MoE.from_hf(make_block())
        x = tokens(TOTAL_TOKENS, 1)
        return {b: time_steps(make_step(moe, x, b == "fwd_bwd"), reps) for b in ("fwd", "fwd_bwd")}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_worker, args=(r, world, port, reps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(timeout=30)
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError(f"EP={world} failed: {errors}")
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    reps = 3 if args.quick else 7

    hf = bench_transformers(reps)
    usable = {impl: r for impl, r in hf.items() if "error" not in r}
    rows, summary = [], []
    print(f"DeepSeek-V3-style layer: E={NUM_EXPERTS}, top-{TOP_K}, H={HIDDEN}, I={INTER}, T={TOTAL_TOKENS} total, "
          f"fp32, CPU ({os.cpu_count()} cores), median of {reps}")
    print(f"{'pass':8} {'implementation':26} {'ms':>9} {'ratio':>7}")
    for phase in ("fwd", "fwd_bwd"):
        best_impl = min(usable, key=lambda impl: usable[impl][phase])
        baseline = usable[best_impl][phase]
        for impl, r in hf.items():
            print(f"{phase:8} {'transformers ' + impl:26} {r.get(phase, float('nan')):9.1f}")
        rows.append({"phase": phase, "baseline": f"transformers {best_impl}", "baseline_ms": baseline})
    for world in (1, 2, 4):
        ep = bench_epmoe(world, reps)
        for phase in ("fwd", "fwd_bwd"):
            baseline = min(r[phase] for r in usable.values())
            ratio = baseline / ep[phase]
            print(f"{phase:8} {f'epmoe EP={world}':26} {ep[phase]:9.1f} {ratio:7.2f}")
            rows.append({"phase": phase, "ranks": world, "epmoe_ms": ep[phase], "ratio_vs_fastest_hf": ratio,
                         "bytes_sent_per_step": ep.get("bytes_sent_per_step")})
            summary.append({"metric": f"layer {phase} ratio vs fastest transformers block, EP={world}",
                            "value": ratio, "target": ">1", "met": ratio > 1.0})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"transformers": hf, "rows": rows, "summary": summary}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
