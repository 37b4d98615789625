"""Real-scale construction: peak memory and time of building rank 0's share of one full-size MoE layer.

Cases (bf16, each in a fresh subprocess, rank 0 of a torch.distributed "fake" process group of the EP size, which
answers the constructor's one collective, the seed broadcast, locally):
- DeepSeek-V3 layer: E=256 (+64 redundant = 320 slots), H=7168, I=2048, top-8 of 8 groups, 1 shared expert, EP64
  (5 slots per rank);
- Qwen3-235B-A22B layer: E=128, H=4096, I=1536, top-8, no shared expert, EP8 (16 slots per rank).
Peak RSS = `ru_maxrss` after building minus the resident set after the imports and the process group (same
process; the resident set rather than the peak so far, so that import-time transients cannot hide part of it);
own bytes = the bytes of every parameter and buffer the rank holds. Targets: peak - own <= 1.5 GB, build < 30 s.
Also timed: the same build on the meta device (no memory, no RNG, no collective). `--quick` runs both cases at
once (the memory figures are the same; the build times then share the cores).

    python benchmarks/bench_scale.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = {
    "DeepSeek-V3": dict(hidden_size=7168, moe_intermediate_size=2048, num_experts=256, top_k=8, scoring="sigmoid",
                        num_groups=8, topk_groups=4, use_bias=True, num_shared_experts=1, num_redundant_experts=64,
                        scaling_factor=2.5, num_ranks=64),
    "Qwen3-235B-A22B": dict(hidden_size=4096, moe_intermediate_size=1536, num_experts=128, top_k=8,
                            num_redundant_experts=0, num_ranks=8),
}
PEAK_TARGET_GB = 1.5
TIME_TARGET_S = 30.0


def _resident_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak so far, ru_maxrss)."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_case(name: str) -> dict:
    """Runs in a fresh process: builds rank 0's layer of case `name`, returns the measurements."""
    import resource
    import time

    import epmoe
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    fields = dict(CASES[name])
    num_ranks = fields.pop("num_ranks")
    dist.init_process_group("fake", rank=0, world_size=num_ranks, store=FakeStore())
    cfg = epmoe.MoEConfig(dtype=torch.bfloat16, **fields)
    start = time.perf_counter()
    meta = epmoe.MoE(cfg, device="meta")
    meta_s = time.perf_counter() - start
    del meta
    # Baseline: the resident set now (not the peak so far, which import-time transients may have raised).
    baseline = _resident_bytes()
    start = time.perf_counter()
    moe = epmoe.MoE(cfg)
    build_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    own = sum(t.numel() * t.element_size() for t in [*moe.parameters(), *moe.buffers()])
    full = cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    dist.destroy_process_group()
    return {
        "case": name, "num_ranks": num_ranks, "num_local_slots": moe.num_local_slots,
        "own_bytes": own, "all_experts_bytes": full,
        "peak_rss_over_baseline_bytes": peak - baseline,
        "build_s": build_s, "meta_build_s": meta_s,
    }


def measure(names, parallel: bool = False) -> list[dict]:
    """`build_case(name)` for each name, each in a fresh interpreter (so that ru_maxrss is that build's peak);
    `parallel` starts them all at once (faster, but the build times then share the cores)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    def start(name):
        return subprocess.Popen([sys.executable, __file__, "--child", name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    results, procs = [], [] if not parallel else [start(name) for name in names]
    for i, name in enumerate(names):
        proc = procs[i] if parallel else start(name)
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building {name} failed:\n{err}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="both cases at once (same memory, shared cores)")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(build_case(args.child)))
        return
    rows, summary = [], []
    print(f"{'case':18} {'EP':>4} {'slots':>5} {'own GB':>8} {'peak-own GB':>12} {'build s':>8} {'meta s':>7}")
    for name, r in zip(CASES, measure(list(CASES), parallel=args.quick), strict=True):
        over = (r["peak_rss_over_baseline_bytes"] - r["own_bytes"]) / 1e9
        print(f"{name:18} {r['num_ranks']:>4} {r['num_local_slots']:>5} {r['own_bytes'] / 1e9:8.3f} {over:12.3f} "
              f"{r['build_s']:8.2f} {r['meta_build_s']:7.3f}")
        rows.append(r)
        label = f"{name} layer, rank 0 of EP{r['num_ranks']}"
        summary.append({"metric": f"{label}: peak RSS - own bytes (GB)", "value": over,
                        "target": f"<={PEAK_TARGET_GB}", "met": over <= PEAK_TARGET_GB})
        summary.append({"metric": f"{label}: build time (s)", "value": r["build_s"],
                        "target": f"<{TIME_TARGET_S:g}", "met": r["build_s"] < TIME_TARGET_S})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
