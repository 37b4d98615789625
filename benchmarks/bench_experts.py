"""CPU benchmark of epmoe.experts_forward against transformers' experts implementations.

Same weights and routing for every implementation: a DeepSeek-V2-Lite-like scaled layer (E=64, H=1024, I=512,
k=6), T in {32, 2048}, fp32 and bf16, forward and forward+backward. Reports the median ms, GFLOP/s (T=2048),
weight GB/s (T=32) and the ratio of the fastest transformers implementation's time to epmoe's (> 1 = epmoe faster).

    python benchmarks/bench_experts.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import epmoe
import torch
from epmoe.integrations import transformers as epmoe_transformers

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 64, 1024, 512, 6
TARGETS = {32: 2.0, 2048: 1.2}  # required speedup over the fastest transformers implementation


def make_experts(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K
    )
    experts = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, HIDDEN**-0.5)
        experts.down_proj.normal_(0, INTER**-0.5)
    return experts.to(dtype)


def make_routing(num_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(num_tokens, NUM_EXPERTS, generator=gen)
    top_weights, top_idx = scores.topk(TOP_K, dim=-1)
    return top_idx, top_weights / top_weights.sum(-1, keepdim=True)


def time_ms(fn, reps: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive caches)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def run_case(experts, impl: str, x, top_idx, top_weights, backward: bool, reps: int) -> float:
    experts.config._experts_implementation = impl

    def step():
        if backward:
            xr = x.detach().requires_grad_()
            wr = top_weights.detach().requires_grad_()
            out = experts(xr, top_idx, wr)
            out.backward(torch.ones_like(out))
            experts.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                experts(x, top_idx, top_weights)

    return time_ms(step, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--eager-backward",
        action="store_true",
        help="also time transformers' eager experts backward (one sample each; 15-40 s per step on 2 cores, since "
        "indexing the 3-D weights per expert materialises a full-size weight gradient for every hit expert)",
    )
    args = parser.parse_args()
    epmoe_transformers.register()
    reps = 3 if args.quick else 5
    gen = torch.Generator().manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        experts = make_experts(dtype)
        for num_tokens in (32, 2048):
            x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
            top_idx, top_weights = make_routing(num_tokens, gen)
            top_weights = top_weights.to(dtype)
            impls = ["epmoe", "eager", "grouped_mm"]
            # batched_mm gathers a copy of both weight matrices per (token, slot): only the decode case fits.
            if num_tokens * TOP_K * 3 * HIDDEN * INTER * x.element_size() < 4e9:
                impls.append("batched_mm")
            for backward in (False, True):
                timed = [i for i in impls if not (backward and i == "eager" and not args.eager_backward)]
                ms = {
                    impl: run_case(
                        experts, impl, x, top_idx, top_weights, backward, 1 if impl == "eager" and backward else reps
                    )
                    for impl in timed
                }
                fastest = min((i for i in timed if i != "epmoe"), key=ms.get)
                flops = num_tokens * TOP_K * 6 * HIDDEN * INTER * (3 if backward else 1)
                hit = int(torch.unique(top_idx).numel())
                weight_bytes = hit * 3 * HIDDEN * INTER * x.element_size()
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "num_tokens": num_tokens,
                    "pass": "forward+backward" if backward else "forward",
                    "ms": {k: round(v, 3) for k, v in ms.items()},
                    "not_timed": sorted(set(impls) - set(timed)),
                    "fastest_transformers": fastest,
                    "speedup_vs_fastest": round(ms[fastest] / ms["epmoe"], 3),
                    "target_speedup": TARGETS[num_tokens],
                    "epmoe_gflops": round(flops / ms["epmoe"] / 1e6, 1),
                    "epmoe_weight_gb_per_s": round(weight_bytes / ms["epmoe"] / 1e6, 2),
                }
                results.append(row)
                metric = (
                    f"{row['epmoe_gflops']:7.1f} GFLOP/s"
                    if num_tokens >= 2048
                    else f"{row['epmoe_weight_gb_per_s']:6.2f} GB/s weights"
                )
                print(
                    f"{row['dtype']:8s} T={num_tokens:5d} {row['pass']:16s} "
                    + " ".join(f"{k}={v:9.2f}ms" for k, v in ms.items())
                    + f" | epmoe {metric}, {row['speedup_vs_fastest']:.2f}x vs {fastest}"
                    + f" (target {TARGETS[num_tokens]}x)",
                    flush=True,
                )
    summary = [
        {
            "metric": f"experts {r['pass']} ratio vs fastest transformers, {r['dtype']} T={r['num_tokens']}",
            "value": r["speedup_vs_fastest"],
            "target": f">={r['target_speedup']}",
            "met": r["speedup_vs_fastest"] >= r["target_speedup"],
        }
        for r in results
    ]
    report = {
        "benchmark": "experts_forward_cpu",
        "summary": summary,
        "shape": {"num_experts": NUM_EXPERTS, "hidden": HIDDEN, "intermediate": INTER, "top_k": TOP_K},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "epmoe": epmoe.__version__,
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
