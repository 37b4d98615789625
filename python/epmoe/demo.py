"""`epmoe demo`: the main job. Spawns local ranks (gloo on CPU, NCCL over the visible GPUs, or the ranks of a
torchrun launch), builds a scaled-down MoE layer with a skewed router, runs it expert-parallel, checks it against a
single-process reference, records expert load, rebalances with EPLB (redundant experts), runs again with the "hash"
and the "balanced" replica policy, and reports tokens/s, all-to-all bytes, per-rank load before/after and the error
vs the reference (table, JSON, PNG)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from epmoe._progress import Progress

PRESETS = {
    # Scaled-down DeepSeek-V3 layer: sigmoid + correction bias, 8 groups of 8, 4 kept, top-6, one shared expert.
    "deepseek-v3-mini": dict(
        hidden_size=256, moe_intermediate_size=128, num_experts=64, top_k=6, scoring="sigmoid", num_groups=8,
        topk_groups=4, use_bias=True, renormalize=True, scaling_factor=2.5, num_shared_experts=1,
    ),
    # Scaled-down Qwen3-MoE layer: softmax top-8 of 64, renormalized, no shared expert.
    "qwen3-mini": dict(
        hidden_size=256, moe_intermediate_size=96, num_experts=64, top_k=8, scoring="softmax", renormalize=True,
    ),
    # Scaled-down Mixtral layer: softmax top-2 of 8 large experts.
    "mixtral-mini": dict(
        hidden_size=256, moe_intermediate_size=512, num_experts=8, top_k=2, scoring="softmax", renormalize=True,
    ),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redundant_for(num_experts: int, num_ranks: int) -> int:
    """Redundant slots for the demo: at least one per rank, total divisible by the EP size."""
    from epmoe import eplb

    return eplb.num_redundant_auto(num_experts, num_ranks, min_redundant=num_ranks)


def _skewed_inputs(cfg, num_ranks: int, rank: int, num_tokens: int, seed: int):
    """Full (logical) weights identical on every rank, this rank's tokens, and a router skewed towards a few hot
    experts: tokens share a mean direction m, and gate row e gets a lognormal multiple of m."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, num_experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    mean_dir = torch.randn(hidden, generator=gen)
    mean_dir /= mean_dir.norm()
    gate_weight = torch.randn(num_experts, hidden, generator=gen) / hidden**0.5
    hotness = torch.exp(1.5 * torch.randn(num_experts, generator=gen))
    gate_weight += (hotness / hotness.max() * 3.0)[:, None] * mean_dir[None, :]
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    shared = None
    if cfg.shared_size > 0:
        shared = [torch.randn(cfg.shared_size, hidden, generator=gen) / hidden**0.5,
                  torch.randn(cfg.shared_size, hidden, generator=gen) / hidden**0.5,
                  torch.randn(hidden, cfg.shared_size, generator=gen) / cfg.shared_size**0.5]
    bias = 0.01 * torch.randn(num_experts, generator=gen) if cfg.use_bias else None
    token_gen = torch.Generator().manual_seed(seed + 1000 + rank)
    x = torch.randn(num_tokens, hidden, generator=token_gen) + 2.0 * mean_dir[None, :]
    return gate_weight, bias, w13, w2, shared, x


def _reference_forward(cfg, x, gate_weight, bias, w13, w2, shared):
    """Single-process reference: pure-torch routing and experts over all logical experts (epmoe.reference)."""
    from epmoe import reference

    logits = F.linear(x.float(), gate_weight)
    topk_weights, topk_idx = reference.route_reference(
        logits, cfg.top_k, scoring=cfg.scoring, num_groups=cfg.num_groups, topk_groups=cfg.topk_groups, bias=bias,
        renormalize=cfg.renormalize, scaling_factor=cfg.scaling_factor,
    )
    out = reference.experts_forward_reference(x.float(), topk_idx, topk_weights, w13.float(), w2.float())
    if shared is not None:
        g, u, d = (w.float() for w in shared)
        out = out + F.linear(F.silu(F.linear(x.float(), g)) * F.linear(x.float(), u), d)
    return out


def _worker(rank: int, num_ranks: int, args: argparse.Namespace, port: int | None) -> None:
    from epmoe import _logging, eplb
    from epmoe.cli import log_level
    from epmoe.layer import MoE, MoEConfig

    if port is not None:  # a spawned rank starts with fresh logging (under torchrun, `epmoe` configured it)
        _logging.configure(log_level(args))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if use_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=num_ranks, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_ranks))
    try:
        report = _run(rank, num_ranks, args, device, MoE, MoEConfig, eplb)
        if rank == 0:
            _write_report(report, Path(args.out))
    finally:
        dist.destroy_process_group()


