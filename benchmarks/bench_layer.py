"""Whole-layer benchmark: the epmoe MoE layer built from a transformers DeepseekV3MoE block (`MoE.from_hf`) against
that block, on the same tokens, fp32, with the machine's ceilings.

A DeepSeek-V3-style scaled layer: E=64 routed experts in 8 groups (4 kept), top-6, sigmoid + correction bias,
routed scaling 2.5, one shared expert, H=1024, I=256. The block runs its CPU experts implementations eager and
grouped_mm (batched_mm copies the weights of every token-slot and does not fit; the eager backward takes tens of
seconds per step, so forward+backward is compared with grouped_mm); the fastest of them in each round is the
baseline, ratio = baseline / epmoe (> 1: epmoe faster), the median over interleaved rounds (10x as many at decode,
where a round takes milliseconds and the weights' cache state moves the ratio by +-10% from round to round).
- forward at T = 1, 8, 64 (decode) and 2048 (prefill), one process (EP=1), under no_grad (the layer's inference
  path);
- forward+backward at T=2048, EP=1; and (full mode) EP=2 and EP=4 gloo ranks on the same 2048 tokens in total, a
  step's time being the slowest rank's (4 ranks oversubscribe a 2-core machine: a check of the path under
  contention more than of scaling).
Ceilings measured in the same run: at T=2048 GFLOP/s (router, routed and shared GEMMs) against the fp32 FMA peak;
at decode the bytes of weights the layer reads (hit experts, shared expert, router) / time against the memory read
bandwidth x.sum() shows on a tensor larger than the last-level cache.

    python benchmarks/bench_layer.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_common import (  # noqa: E402
    add_timing_args,
    apply_timing_args,
    cpu_description,
    cpu_peaks,
    format_peaks,
    interleaved,
    median_ms,
    median_ratio,
    read_bandwidth,
    run_gloo_ranks,
)

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 1024, 256, 64, 6
PREFILL_TOKENS, DECODE_TOKENS = 2048, (1, 8, 64)
IMPLEMENTATIONS = ("eager", "grouped_mm")  # batched_mm materialises [T*k, 2I, H] weights: too big here
DECODE_ROUNDS_FACTOR = 10
TARGETS = {(PREFILL_TOKENS, "fwd"): 1.3, (8, "fwd"): 1.3, (PREFILL_TOKENS, "fwd_bwd"): 1.0}  # EP=1 ratio targets


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


def layer_flops(num_tokens: int) -> int:
    """Router GEMM + routed experts + the shared expert (SwiGLU: 3 GEMMs of H x I), forward."""
    return 2 * num_tokens * HIDDEN * NUM_EXPERTS + 6 * num_tokens * (TOP_K + 1) * HIDDEN * INTER


def weight_bytes_read(block, x: torch.Tensor) -> int:
    """fp32 weight bytes a forward reads: the experts the block routes x to, the shared expert, the router."""
    with torch.no_grad():
        _, _, topk_idx = block.gate(x)
    hit = int(torch.unique(topk_idx).numel())
    return 4 * (3 * HIDDEN * INTER * (hit + 1) + NUM_EXPERTS * HIDDEN)


def time_steps(step, reps: int, sync) -> float:
    step()  # warm-up
    samples = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        elapsed = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step of R ranks takes as long as its slowest rank
        samples.append(float(elapsed) * 1e3)
    return statistics.median(samples)


def _rank_step_times(rank, world, reps):
    from epmoe.layer import MoE

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    moe = MoE.from_hf(make_block(), dist.group.WORLD)
    x = tokens(PREFILL_TOKENS, 1).chunk(world)[rank].contiguous()
    return {b: time_steps(make_step(moe, x, b == "fwd_bwd"), reps, dist.barrier) for b in ("fwd", "fwd_bwd")}


def bench_ep(world: int, reps: int) -> dict:
    return run_gloo_ranks(_rank_step_times, world, reps, timeout_s=600)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no multi-rank runs")
    parser.add_argument("--out", help="write the results as JSON")
    add_timing_args(parser)
    args = parser.parse_args()
    apply_timing_args(args)
    from epmoe.layer import MoE

    rounds = 3 if args.quick else 7
    cpu, peaks = cpu_description(), cpu_peaks()
    blocks = {impl: make_block(impl) for impl in IMPLEMENTATIONS}
    moe = MoE.from_hf(make_block())
    print(f"DeepSeek-V3-style layer: E={NUM_EXPERTS} (8 groups, 4 kept), top-{TOP_K}, 1 shared expert, H={HIDDEN}, "
          f"I={INTER}, fp32; CPU {cpu['model']}, {cpu['threads']} threads, {cpu['timer']} time; median of {rounds} "
          f"interleaved rounds ({DECODE_ROUNDS_FACTOR * rounds} at decode)")
    print(f"ceilings: {format_peaks(peaks)}; memory read bandwidth of x.sum() over 2x the last-level cache")
    print(f"{'T':>5} {'pass':8} " + " ".join(f"{'hf ' + i:>14}" for i in IMPLEMENTATIONS)
          + f" {'epmoe':>10} {'ratio':>6}  ceiling")
    rows, summary = [], []
    cases = [(t, "fwd") for t in DECODE_TOKENS] + [(PREFILL_TOKENS, "fwd"), (PREFILL_TOKENS, "fwd_bwd")]
    for num_tokens, phase in cases:
        x = tokens(num_tokens, 1)
        backward = phase == "fwd_bwd"
        # The block's eager experts backward takes tens of seconds per step at T=2048 (a full-size weight gradient
        # per hit expert): its forward+backward baseline is grouped_mm.
        fns = {f"transformers {i}": make_step(b, x, backward) for i, b in blocks.items()
               if not (backward and i == "eager")}
        fns["epmoe"] = make_step(moe, x, backward)
        case_rounds = DECODE_ROUNDS_FACTOR * rounds if num_tokens < PREFILL_TOKENS else rounds
        samples = interleaved(fns, case_rounds if not backward else max(2, rounds - 2))
        ms = median_ms(samples)
        baselines = [name for name in fns if name != "epmoe"]
        ratio = median_ratio(samples, baselines, "epmoe")
        row = {"num_tokens": num_tokens, "phase": phase, "ranks": 1, "ms": ms, "ratio_vs_fastest_hf": ratio}
        if num_tokens >= PREFILL_TOKENS:
            gflops = layer_flops(num_tokens) * (3 if backward else 1) / ms["epmoe"] / 1e6
            row.update(epmoe_gflops=gflops, peak_gflops=peaks["fp32_fma"])
            ceiling = f"{gflops:.0f} GFLOP/s" + (f" = {gflops / peaks['fp32_fma']:.2f} of peak" if peaks["fp32_fma"]
                                                 else "")
        else:
            nbytes = weight_bytes_read(blocks["eager"], x)
            read_gbs = read_bandwidth(nbytes, rounds)
            gbs = nbytes / ms["epmoe"] / 1e6
            row.update(weight_bytes=nbytes, epmoe_weight_gb_per_s=gbs, read_gb_per_s=read_gbs)
            ceiling = f"weights {gbs:.1f} GB/s of {read_gbs:.1f} GB/s read bandwidth = {gbs / read_gbs:.2f}"
        rows.append(row)
        print(f"{num_tokens:5d} {phase:8} " + " ".join(f"{ms[n]:12.2f}ms" if n in ms else f"{'-':>14}"
                                                   for n in (f"transformers {i}" for i in IMPLEMENTATIONS))
              + f" {ms['epmoe']:8.2f}ms {ratio:6.2f}  {ceiling}", flush=True)
        target = TARGETS.get((num_tokens, phase))
        summary.append({"metric": f"layer {phase} ratio vs fastest transformers block, EP=1 T={num_tokens}",
                        "value": ratio, "target": f">={target}" if target else None,
                        "met": ratio >= target if target else None})
    if not args.quick:
        prefill = {phase: [r for r in rows if r["num_tokens"] == PREFILL_TOKENS and r["phase"] == phase][0]
                   for phase in ("fwd", "fwd_bwd")}
        for world in (2, 4):
            ep = bench_ep(world, rounds)
            for phase in ("fwd", "fwd_bwd"):
                baseline = min(v for k, v in prefill[phase]["ms"].items() if k != "epmoe")
                ratio = baseline / ep[phase]
                print(f"{PREFILL_TOKENS:5d} {phase:8} {'EP=' + str(world) + ' gloo ranks':>29} {ep[phase]:8.2f}ms "
                      f"{ratio:6.2f}", flush=True)
                rows.append({"num_tokens": PREFILL_TOKENS, "phase": phase, "ranks": world, "epmoe_ms": ep[phase],
                             "ratio_vs_fastest_hf": ratio})
                summary.append({"metric": f"layer {phase} ratio vs fastest transformers block, EP={world} "
                                f"T={PREFILL_TOKENS}", "value": ratio, "target": ">1", "met": ratio > 1.0})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu, "peaks_gflops": peaks, "rows": rows, "summary": summary}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
