"""Routing benchmark: epmoe.route against the plain-torch routers it replaces.

CPU: median wall time of epmoe.route vs (a) the torch composition of transformers' DeepseekV3 router after its
GEMM (sigmoid, bias, group top-2, group mask, top-k, gather, renormalize, scale) and (b) softmax + torch.topk +
renormalize (Qwen3-MoE / Mixtral). GPU (when available): kernel time per call, from CUDA-graph replays.

Usage: python benchmarks/bench_route.py [--quick] [--out file.json]
"""

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # this checkout's epmoe, no install needed

import epmoe  # noqa: E402
from epmoe import eplb  # noqa: E402

SHAPES = {
    # name: (num_experts, top_k, scoring, num_groups, topk_groups, use_bias, scaling_factor)
    "deepseek_v3": (256, 8, "sigmoid", 8, 4, True, 2.5),
    "qwen3": (128, 8, "softmax", 1, 1, False, 1.0),
}
CPU_TARGETS = {("deepseek_v3", 4096): 8.0, ("qwen3", 4096): 4.0}  # minimum speedup over the torch baseline
GPU_TARGETS_US = {("deepseek_v3", 4096): 10.0}


def torch_deepseek_v3(logits, bias, top_k, num_groups, topk_groups, scaling_factor):
    scores = logits.sigmoid()
    sel = scores + bias
    num_tokens, num_experts = sel.shape
    group_scores = sel.view(num_tokens, num_groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, num_experts // num_groups).reshape(num_tokens, -1)
    sel = sel.masked_fill(~score_mask.bool(), float("-inf"))
    topk_idx = torch.topk(sel, k=top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_idx)
    topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * scaling_factor, topk_idx


def torch_softmax_topk(logits, top_k):
    probs = torch.softmax(logits, dim=-1)
    topk_weights, topk_idx = torch.topk(probs, top_k, dim=-1)
    return topk_weights / topk_weights.sum(dim=-1, keepdim=True), topk_idx


def median_seconds(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_inputs(name, num_tokens, device="cpu"):
    num_experts = SHAPES[name][0]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    bias = torch.rand(num_experts, generator=gen) * 0.2 + 2.0
    return logits.to(device), bias.to(device)


def epmoe_call(name, logits, bias):
    num_experts, top_k, scoring, num_groups, topk_groups, use_bias, scaling_factor = SHAPES[name]
    return lambda: epmoe.route(
        logits, top_k, scoring=scoring, num_groups=num_groups, topk_groups=topk_groups,
        bias=bias if use_bias else None, scaling_factor=scaling_factor,
    )  # fmt: skip


def bench_cpu(token_counts, repeats):
    rows = []
    for name in SHAPES:
        num_experts, top_k, _, num_groups, topk_groups, _, scaling_factor = SHAPES[name]
        for num_tokens in token_counts:
            logits, bias = make_inputs(name, num_tokens)
            if name == "deepseek_v3":
                baseline = functools.partial(
                    torch_deepseek_v3, logits, bias, top_k, num_groups, topk_groups, scaling_factor
                )
                baseline_name = "torch DeepseekV3 router composition"
            else:
                baseline = functools.partial(torch_softmax_topk, logits, top_k)
                baseline_name = "softmax + torch.topk + renormalize"
            ours = median_seconds(epmoe_call(name, logits, bias), repeats)
            theirs = median_seconds(baseline, repeats)
            rows.append(
                dict(
                    shape=name, num_tokens=num_tokens, baseline=baseline_name, epmoe_ms=ours * 1e3,
                    baseline_ms=theirs * 1e3, speedup=theirs / ours, target=CPU_TARGETS.get((name, num_tokens)),
                )
            )  # fmt: skip
    return rows


def bench_load_recording(repeats, num_tokens=4096):
    """Cost of what EPLB adds to routing (DeepSeek-V3 shape, 32 redundant slots): replica choice (hash + lookup) and
    the load recorder (device-side counts), each as a fraction of the routing time."""
    num_experts = SHAPES["deepseek_v3"][0]
    logits, bias = make_inputs("deepseek_v3", num_tokens)
    route_call = epmoe_call("deepseek_v3", logits, bias)
    _, topk_idx = route_call()
    load = torch.rand(1, num_experts, generator=torch.Generator().manual_seed(1)) + 0.5
    placement = eplb.plan(load, num_experts + 32, 8)
    maps = (placement.log2phy[0], placement.logcnt[0])
    slot_idx = eplb.map_to_physical(topk_idx, maps, 0)
    recorder = eplb.LoadRecorder(1, num_experts + 32, window_size=16)

    def record():
        recorder.record(0, slot_idx)
        recorder.step()

    route_s = median_seconds(route_call, repeats)
    return dict(
        num_tokens=num_tokens,
        route_ms=route_s * 1e3,
        replica_choice_fraction=median_seconds(lambda: eplb.map_to_physical(topk_idx, maps, 0), repeats) / route_s,
        recorder_fraction=median_seconds(record, repeats) / route_s,
    )


def bench_gpu(token_counts, replays):
    rows = []
    for name in SHAPES:
        for num_tokens in token_counts:
            logits, bias = make_inputs(name, num_tokens, device="cuda")
            call = epmoe_call(name, logits, bias)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for _ in range(3):
                    call()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(replays):
                        call()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            kernel_us = start.elapsed_time(end) * 1e3 / replays
            rows.append(
                dict(
                    shape=name,
                    num_tokens=num_tokens,
                    kernel_us=kernel_us,
                    target_us=GPU_TARGETS_US.get((name, num_tokens)),
                )
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU section (GPU checks)")
    args = parser.parse_args()
    token_counts = (256, 4096, 32768)
    repeats = 5 if args.quick else 21

    report = dict(torch=torch.__version__, num_threads=torch.get_num_threads(), summary=[])
    report["cpu"] = [] if args.gpu_only else bench_cpu(token_counts, repeats)
    if report["cpu"]:
        print(f"CPU ({torch.get_num_threads()} threads), median of {repeats} runs")
    print(f"{'shape':<12} {'tokens':>7} {'epmoe ms':>10} {'torch ms':>10} {'speedup':>8} {'target':>7}  baseline")
    all_met = True
    for row in report["cpu"]:
        target = row["target"]
        met = target is None or row["speedup"] >= target
        all_met &= met
        target_text = f">={target:g}x" if target else "-"
        if target:
            report["summary"].append(dict(metric=f"CPU route speedup vs torch, {row['shape']} T={row['num_tokens']}",
                                          value=row["speedup"], target=target_text, met=met))
        print(
            f"{row['shape']:<12} {row['num_tokens']:>7} {row['epmoe_ms']:>10.3f} {row['baseline_ms']:>10.3f} "
            f"{row['speedup']:>7.1f}x {target_text:>7}{'' if met else ' MISSED'}  {row['baseline']}"
        )
    if report["cpu"]:
        rec = report["load_recording"] = bench_load_recording(repeats)
        met = rec["recorder_fraction"] < 0.02
        all_met &= met
        print(f"EPLB at routing (T={rec['num_tokens']}, DeepSeek-V3): load recorder "
              f"{100 * rec['recorder_fraction']:.2f}% of the routing time (target < 2%), replica choice "
              f"{100 * rec['replica_choice_fraction']:.1f}%")
        report["summary"].append(dict(metric="load recorder time / routing time, DeepSeek-V3 T=4096",
                                      value=rec["recorder_fraction"], target="<0.02", met=met))
    if torch.cuda.is_available():
        report["gpu"] = bench_gpu(token_counts, 20 if args.quick else 100)
        print(f"GPU ({torch.cuda.get_device_name()}), kernel time per call from CUDA-graph replays")
        for row in report["gpu"]:
            target = row["target_us"]
            met = target is None or row["kernel_us"] <= target
            all_met &= met
            target_text = f"<={target:g}us" if target else "-"
            if target:
                report["summary"].append(dict(metric=f"GPU route kernel us, {row['shape']} T={row['num_tokens']}",
                                              value=row["kernel_us"], target=target_text, met=met))
            print(
                f"{row['shape']:<12} {row['num_tokens']:>7} {row['kernel_us']:>9.2f}us {target_text:>8}"
                f"{'' if met else ' MISSED'}"
            )
    report["targets_met"] = all_met
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
