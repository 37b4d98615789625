"""CPU benchmark of epmoe.experts_forward against transformers' experts implementations, with the machine's ceilings.

Same weights and routing for every implementation: a DeepSeek-V2-Lite-like scaled layer (E=64, H=1024, I=512,
k=6), T in {32, 2048}, fp32 and bf16, forward and forward+backward. The implementations alternate within each
round (machine load hits them alike); reported: the median ms of each, and the median over rounds of
ratio = fastest transformers implementation / epmoe (> 1: epmoe faster).

Physical ceilings, measured in the same run:
- T=2048 (compute): GFLOP/s (6*T*k*H*I forward, 3x that forward+backward) against the fp32 FMA and bf16
  dot-product (vdpbf16ps) peaks of the intra-op threads (torch.ops.epmoe.cpu_peak_gflops);
- T=32 (weight streaming): bytes of the hit experts' weights / time against the read bandwidth x.sum() shows on a
  tensor larger than the last-level cache (memory, where weights live between the implementations' runs).
On CPUs with AMX the bf16 prefill GEMMs go to oneDNN (AMX), and the native vdpbf16ps kernels are also timed
(EPMOE_CPU_GEMM=native) so that both paths are reported.

    python benchmarks/bench_experts.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import epmoe  # noqa: E402
import torch  # noqa: E402
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
)
from epmoe.integrations import transformers as epmoe_transformers  # noqa: E402

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 64, 1024, 512, 6
RATIO_TARGET = 1.2  # T=2048 forward: speedup over the fastest transformers implementation (other rows: reported)
BANDWIDTH_TARGET = 0.8  # T=32 forward: weight bytes / time as a fraction of the x.sum() read bandwidth
BF16_PEAK_TARGET = 0.6  # T=2048 bf16 forward: GFLOP/s as a fraction of the bf16 dot-product peak
NATIVE = "epmoe (native kernels)"


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


def make_step(experts, impl: str, x, top_idx, top_weights, backward: bool):
    """One call of the experts module with transformers' experts implementation `impl` ("epmoe" = ours)."""
    forced = "native" if impl == NATIVE else None
    name = "epmoe" if impl == NATIVE else impl

    def step():
        experts.config._experts_implementation = name
        if forced:
            os.environ["EPMOE_CPU_GEMM"] = forced
        try:
            if backward:
                xr = x.detach().requires_grad_()
                wr = top_weights.detach().requires_grad_()
                out = experts(xr, top_idx, wr)
                out.backward(torch.ones_like(out))
                experts.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    experts(x, top_idx, top_weights)
        finally:
            if forced:
                os.environ.pop("EPMOE_CPU_GEMM")

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no batched_mm")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--eager-backward",
        action="store_true",
        help="also time transformers' eager experts backward (15-40 s per step on 2 cores: indexing the 3-D weights "
        "per expert materialises a full-size weight gradient for every hit expert)",
    )
    add_timing_args(parser)
    args = parser.parse_args()
    apply_timing_args(args)
    epmoe_transformers.register()
    rounds = {False: 3 if args.quick else 7, True: 2 if args.quick else 5}  # by backward
    cpu = cpu_description()
    peaks = cpu_peaks()
    native_bf16_too = "amx_bf16" in cpu["isa"] and "avx512_bf16" in cpu["isa"] and cpu["cpu_gemm"] == "auto"
    print(f"CPU: {cpu['model']}, {cpu['threads']} threads, ISA {' '.join(cpu['isa'])}, "
          f"EPMOE_CPU_GEMM={cpu['cpu_gemm']}, {cpu['timer']} time")
    print(f"ceilings: {format_peaks(peaks)}; memory read bandwidth of x.sum() over 2x the last-level cache")
    print(f"shape: E={NUM_EXPERTS}, H={HIDDEN}, I={INTER}, k={TOP_K}; ratio = fastest transformers impl / epmoe, "
          f"median of {rounds[False]} (fwd) / {rounds[True]} (fwd+bwd) interleaved rounds")
    gen = torch.Generator().manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        experts = make_experts(dtype)
        dtype_name = str(dtype).removeprefix("torch.")
        peak = peaks["fp32_fma" if dtype == torch.float32 else "bf16_dot"]
        for num_tokens in (32, 2048):
            x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
            top_idx, top_weights = make_routing(num_tokens, gen)
            top_weights = top_weights.to(dtype)
            hit = int(torch.unique(top_idx).numel())
            weight_bytes = hit * 3 * HIDDEN * INTER * x.element_size()
            read_gbs = read_bandwidth(weight_bytes, rounds[False]) if num_tokens < 2048 else None
            for backward in (False, True):
                impls = ["epmoe", "eager", "grouped_mm"]
                # batched_mm gathers a copy of both weight matrices per (token, slot): only decode sizes fit.
                if not args.quick and num_tokens * TOP_K * 3 * HIDDEN * INTER * x.element_size() < 4e9:
                    impls.append("batched_mm")
                if backward and not args.eager_backward:
                    impls.remove("eager")
                if dtype == torch.bfloat16 and native_bf16_too and not backward:
                    impls.insert(1, NATIVE)
                fns = {impl: make_step(experts, impl, x, top_idx, top_weights, backward) for impl in impls}
                samples = interleaved(fns, rounds[backward])
                ms = median_ms(samples)
                baselines = [i for i in impls if not i.startswith("epmoe")]
                fastest = min(baselines, key=ms.get)
                ratio = median_ratio(samples, baselines, "epmoe")
                flops = num_tokens * TOP_K * 6 * HIDDEN * INTER * (3 if backward else 1)
                row = {
                    "dtype": dtype_name,
                    "num_tokens": num_tokens,
                    "pass": "forward+backward" if backward else "forward",
                    "ms": {k: round(v, 3) for k, v in ms.items()},
                    "fastest_transformers": fastest,
                    "speedup_vs_fastest": round(ratio, 3),
                    "epmoe_gflops": round(flops / ms["epmoe"] / 1e6, 1),
                    "peak_gflops": peak,
                    "experts_hit": hit,
                    "epmoe_weight_gb_per_s": round(weight_bytes / ms["epmoe"] / 1e6, 2),
                    "read_gb_per_s": read_gbs,
                }
                if NATIVE in ms:
                    row["native_gflops"] = round(flops / ms[NATIVE] / 1e6, 1)
                results.append(row)
                line = (f"{dtype_name:8s} T={num_tokens:5d} {row['pass']:16s} "
                        + " ".join(f"{k}={v:.1f}ms" for k, v in ms.items())
                        + f" | {ratio:.2f}x vs {fastest}")
                if num_tokens >= 2048:
                    line += f"; {row['epmoe_gflops']:.0f} GFLOP/s" + (f" = {row['epmoe_gflops'] / peak:.2f} of peak"
                                                                     if peak else "")
                    if NATIVE in ms and peak:
                        line += f" (native kernels {row['native_gflops']:.0f} = {row['native_gflops'] / peak:.2f})"
                else:
                    line += (f"; weights {row['epmoe_weight_gb_per_s']:.1f} GB/s of {read_gbs:.1f} GB/s read "
                             f"bandwidth = {row['epmoe_weight_gb_per_s'] / read_gbs:.2f}")
                print(line, flush=True)

    summary = []
    for r in results:
        name = f"{r['dtype']} T={r['num_tokens']}"
        large = r["num_tokens"] >= 2048
        targeted = large and r["pass"] == "forward"
        summary.append({
            "metric": f"experts {r['pass']} ratio vs fastest transformers, {name}",
            "value": r["speedup_vs_fastest"],
            "target": f">={RATIO_TARGET}" if targeted else None,
            "met": r["speedup_vs_fastest"] >= RATIO_TARGET if targeted else None,
        })
        if r["pass"] != "forward":
            continue
        if not large:
            fraction = r["epmoe_weight_gb_per_s"] / r["read_gb_per_s"]
            summary.append({"metric": f"experts forward weight GB/s / x.sum() read GB/s, {name}", "value": fraction,
                            "target": f">={BANDWIDTH_TARGET}", "met": fraction >= BANDWIDTH_TARGET})
        elif r["dtype"] == "bfloat16" and r["peak_gflops"]:
            for key, label in (("epmoe_gflops", ""), ("native_gflops", " (native kernels)")):
                if key in r:
                    fraction = r[key] / r["peak_gflops"]
                    summary.append({"metric": f"experts forward GFLOP/s / bf16 dot peak{label}, {name}",
                                    "value": fraction, "target": f">={BF16_PEAK_TARGET}",
                                    "met": fraction >= BF16_PEAK_TARGET})
    report = {
        "benchmark": "experts_forward_cpu",
        "summary": summary,
        "shape": {"num_experts": NUM_EXPERTS, "hidden": HIDDEN, "intermediate": INTER, "top_k": TOP_K},
        "cpu": cpu,
        "peaks_gflops": peaks,
        "torch": torch.__version__,
        "epmoe": epmoe.__version__,
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
