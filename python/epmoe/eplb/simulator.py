"""`epmoe simulate` and `epmoe.eplb.simulate`: replays an expert-load trace through the real planner and replica
policies at any EP size, without starting a process.

Each step holds a load [L, E] (a trace file's values, or the built-in generator's rates). When `tokens_per_step` is
set, the step's (token, slot) pairs are drawn from it: tokens * top_k pairs per layer, multinomially over the
experts. Without it, a trace of pair counts is used as it is, and a trace of rates (every layer of every step sums to
at most 1 and some value is fractional, like the generator's) gets 128 tokens per rank and step, as a generated one.
Per-rank loads are then computed per policy from those pairs:

- "hash" and "weighted": each expert's pairs split over its replicas as the hash does, i.e. multinomially with
  the replica shares (1 / logcnt, or the plan's `Placement.share`): the hash is uniform over [0, 2^32), and
  tests/python/test_eplb_routing.py checks that `map_to_physical` realises these splits on 10^6 tokens.
- "balanced": the per-batch min-max assignment, solved by the same kernel `map_to_physical` calls
  (`torch.ops.epmoe.replica_quotas` on the step's counts).

Realised balancedness = mean / max of the per-rank loads, per layer, reported as the mean (and the min) over layers.
"Predicted" is the same metric from the step's expected load (`balancedness(load, placement, policy=...)`). The
placement is planned with `plan()` on the first step's load, then re-planned every `interval` steps on the pairs
recorded over the last `window` steps (fresh, or an incremental repair with `max_moves`); each rebalance reports the
expert copies it needs (`Placement.moves_from`), their bytes and the planner's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .placement import POLICIES, Placement, as_load_array, balancedness, num_redundant_auto
from .planner import STRATEGIES, plan

__all__ = ["PRESETS", "ModelPreset", "synthetic_trace", "read_trace", "simulate", "write_report", "add_parser",
           "main", "DEFAULT_MAX_MOVES", "TOKENS_PER_RANK"]

DEFAULT_MAX_MOVES = 16  # slot changes per layer of an incremental rebalance unless max_moves is given
TOKENS_PER_RANK = 128   # tokens per rank and step drawn from a load of rates (generated traces)


@dataclass(frozen=True)
class ModelPreset:
    """An MoE model's shape for the simulator, and the skew of its generated load.

    Attributes: num_layers (MoE layers), num_experts (routed), top_k, num_groups (expert groups, for the
    hierarchical strategy), expert_bytes (one expert's weights as served), skew (sigma of the log-normal expert
    popularity), drift_steps (steps for the popularity to decorrelate).
    """

    num_layers: int
    num_experts: int
    top_k: int
    num_groups: int
    expert_bytes: int
    skew: float = 0.6
    drift_steps: float = 5000.0


# Shapes from the models' published configs (MoE layers, routed experts, experts per token); bytes of one expert's
# gate, up and down projections (3 * hidden * moe_intermediate) at the serving precision (FP8 for DeepSeek-V3,
# BF16 otherwise). The skew and drift are assumptions of the generator, not measurements: a log-normal sigma of 0.6
# puts the hottest of 256 experts at about 4x the mean, and the popularity decorrelates over thousands of steps.
PRESETS = {
    "deepseek-v3": ModelPreset(58, 256, 8, 8, 3 * 7168 * 2048),
    "deepseek-v2": ModelPreset(59, 160, 6, 8, 2 * 3 * 5120 * 1536),
    "qwen3-235b": ModelPreset(94, 128, 8, 1, 2 * 3 * 4096 * 1536, skew=0.8),
    "qwen3-30b": ModelPreset(48, 128, 8, 1, 2 * 3 * 2048 * 768, skew=0.8),
    "mixtral-8x7b": ModelPreset(32, 8, 2, 1, 2 * 3 * 4096 * 14336, skew=0.3),
}


def synthetic_trace(preset: ModelPreset, num_steps: int, seed: int = 0) -> np.ndarray:
    """float64 [num_steps, L, E]: drifting skewed expert loads (rates summing to 1 per layer and step).

    Log-popularity z of every (layer, expert) is a stationary AR(1) process with standard deviation `preset.skew`
    and correlation exp(-1 / drift_steps) from one step to the next; the load is softmax(z) over the experts.
    """
    rng = np.random.default_rng(seed)
    shape = (preset.num_layers, preset.num_experts)
    rho = float(np.exp(-1.0 / preset.drift_steps))
    z = preset.skew * rng.standard_normal(shape)
    out = np.empty((num_steps,) + shape)
    for step in range(num_steps):
        if step:
            z = rho * z + np.sqrt(1 - rho * rho) * preset.skew * rng.standard_normal(shape)
        w = np.exp(z - z.max(axis=1, keepdims=True))
        out[step] = w / w.sum(axis=1, keepdims=True)
    return out


def read_trace(path) -> np.ndarray:
    """Reads a [steps, L, E] trace from .npy or .pt (a tensor); values must be finite and >= 0."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".pt"):
        raise ValueError(f"TRACE must be a .npy or .pt file, got {path.name}")
    try:
        data = (np.load(path, allow_pickle=False) if suffix == ".npy"
                else torch.load(path, map_location="cpu", weights_only=True))
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of the user's file is a bad input
        raise ValueError(f"TRACE {path}: not a readable {suffix} file ({str(exc).strip().splitlines()[0]})") from exc
    if suffix == ".pt":
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{path}: a .pt trace must hold one tensor [steps, layers, experts]")
        data = data.to(torch.float64).numpy()
    try:
        data = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"TRACE {path}: values must be numbers, got {data.dtype}") from exc
    return _check_trace(data, str(path))


