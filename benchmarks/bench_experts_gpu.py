"""GPU benchmark of the expert-path kernels against measured device ceilings and named baselines.

Per shape (DeepSeek-V3 H=7168 I=2048, Qwen3-30B H=2048 I=768, Qwen3-235B H=4096 I=1536) and rows per expert
(8/32/128/512/2048): grouped_swiglu and the down grouped_gemm vs torch._grouped_mm (where available) and a loop of
per-expert cuBLAS matmuls; permute/unpermute vs copy bandwidth. Ceilings measured in the same run: a large bf16
torch.matmul (TFLOP/s) and a large device-to-device copy (GB/s). Every timing: CUDA graph of the op, L2 flushed
before each replay, median of repeats. Prints a table, writes JSON. Exits 0 with a message when no GPU.

Usage: python benchmarks/bench_experts_gpu.py [--quick] [--out bench_experts_gpu.json] [--repeats 20]
(--quick: rows per expert 32 and 512 only, at most 64 experts, 5 repeats: the budget of scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # this checkout's epmoe, no install needed

import epmoe  # noqa: E402, F401  (registers torch.ops.epmoe)

SHAPES = {"deepseek-v3": (7168, 2048), "qwen3-30b": (2048, 768), "qwen3-235b": (4096, 1536)}
ROWS_PER_EXPERT = [8, 32, 128, 512, 2048]
WEIGHT_BUDGET_BYTES = 24 << 30  # w13 + w2 of all experts of one case


def time_graph(fn, repeats: int, flush: torch.Tensor) -> float:
    """Median seconds of one replay of a CUDA graph of fn(), with the L2 flushed before each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings(repeats: int, flush: torch.Tensor) -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = time_graph(lambda: torch.matmul(a, b), repeats, flush)
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t_copy = time_graph(lambda: dst.copy_(src), repeats, flush)
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e12, "copy_gbps": 2 * src.numel() / t_copy / 1e9}