def _rank_loads(moe, slot_load: torch.Tensor) -> list[float]:
    """Tokens routed to each rank's slots, from a per-slot load [P] summed over the EP group."""
    per_rank = slot_load.double().reshape(moe.num_ranks, moe.num_local_slots).sum(dim=1)
    return [float(v) for v in per_rank]


def _run(rank, num_ranks, args, device, MoE, MoEConfig, eplb) -> dict:
    preset = dict(PRESETS[args.preset])
    preset["num_redundant_experts"] = _redundant_for(preset["num_experts"], num_ranks)
    cfg = MoEConfig(**preset, eplb_window=args.steps)
    gate_weight, bias, w13, w2, shared, x = _skewed_inputs(cfg, num_ranks, rank, args.tokens, args.seed)
    moe = MoE(cfg).to(device)
    with torch.no_grad():
        moe.gate_weight.copy_(gate_weight)
        if bias is not None:
            moe.e_score_correction_bias.copy_(bias)
        moe.load_logical_experts(w13, w2)
        if shared is not None:
            for lin, w in zip((moe.shared_experts.gate_proj, moe.shared_experts.up_proj,
                               moe.shared_experts.down_proj), shared, strict=True):
                lin.weight.copy_(w)
    moe.eval()
    x = x.to(device)
    reference = _reference_forward(cfg, x.cpu(), gate_weight, bias, w13, w2, shared)
    progress = Progress(3 * args.steps + 3, "epmoe demo", enabled=rank == 0 and not getattr(args, "quiet", False))

    def run_phase(label: str) -> dict:
        moe.recorder.reset()
        bytes_before = moe.ep.bytes_sent
        times, out = [], None
        for step in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            with torch.no_grad():
                out = moe(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            progress.step(f"{label} step {step + 1}/{args.steps}")
        err = torch.tensor((out.cpu().float() - reference).abs().max().item() if out.numel() else 0.0)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        step_time = torch.tensor(statistics.median(times))
        dist.all_reduce(step_time, op=dist.ReduceOp.MAX)
        total_tokens = args.tokens * num_ranks
        sent = torch.tensor([float(moe.ep.bytes_sent - bytes_before) / args.steps])
        all_sent = [torch.zeros(1) for _ in range(num_ranks)]
        dist.all_gather(all_sent, sent)
        slot_load = moe.recorder.window_load(group=moe.group)[0]
        loads = _rank_loads(moe, slot_load)
        return {
            "tokens_per_s": total_tokens / float(step_time),
            "step_ms": 1e3 * float(step_time),
            "bytes_sent_per_rank": [float(s) for s in torch.cat(all_sent)],
            "rank_load": loads,
            "max_over_mean_load": max(loads) / (sum(loads) / len(loads)),
            "max_abs_err": float(err),
        }

    before = run_phase("before EPLB")
    stats = moe.rebalance()
    progress.step("EPLB rebalance")
    after = run_phase("after EPLB")
    # The same placement with the per-batch less-loaded copy ("balanced": counts exchanged over the EP group).
    moe.config.replica_policy = "balanced"
    after_balanced = run_phase("after EPLB, balanced")
    moe.config.replica_policy = cfg.replica_policy
    progress.step("report")
    tolerance = TOLERANCE[cfg.dtype]
    max_err = max(before["max_abs_err"], after["max_abs_err"], after_balanced["max_abs_err"])
    report = {
        "preset": args.preset,
        "ranks": num_ranks,
        "backend": dist.get_backend(),
        "tokens_per_rank": args.tokens,
        "steps": args.steps,
        "num_experts": cfg.num_experts,
        "num_slots": cfg.num_slots,
        "top_k": cfg.top_k,
        "before": before,
        "after": after,
        "after_balanced": after_balanced,
        "replica_policy": cfg.replica_policy,
        "rebalance": stats,
        "max_abs_err": max_err,
        "tolerance": tolerance,
        "match": bool(max_err <= tolerance),
        "placement_after": moe.placement.to_json_dict(),
    }
    progress.step("done")
    progress.close()
    return report


def _write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    phases = (report["before"], report["after"], report["after_balanced"])
    rows = [
        ("tokens/s", *(f"{p['tokens_per_s']:.0f}" for p in phases)),
        ("step time (ms)", *(f"{p['step_ms']:.1f}" for p in phases)),
        ("bytes sent per rank (mean)", *(f"{statistics.mean(p['bytes_sent_per_rank']):.0f}" for p in phases)),
        ("per-rank load max/mean", *(f"{p['max_over_mean_load']:.3f}" for p in phases)),
        ("max abs err vs reference", *(f"{p['max_abs_err']:.2e}" for p in phases)),
    ]
    print(f"\nepmoe demo: preset {report['preset']}, {report['ranks']} ranks ({report['backend']}), "
          f"{report['tokens_per_rank']} tokens/rank, {report['num_experts']} experts in {report['num_slots']} slots, "
          f"top-{report['top_k']}")
    policy = report["replica_policy"]
    print(f"{'':28} {'before EPLB':>14} {'after EPLB':>14} {'after EPLB':>14}")
    print(f"{'replica policy':28} {policy:>14} {policy:>14} {'balanced':>14}")
    for name, *cells in rows:
        print(f"{name:28}" + "".join(f" {c:>14}" for c in cells))
    verdict = "MATCH" if report["match"] else "MISMATCH"
    print(f"EP output vs single-process reference: {verdict} (max abs err {report['max_abs_err']:.2e}, "
          f"tolerance {report['tolerance']:.0e})")
    plot = _plot(report, out_dir / "load.png")
    print(f"report: {out_dir / 'report.json'}" + (f", plot: {plot}" if plot else " (matplotlib missing: no plot)"))


def _plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    before = report["before"]["rank_load"]
    ranks = list(range(len(before)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    series = (("before", "before EPLB"), ("after", f"after EPLB, {report['replica_policy']}"),
              ("after_balanced", "after EPLB, balanced"))
    for i, (key, label) in enumerate(series):
        ax.bar([r + (i - 1) * 0.27 for r in ranks], report[key]["rank_load"], width=0.27,
               label=f"{label} (max/mean {report[key]['max_over_mean_load']:.2f})")
    ax.axhline(sum(before) / len(before), color="gray", linestyle="--", linewidth=1, label="mean")
    ax.set_xlabel("EP rank")
    ax.set_ylabel("routed token-slots per window")
    ax.set_xticks(ranks)
    ax.set_ylim(top=1.45 * max(max(report[key]["rank_load"]) for key, _ in series) + 1e-9)  # room for the legend
    ax.set_title(f"epmoe demo: {report['preset']}, {report['ranks']} ranks")
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_parser(subparsers) -> None:
    from epmoe.cli import positive_int

    p = subparsers.add_parser("demo", help="run the EP + EPLB demo on local ranks and write a report",
                              description="Run a scaled-down MoE layer expert-parallel on local ranks, check it "
                              "against a single-process reference, rebalance with EPLB and report tokens/s, "
                              "all-to-all bytes and per-rank load before/after (table, JSON, PNG).")
    p.add_argument("--ranks", type=positive_int, default=None,
                   help="local ranks to spawn (default: the visible GPUs, else 4); under torchrun the launched "
                   "ranks are used and --ranks must match WORLD_SIZE if given")
    p.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v3-mini", help="layer shape")
    p.add_argument("--tokens", type=positive_int, default=1024, help="tokens per rank")
    p.add_argument("--steps", type=positive_int, default=4, help="forward steps before and after the rebalance")
    p.add_argument("--out", default="epmoe-demo", help="output folder for report.json and load.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, router and tokens")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu forces gloo even with GPUs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from epmoe.cli import UsageError

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        world_size = int(os.environ["WORLD_SIZE"])
        if args.ranks is not None and args.ranks != world_size:
            raise UsageError(f"--ranks {args.ranks} disagrees with the torchrun launch (WORLD_SIZE={world_size}); "
                             "drop --ranks under torchrun")
        _worker(int(os.environ["RANK"]), world_size, args, port=None)
    else:
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        num_ranks = args.ranks if args.ranks is not None else (torch.cuda.device_count() if use_cuda else 4)
        torch.multiprocessing.spawn(_worker, args=(num_ranks, args, _free_port()), nprocs=num_ranks, join=True)
    report_path = Path(args.out) / "report.json"
    if report_path.exists() and ("RANK" not in os.environ or os.environ["RANK"] == "0"):
        return 0 if json.loads(report_path.read_text())["match"] else 1
    return 0