def _check_trace(trace: np.ndarray, name: str) -> np.ndarray:
    if trace.ndim != 3 or 0 in trace.shape:
        raise ValueError(f"{name} must have shape [steps, layers, experts], got {tuple(trace.shape)}")
    if not np.all(np.isfinite(trace)) or np.any(trace < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return trace


class _Realise:
    """Per-rank balancedness of a step's pairs on one placement, per policy (maps prepared once per placement)."""

    def __init__(self, placement: Placement):
        self.placement = placement
        phy2log, log2phy, logcnt = placement.numpy()
        self.log2phy, self.logcnt = log2phy, logcnt
        self.maps = (torch.from_numpy(log2phy.copy()), torch.from_numpy(logcnt.copy()))
        self.share = {"hash": 1.0 / np.take_along_axis(logcnt, phy2log, axis=1), "weighted": placement.share.numpy()}
        self.single = np.nonzero(logcnt == 1)

    def per_slot(self, policy: str, counts: np.ndarray, rng) -> np.ndarray:
        """int64 [L, P] pairs per slot."""
        p = self.placement
        if policy == "balanced":
            return torch.ops.epmoe.replica_quotas(torch.from_numpy(counts), *self.maps, p.num_slots,
                                                  p.num_ranks).numpy()
        # Each expert's pairs split multinomially over its replicas with the policy's shares.
        per_slot = np.zeros((p.num_layers, p.num_slots), dtype=np.int64)
        layer, expert = self.single
        per_slot[layer, self.log2phy[layer, expert, 0]] = counts[layer, expert]
        layer, expert = np.nonzero((self.logcnt > 1) & (counts > 0))
        if layer.size:
            slots = self.log2phy[layer, expert]  # [K, M], -1 padded
            valid = slots >= 0
            pvals = np.where(valid, self.share[policy][layer[:, None], slots.clip(min=0)], 0.0)
            pvals /= pvals.sum(axis=1, keepdims=True)
            drawn = rng.multinomial(counts[layer, expert], pvals)
            per_slot[np.broadcast_to(layer[:, None], slots.shape)[valid], slots[valid]] = drawn[valid]
        return per_slot

    def balancedness(self, policy: str, counts: np.ndarray, rng) -> np.ndarray:
        """float64 [L]: mean / max of the rank loads (1 for a layer without load)."""
        p = self.placement
        per_rank = self.per_slot(policy, counts, rng).reshape(p.num_layers, p.num_ranks, -1).sum(axis=2)
        peak = per_rank.max(axis=1).astype(np.float64)
        return np.where(peak > 0, per_rank.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)


def simulate(trace=None, *, preset: str | ModelPreset = "deepseek-v3", num_steps: int | None = None,
             num_ranks: int = 64, num_redundant: int | None = None, num_nodes: int = 1, num_groups: int | None = None,
             strategy: str = "global", interval: int = 50, window: int | None = None, max_moves: int | None = None,
             incremental: bool = False, tokens_per_step: int | None = None, top_k: int | None = None, policies=POLICIES,
             expert_bytes: int | None = None, initial: Placement | None = None, seed: int = 0,
             progress=None) -> dict:
    """Replays an expert-load trace through `plan()` and the replica policies (see the module docstring).

    Arguments:
        trace: [steps, L, E] loads (array, tensor or a .npy / .pt path), or None for the generator of `preset`.
        preset: a name of `PRESETS` or a `ModelPreset`: the generator's shape and skew, and the defaults of
            `top_k`, `num_groups` and `expert_bytes`.
        num_steps: steps to replay (default: the whole trace; 200 generated steps).
        num_ranks: EP size R.
        num_redundant: redundant slots (default: the smallest >= E / 8 that makes E + redundant divisible by R).
        num_nodes, num_groups, strategy: as in `plan` (groups default to the preset's for "hierarchical").
        interval: re-plan every this many steps (0: never).
        window: steps of recorded pairs each plan uses (default: `interval`).
        max_moves: incremental repair with at most this many slot changes per layer (None: a fresh plan, relabelled
            to keep experts on their ranks, unless `incremental`).
        incremental: repair the placement at each rebalance (with `max_moves`, default DEFAULT_MAX_MOVES = 16)
            instead of a fresh plan.
        tokens_per_step: tokens per step over the whole EP group; each step draws tokens * top_k pairs per layer
            from its load. None: a trace of counts is used as it is; generated traces and traces of rates (every
            layer sums to at most 1, some value fractional) draw TOKENS_PER_RANK = 128 tokens per rank.
        top_k: experts per token (default: the preset's).
        policies: the replica policies to report.
        expert_bytes: bytes of one expert copy (default: the preset's).
        initial: the placement in force at step 0 (e.g. the deployed one; default: a plan on the first step's load).
        seed: seeds the generator and the sampling.
        progress: called as progress(text) after every step (text: the step's realised balancedness per policy).

    Returns:
        A JSON-serialisable dict: "config", "steps", "rebalance_steps", "policies" ({name: {"balancedness": [per
        step, mean over layers], "balancedness_min": [per step, worst layer], "predicted": [...], "mean": ...,
        "min": ...}}), "rebalances" ([{"step", "copies", "bytes", "changed_slots", "plan_ms"}]).
    """
    model = PRESETS[preset] if isinstance(preset, str) and preset in PRESETS else preset
    if not isinstance(model, ModelPreset):
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a ModelPreset, got {preset!r}")
    if not isinstance(incremental, bool):
        raise TypeError(f"incremental must be a bool, got {type(incremental).__name__}")
    for name, value, low in (("num_ranks", num_ranks, 1), ("num_nodes", num_nodes, 1), ("interval", interval, 0),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value in (("num_steps", num_steps), ("window", window), ("tokens_per_step", tokens_per_step),
                        ("top_k", top_k), ("expert_bytes", expert_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    policies = tuple(policies)
    if not policies or any(p not in POLICIES for p in policies):
        raise ValueError(f"policies must be a non-empty subset of {POLICIES}, got {policies}")
    generated = trace is None
    if generated:
        trace = synthetic_trace(model, 200 if num_steps is None else num_steps, seed)
    elif isinstance(trace, (str, Path)):
        trace = read_trace(trace)
    else:
        trace = _check_trace(np.asarray(trace.detach().cpu() if isinstance(trace, torch.Tensor) else trace,
                                        dtype=np.float64), "trace")
    total_steps, num_layers, num_experts = trace.shape
    num_steps = total_steps if num_steps is None else num_steps
    if num_steps > total_steps:
        raise ValueError(f"num_steps ({num_steps}) exceeds the trace's {total_steps} steps")
    if num_redundant is None:
        num_redundant = num_redundant_auto(num_experts, num_ranks, min_redundant=num_experts // 8)
    num_slots = num_experts + num_redundant
    top_k = model.top_k if top_k is None else top_k
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) exceeds the {num_experts} experts")
    if num_groups is None:
        num_groups = model.num_groups if strategy == "hierarchical" and model.num_experts == num_experts else 1
    # Rates (like the generator's) hold no pair counts: rounding them would leave every step empty.
    rates = generated or bool(np.all(trace.sum(axis=2) <= 1.0 + 1e-9) and np.any(trace != np.rint(trace)))
    if tokens_per_step is None and rates:
        tokens_per_step = TOKENS_PER_RANK * num_ranks
    if incremental and max_moves is None:
        max_moves = DEFAULT_MAX_MOVES
    window = interval if window is None else window
    expert_bytes = model.expert_bytes if expert_bytes is None else expert_bytes
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")

    rng = np.random.default_rng(seed + 1)

    def step_counts(load: np.ndarray) -> np.ndarray:
        if tokens_per_step is None:
            return np.rint(load).astype(np.int64)
        total = load.sum(axis=1, keepdims=True)
        probs = np.where(total > 0, load / np.where(total > 0, total, 1.0), 1.0 / num_experts)
        return rng.multinomial(tokens_per_step * top_k, probs)

    def planned(load, previous):
        start = time.perf_counter()
        new = plan(load, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups, strategy=strategy,
                   previous=previous, max_moves=max_moves if previous is not None else None)
        return new, 1e3 * (time.perf_counter() - start)

    if initial is None:
        placement, first_ms = planned(as_load_array(trace[0]), None)
    else:
        if not isinstance(initial, Placement):
            raise TypeError(f"initial must be a Placement, got {type(initial).__name__}")
        if (initial.num_layers, initial.num_experts, initial.num_slots, initial.num_ranks) != (
                num_layers, num_experts, num_slots, num_ranks):
            shape = (initial.num_layers, initial.num_experts, initial.num_slots, initial.num_ranks)
            raise ValueError(f"initial has (layers, experts, slots, ranks) = {shape}, expected "
                             f"{(num_layers, num_experts, num_slots, num_ranks)}")
        placement, first_ms = initial, 0.0
    realise = _Realise(placement)
    config = {
        "trace": "generated" if generated else "given", "trace_values": "rates" if rates else "counts",
        "rebalance": "fresh" if max_moves is None else "incremental",
        "preset": preset if isinstance(preset, str) else None,
        "model": asdict(model), "num_steps": num_steps, "num_layers": num_layers, "num_experts": num_experts,
        "num_ranks": num_ranks, "num_slots": num_slots, "num_redundant": num_redundant, "num_nodes": num_nodes,
        "num_groups": num_groups, "strategy": strategy, "interval": interval, "window": window,
        "max_moves": max_moves, "tokens_per_step": tokens_per_step, "top_k": top_k, "expert_bytes": expert_bytes,
        "seed": seed, "initial_plan_ms": first_ms,
    }
    results = {p: {"balancedness": [], "balancedness_min": [], "predicted": []} for p in policies}
    rebalances, history = [], []
    for step in range(num_steps):
        if interval and step and step % interval == 0:
            recorded = np.sum(history[-window:], axis=0)
            new, ms = planned(recorded, placement)
            moves = new.moves_from(placement)
            rebalances.append({"step": step, "copies": moves.remote_copies,
                               "bytes": moves.remote_copies * expert_bytes,
                               "changed_slots": moves.changed_slots, "plan_ms": ms})
            placement, realise = new, _Realise(new)
        load = trace[step]
        counts = step_counts(load)
        history.append(counts)
        history = history[-window:] if window else history
        for policy in policies:
            realised = realise.balancedness(policy, counts, rng)
            predicted = balancedness(load, placement, policy=policy)
            results[policy]["balancedness"].append(float(realised.mean()))
            results[policy]["balancedness_min"].append(float(realised.min()))
            results[policy]["predicted"].append(float(predicted.mean()))
        if progress is not None:
            progress(" ".join(f"{p} {results[p]['balancedness'][-1]:.3f}" for p in policies))
    for values in results.values():
        values["mean"] = float(np.mean(values["balancedness"]))
        values["min"] = float(np.min(values["balancedness_min"]))
    return {"config": config, "steps": num_steps, "rebalance_steps": [r["step"] for r in rebalances],
            "policies": results, "rebalances": rebalances}


def write_report(report: dict, out) -> tuple:
    """Writes simulate.json and, with matplotlib, simulate.png (balancedness per step and policy, rebalances
    marked) into the folder `out`, or to `out` itself when it ends in .json (the plot next to it, .png). Returns
    (json path, png path or None)."""
    out = Path(out)
    json_path = out if out.suffix.lower() == ".json" else out / "simulate.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return json_path, None
    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = np.arange(report["steps"])
    for name, values in report["policies"].items():
        ax.plot(steps, values["balancedness"], label=f"{name} (mean {values['mean']:.3f})", linewidth=1.2)
    for i, step in enumerate(report["rebalance_steps"]):
        ax.axvline(step, color="gray", linestyle=":", linewidth=0.8, label="rebalance" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("realised balancedness (mean / max rank load)")
    ax.set_title(f"epmoe simulate: {cfg['preset'] or 'trace'}, EP{cfg['num_ranks']}, {cfg['num_slots']} slots, "
                 f"interval {cfg['interval']}")
    ax.set_ylim(top=1.0)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    png_path = json_path.with_suffix(".png")
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


# ---- the `epmoe simulate` command


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `simulate` subcommand to the `epmoe` CLI's subparsers (errors and -q/-v/--debug: epmoe.cli)."""
    from epmoe.cli import non_negative_int, positive_int

    parser = subparsers.add_parser("simulate", help="replay an expert-load trace through EPLB at any EP size",
                                   description="Replay an expert-load trace (or a generated drifting one) through "
                                               "the EPLB planner and replica policies at any EP size.")
    add = parser.add_argument
    add("trace", metavar="TRACE", nargs="?",
        help="[steps, layers, experts] expert loads (.npy or .pt); default: generated (--preset)")
    add("--preset", choices=sorted(PRESETS), default="deepseek-v3", help="model shape (and generated load)")
    add("--steps", type=positive_int, default=None, help="steps to replay (default: the trace's; 200)")
    add("--ranks", type=positive_int, default=64, help="EP size")
    add("--redundant", type=non_negative_int, default=None,
        help="redundant slots (default: the smallest >= experts / 8 divisible by the EP size)")
    add("--nodes", type=positive_int, default=None, help="nodes (--strategy hierarchical only; default: 1)")
    add("--groups", type=positive_int, default=None,
        help="expert groups (--strategy hierarchical only; default: the preset's)")
    add("--strategy", choices=STRATEGIES, default="global",
        help="global: replicas anywhere; hierarchical: expert groups packed onto nodes")
    add("--interval", type=non_negative_int, default=50, help="re-plan every this many steps, 0: never")
    add("--window", type=positive_int, default=None, help="steps each plan looks at (default: --interval)")
    add("--incremental", action="store_true",
        help=f"repair the placement at each rebalance instead of a fresh plan (--max-moves, default "
             f"{DEFAULT_MAX_MOVES})")
    add("--max-moves", type=non_negative_int, default=None,
        help="incremental repair with at most this many slot changes per layer (default: fresh)")
    add("--tokens", type=positive_int, default=None,
        help=f"tokens per step over the EP group, drawn from the load (default: a trace file of counts is used as "
             f"it is; generated traces and traces of rates, every layer summing to <= 1, draw {TOKENS_PER_RANK} "
             f"per rank)")
    add("--top-k", type=positive_int, default=None, help="experts per token (default: the preset's)")
    add("--policies", default=",".join(POLICIES), help="comma-separated replica policies")
    add("--expert-bytes", type=positive_int, default=None, help="bytes per expert copy (default: the preset's)")
    add("--initial", help="placement JSON in force at step 0 (default: planned on the first step)")
    add("--seed", type=non_negative_int, default=0)
    add("-o", "--out", default="epmoe-simulate",
        help="folder for simulate.json and simulate.png, or a .json path (the .png goes next to it)")
    parser.set_defaults(func=_run)
    return parser


def _check_options(args) -> None:
    """Option combinations that would do nothing are usage errors (docs/errors.md)."""
    from epmoe.cli import UsageError

    if args.strategy != "hierarchical":
        given = [name for name, value in (("--nodes", args.nodes), ("--groups", args.groups)) if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --strategy "
                             "hierarchical")
    if args.interval == 0:
        given = [name for name, value in (("--window", args.window), ("--incremental", args.incremental or None),
                                          ("--max-moves", args.max_moves)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} rebalancing: --interval 0 "
                             "never re-plans")


def _run(args) -> int:
    from epmoe._progress import Progress

    _check_options(args)
    trace = read_trace(args.trace) if args.trace is not None else None
    steps = args.steps if args.steps is not None else (200 if trace is None else trace.shape[0])
    progress = Progress(steps, "epmoe simulate", enabled=not getattr(args, "quiet", False))
    try:
        report = simulate(
            trace, preset=args.preset, num_steps=args.steps, num_ranks=args.ranks, num_redundant=args.redundant,
            num_nodes=1 if args.nodes is None else args.nodes, num_groups=args.groups, strategy=args.strategy,
            interval=args.interval,
            window=args.window, max_moves=args.max_moves, incremental=args.incremental, tokens_per_step=args.tokens,
            top_k=args.top_k, policies=[p.strip() for p in args.policies.split(",") if p.strip()],
            expert_bytes=args.expert_bytes, initial=_read_initial(args.initial) if args.initial else None,
            seed=args.seed, progress=progress.step)
    finally:
        progress.close()
    json_path, png_path = write_report(report, args.out)
    _print_summary(report, json_path, png_path)
    return 0


def _read_initial(path) -> Placement:
    path = Path(path)
    try:
        return Placement.load(path)
    except (ValueError, TypeError, KeyError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"--initial {path}: not a placement JSON ({str(exc).strip().splitlines()[0]})") from exc


def _print_summary(report: dict, json_path, png_path) -> None:
    cfg = report["config"]
    mode = "fresh" if cfg["max_moves"] is None else f"incremental (max_moves={cfg['max_moves']})"
    print(f"epmoe simulate: {cfg['preset'] or 'trace'}, {cfg['num_layers']} layers x {cfg['num_experts']} experts "
          f"(top-{cfg['top_k']}), EP{cfg['num_ranks']} with {cfg['num_slots']} slots, {report['steps']} steps, "
          f"{mode} rebalance every {cfg['interval']} steps")
    print(f"{'policy':10} {'realised mean':>14} {'worst layer':>12} {'predicted mean':>15}")
    for name, values in report["policies"].items():
        print(f"{name:10} {values['mean']:14.4f} {values['min']:12.4f} {np.mean(values['predicted']):15.4f}")
    if report["rebalances"]:
        copies = [r["copies"] for r in report["rebalances"]]
        gib = [r["bytes"] / 2**30 for r in report["rebalances"]]
        ms = [r["plan_ms"] for r in report["rebalances"]]
        print(f"rebalances: {len(copies)}, copies per rebalance {np.mean(copies):.0f} ({np.mean(gib):.1f} GiB), "
              f"planner {np.median(ms):.0f} ms (median)")
    print(f"report: {json_path}" + (f", plot: {png_path}" if png_path else " (matplotlib missing: no plot)"))


def main(argv=None) -> int:
    """Runs `epmoe simulate` with `argv` (without the program and subcommand names); returns the exit status."""
    from epmoe.cli import main as epmoe_main

    return epmoe_main(["simulate", *(sys.argv[1:] if argv is None else argv)])
