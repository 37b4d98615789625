"""Timing and ceilings shared by the CPU benchmarks (bench_experts, bench_layer, bench_route).

- `interleaved`: samples of several callables, alternating them within each round, so that machine load hits them
  alike; ratios are taken per round and their median reported (`median_ratio`). The clock is wall time, or with
  `--timer cpu` the process's CPU time: meant with `--threads 1`, it counts only the time the benchmark ran, so a
  busy machine (other processes on the cores) changes it little.
- `run_gloo_ranks`: a multi-rank benchmark as real processes over gloo on localhost (a rank's exception fails it).
- `cpu_peaks`, `read_bandwidth`: the physical limits of the machine measured in the same run: the fp32 FMA and bf16
  dot-product peaks of the intra-op threads (`torch.ops.epmoe.cpu_peak_gflops`) and the memory read bandwidth
  `x.sum()` shows on a tensor larger than the last-level cache.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import queue as queue_module
import socket
import statistics
import time

import torch
import torch.distributed as dist

_clock = time.perf_counter


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="wall time (default), or process CPU time (use with --threads 1 on a busy machine)")


def apply_timing_args(args: argparse.Namespace) -> None:
    global _clock
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _clock = time.process_time if args.timer == "cpu" else time.perf_counter


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """{name: [seconds per round]}: each round calls every fn once, in order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = _clock()
            fn()
            samples[name].append(_clock() - t0)
    return samples


def median_ms(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def median_ratio(samples: dict[str, list[float]], baselines: list[str], target: str) -> float:
    """Median over rounds of (fastest baseline of the round) / target: > 1 means target is faster."""
    ratios = [min(samples[b][i] for b in baselines) / samples[target][i] for i in range(len(samples[target]))]
    return statistics.median(ratios)


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysconf), 64 MB when unknown."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size > 0:
            return size
    return 64 << 20


_bandwidth_cache: dict[tuple, float] = {}


def read_bandwidth(num_bytes: int, rounds: int) -> float:
    """GB/s of `x.sum()` over an fp32 tensor of at least num_bytes and at least twice the last-level cache (so it
    reads memory, as weights that other implementations' runs evicted do; capped at 2 GB). Memoised per size."""
    nbytes = min(max(num_bytes, 2 * last_level_cache_bytes()), 2 << 30)
    key = (nbytes, torch.get_num_threads(), _clock)
    if key not in _bandwidth_cache:
        x = torch.ones(max(nbytes // 4, 1024), dtype=torch.float32)
        seconds = statistics.median(interleaved({"sum": x.sum}, rounds)["sum"])
        _bandwidth_cache[key] = x.numel() * 4 / seconds / 1e9
    return _bandwidth_cache[key]


def cpu_peaks() -> dict[str, float | None]:
    """GFLOP/s of the fp32 FMA and bf16 dot-product loops on all intra-op threads; None where unsupported."""
    peaks = {}
    for kind in ("fp32_fma", "bf16_dot"):
        try:
            peaks[kind] = max(torch.ops.epmoe.cpu_peak_gflops(kind, 0.1) for _ in range(3))
        except RuntimeError:
            peaks[kind] = None
    return peaks


def cpu_description() -> dict:
    """CPU model, the ISA flags the kernels dispatch on, threads, and the forced GEMM backend if any."""
    flags, model = set(), platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {
        "model": model,
        "isa": isa,
        "threads": torch.get_num_threads(),
        "timer": "cpu" if _clock is time.process_time else "wall",
        "cpu_gemm": os.environ.get("EPMOE_CPU_GEMM", "auto"),
    }


def format_peaks(peaks: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.0f} GFLOP/s"

    return f"fp32 FMA peak {fmt(peaks['fp32_fma'])}, bf16 dot-product peak {fmt(peaks['bf16_dot'])}"


def _gloo_rank(fn, rank: int, world: int, port: int, args: tuple, timeout_s: float, queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        queue.put((rank, {"result": fn(rank, world, *args)}))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, {"error": repr(exc)}))


def run_gloo_ranks(fn, world: int, *args, timeout_s: float = 600) -> list:
    """[fn(rank, world, *args) for each rank], each rank a spawned process in one gloo group on a free port (fn: a
    module-level function; its collectives time out after timeout_s). Raises if any rank raised, died without a result,
    or gave none within timeout_s + 60 s."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_gloo_rank, args=(fn, r, world, port, args, timeout_s, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout_s + 60
    try:
        while len(results) < world:
            try:
                rank, result = queue.get(timeout=1.0)
                results[rank] = result
                continue
            except queue_module.Empty:
                pass
            # A rank that died without reporting (killed, or failed before its first line ran) fails the run now,
            # not after the timeout.
            for r, p in enumerate(procs):
                if r not in results and p.exitcode not in (None, 0):
                    raise RuntimeError(f"{world} gloo ranks failed: rank {r} exited with code {p.exitcode} before "
                                       "reporting a result")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - set(results))
                raise TimeoutError(f"{world} gloo ranks: no result from rank(s) {missing} after {timeout_s + 60:.0f} s")
    finally:
        for p in procs:  # after a failure the other ranks would wait on their collectives' timeout: stop them
            p.join(timeout=30 if len(results) == world else 0)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {res['error']}" for r, res in sorted(results.items()) if "error" in res]
    if errors:
        raise RuntimeError(f"{world} gloo ranks failed: {'; '.join(errors)}")
    return [results[r]["result"] for r in range(world)]