def bench_case(name, hidden, inter, rows_per_expert, repeats, flush, ceil, max_experts=256) -> list[dict]:
    ops = torch.ops.epmoe
    weight_bytes = 3 * hidden * inter * 2
    num_experts = max(1, min(max_experts, WEIGHT_BUDGET_BYTES // weight_bytes))
    num_experts = min(num_experts, max(1, (64 << 20) // max(1, rows_per_expert * hidden)))
    num_rows = rows_per_expert * num_experts
    dev, dt = "cuda", torch.bfloat16
    offsets = torch.arange(num_experts + 1, device=dev, dtype=torch.int64) * rows_per_expert
    x = torch.randn(num_rows, hidden, device=dev, dtype=dt)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dt) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=dt) / inter**0.5
    h = ops.grouped_swiglu(x, offsets, w13)
    results = []

    def record(op, seconds, flops, bytes_moved, baselines):
        row = {
            "shape": name,
            "rows_per_expert": rows_per_expert,
            "num_experts": num_experts,
            "op": op,
            "us": seconds * 1e6,
            "tflops": flops / seconds / 1e12,
            "gbps": bytes_moved / seconds / 1e9,
            "frac_matmul": flops / seconds / 1e12 / ceil["matmul_tflops"],
            "frac_copy": bytes_moved / seconds / 1e9 / ceil["copy_gbps"],
        }
        row.update({f"speedup_vs_{k}": v / seconds for k, v in baselines.items()})
        results.append(row)

    # gate+up with fused SwiGLU vs the same GEMM (2I columns) in the baselines.
    offs32 = offsets[1:].to(torch.int32)
    base = {}
    if hasattr(torch, "_grouped_mm"):
        base["grouped_mm"] = time_graph(lambda: torch._grouped_mm(x, w13.transpose(1, 2), offs=offs32), repeats, flush)
    base["cublas_loop"] = time_graph(
        lambda: [x[e * rows_per_expert : (e + 1) * rows_per_expert] @ w13[e].T for e in range(num_experts)],
        repeats,
        flush,
    )
    t = time_graph(lambda: ops.grouped_swiglu(x, offsets, w13), repeats, flush)
    record(
        "grouped_swiglu", t, 2 * num_rows * hidden * 2 * inter, w13.numel() * 2 + x.numel() * 2 + h.numel() * 2, base
    )

    base = {}
    if hasattr(torch, "_grouped_mm"):
        base["grouped_mm"] = time_graph(lambda: torch._grouped_mm(h, w2.transpose(1, 2), offs=offs32), repeats, flush)
    base["cublas_loop"] = time_graph(
        lambda: [h[e * rows_per_expert : (e + 1) * rows_per_expert] @ w2[e].T for e in range(num_experts)],
        repeats,
        flush,
    )
    t = time_graph(lambda: ops.grouped_gemm(h, offsets, w2, True), repeats, flush)
    record("grouped_gemm_down", t, 2 * num_rows * inter * hidden, w2.numel() * 2 + h.numel() * 2 + x.numel() * 2, base)

    # permute / unpermute at top_k = 8 over the same rows.
    top_k = 8
    num_tokens = max(1, num_rows // top_k)
    topk_idx = torch.randint(0, num_experts, (num_tokens, top_k), device=dev, dtype=torch.int32)
    topk_weights = torch.rand(num_tokens, top_k, device=dev)
    xt = torch.randn(num_tokens, hidden, device=dev, dtype=dt)
    _, _, slot_to_row, row_to_slot = ops.moe_layout(topk_idx, num_experts, None)
    rows = ops.moe_permute(xt, row_to_slot, top_k)
    moved = 2 * rows.numel() * 2
    t = time_graph(lambda: ops.moe_permute(xt, row_to_slot, top_k), repeats, flush)
    record("moe_permute", t, 0, moved, {})
    t = time_graph(lambda: ops.moe_unpermute(rows, slot_to_row, topk_weights), repeats, flush)
    record("moe_unpermute", t, 0, rows.numel() * 2 + xt.numel() * 2, {})
    t = time_graph(lambda: ops.moe_layout(topk_idx, num_experts, None), repeats, flush)
    record("moe_layout", t, 0, topk_idx.numel() * 4 * 4, {})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_experts_gpu.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed replays per op (default 20, quick 5)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (the GPU check)")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 20)
    rows_per_expert = [32, 512] if args.quick else ROWS_PER_EXPERT
    max_experts = 64 if args.quick else 256
    if not torch.cuda.is_available():
        print("bench_experts_gpu: no CUDA device, nothing to measure")
        return 0
    flush = torch.empty(256 << 20, device="cuda", dtype=torch.uint8)  # > L2
    ceil = ceilings(repeats, flush)
    print(
        f"device {torch.cuda.get_device_name()}: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
        f"copy {ceil['copy_gbps']:.0f} GB/s"
    )
    results = []
    for name, (hidden, inter) in SHAPES.items():
        for rpe in rows_per_expert:
            results.extend(bench_case(name, hidden, inter, rpe, repeats, flush, ceil, max_experts))
    header = f"{'shape':<12}{'rows/e':>7}{'E':>5} {'op':<18}{'us':>9}{'TFLOP/s':>9}{'GB/s':>8}{'%mm':>6}{'%copy':>7}"
    print(header + "  vs grouped_mm / cublas loop")
    for r in results:
        vs = " ".join(f"{r[k]:.2f}x" for k in ("speedup_vs_grouped_mm", "speedup_vs_cublas_loop") if k in r)
        print(
            f"{r['shape']:<12}{r['rows_per_expert']:>7}{r['num_experts']:>5} {r['op']:<18}{r['us']:>9.1f}"
            f"{r['tflops']:>9.1f}{r['gbps']:>8.0f}{100 * r['frac_matmul']:>6.0f}{100 * r['frac_copy']:>7.0f}  {vs}"
        )
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "ceilings": ceil, "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
