"""The Python steps of scripts/gpu_check.sh (see docs/gpu.md). Each subcommand prints what it found and exits
non-zero when a required item fails; `--dry-run` runs everything that needs no GPU.

  preflight OUT_ENV [--dry-run]     environment report (torch, GPU, CUDA, nvcc, cmake, headers, packages) -> file
  nccl OUT_JSON [--dry-run]         dispatch/combine over NCCL on 2 processes on GPU 0 when NCCL allows two ranks per
                                    device, else on a world of one; exact and capacity mode against the gloo path
  capture OUT_JSON [--dry-run]      CUDA-graph capture of one whole MoE layer forward in capacity mode (world of one)
  bench-args "SCRIPT ARGS"...       each benchmark run as `python SCRIPT ARGS` would run it, with PYTHONPATH unset
                                    and no GPU visible (a GPU benchmark then measures nothing): its argument parsing
                                    and imports; the script itself must put python/ on sys.path and import epmoe
                                    from this tree
  summary WORK OUT [--dry-run]      steps.tsv + logs -> summary.json, summary.txt (one screen), steps.log
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests" / "python"))  # ep_harness


# ---------------------------------------------------------------------------------------------------------------
# preflight


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


def preflight(out_env: str, dry_run: bool) -> int:
    lines, missing = [], []

    def item(name: str, value: str, ok: bool = True, required: bool = True) -> None:
        lines.append(f"{name:<22} {value}")
        if not ok and required:
            missing.append(name)

    item("python", f"{sys.executable} ({sys.version.split()[0]})")
    include = sysconfig.get_paths()["include"]
    item("python headers", include, (Path(include) / "Python.h").exists())
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report any import failure
        item("torch", f"import failed: {exc}", False)
        torch = None
    if torch is not None:
        item("torch", f"{torch.__version__} at {Path(torch.__file__).parent}")
        item("torch CUDA", str(torch.version.cuda), torch.version.cuda is not None)
        gpu_ok, gpu = False, "none"
        try:
            torch.cuda.init()
            if torch.cuda.device_count() > 0:
                props = torch.cuda.get_device_properties(0)
                gpu_ok = True
                gpu = (f"{torch.cuda.device_count()} x {props.name}, sm_{props.major}{props.minor}, "
                       f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        except Exception as exc:  # noqa: BLE001 - the reason is the report
            gpu = f"not usable: {type(exc).__name__}: {exc}"
        item("GPU", gpu, gpu_ok, required=not dry_run)
        try:
            item("NCCL (torch)", ".".join(map(str, torch.cuda.nccl.version())))
        except Exception as exc:  # noqa: BLE001
            item("NCCL (torch)", f"unavailable: {exc}", required=False)
    for module in ("numpy", "pytest"):
        try:
            mod = __import__(module)
            item(module, getattr(mod, "__version__", "?"))
        except ImportError as exc:
            item(module, f"missing: {exc}", False)
    # setup.py's setuptools reads pyproject.toml, whose SPDX `license` string needs setuptools >= 77.
    try:
        import setuptools

        major = int(re.match(r"\d+", setuptools.__version__).group())
        item("setuptools", f"{setuptools.__version__}" + ("" if major >= 77 else " (the build needs >= 77)"),
             major >= 77)  # fmt: skip
    except ImportError as exc:
        item("setuptools", f"missing: {exc}", False)
    home = os.environ.get("CUDA_HOME")
    nvcc = next((str(p) for p in ([Path(home) / "bin" / "nvcc"] if home else []) if p.exists()), None) or shutil.which(
        "nvcc")
    item("nvcc", f"{nvcc}: {_run([nvcc, '--version']).splitlines()[-1]}" if nvcc else "not found", nvcc is not None)
    cmake = shutil.which("cmake")
    item("cmake", f"{cmake}: {_run([cmake, '--version']).splitlines()[0]}" if cmake else "not found", cmake is not None)
    ninja = shutil.which("ninja")
    item("ninja", f"{ninja} {_run([ninja, '--version'])}" if ninja else "not found", ninja is not None)
    sanitizer = shutil.which("compute-sanitizer")
    item("compute-sanitizer", f"{sanitizer}: {_run([sanitizer, '--version']).splitlines()[-1]}" if sanitizer
         else "not found (the sanitizer steps will fail)", required=False)  # fmt: skip
    smi = shutil.which("nvidia-smi")
    if smi:
        item("nvidia-smi", _run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                 "--format=csv,noheader"]), required=False)  # fmt: skip
    system_gtest = Path("/usr/include/gtest/gtest.h").exists()
    source = os.environ.get("EPMOE_GTEST_SOURCE_DIR") or str(ROOT / "third_party" / "googletest-src")
    source_ok = (Path(source) / "googletest" / "src" / "gtest-all.cc").exists() or (
        Path(source) / "src" / "gtest-all.cc"
    ).exists()
    item("GoogleTest", "system package" if system_gtest else (f"source tree {source}" if source_ok else
         f"none (no libgtest-dev, no sources at {source}: run scripts/gpu_check.sh --prepare DIR; the C++ test "
         "steps will fail)"), required=False)  # fmt: skip
    item("cores", str(os.cpu_count()))
    item("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    text = "\n".join(lines) + "\n" + (f"MISSING: {', '.join(missing)}\n" if missing else "all required items found\n")
    Path(out_env).write_text(text)
    print(text, end="")
    return 1 if missing else 0


# ---------------------------------------------------------------------------------------------------------------
# NCCL dispatch/combine


def _ep_round_trip(rank: int, world: int, device: str, modes: list[str]) -> dict:
    """Dispatch + identity experts + combine in each mode on `device`, against the same on the CPU (gloo)."""
    import epmoe
    import torch

    ep = epmoe.EPGroup(timeout=12)  # a refused or hung NCCL init of two ranks on one device ends within the attempt
    gen = torch.Generator().manual_seed(100 + rank)
    num_tokens, hidden, num_experts, top_k = 96 + 16 * rank, 256, 8 * world, 4
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]).int()
    w = torch.rand(num_tokens, top_k, generator=gen)
    results = {}
    for mode in modes:
        kw = {"mode": mode, "capacity": 128} if mode == "capacity" else {}
        d_cpu = ep.dispatch(x, idx, w, num_experts, **kw)
        y_cpu = ep.combine(d_cpu.recv_x * 2, d_cpu.handle)
        d = ep.dispatch(x.to(device), idx.to(device), w.to(device), num_experts, **kw)
        y = ep.combine(d.recv_x * 2, d.handle)
        torch.cuda.synchronize()
        m = d_cpu.recv_x.shape[0]
        results[mode] = {
            "recv_rows_equal": bool(torch.equal(d.recv_x[:m].cpu(), d_cpu.recv_x)),
            "offsets_equal": bool(torch.equal(d.expert_offsets.cpu(), d_cpu.expert_offsets)),
            "combine_max_abs_diff": float((y.float().cpu() - y_cpu.float()).abs().max()),
        }
        d.handle.check()
    ep.synchronize()
    ep.destroy()
    return results


def nccl(out_json: str, dry_run: bool) -> int:
    import torch
    from ep_harness import run_ranks

    report: dict = {"dry_run": dry_run}
    if dry_run:
        report["plan"] = "2 processes on cuda:0 (fallback: world of one), modes exact and capacity"
        Path(out_json).write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
        return 0
    modes = ["exact", "capacity"]
    start = time.monotonic()
    # The two-rank attempt ends well inside the step's budget (40 s in gpu_check.sh), leaving the fallback its time.
    try:
        results = run_ranks(_ep_round_trip, 2, "cuda:0", modes, timeout=22)
        report.update(world=2, results=results)
    except AssertionError as exc:
        text = str(exc)
        reasons = re.findall(r"RuntimeError: ([^\n]*)", text) or [text[-300:]]
        report["two_ranks_per_device"] = "refused: " + reasons[-1]
        results = run_ranks(_ep_round_trip, 1, "cuda:0", modes, timeout=60)
        report.update(world=1, results=results)
    report["seconds"] = time.monotonic() - start
    report["torch_nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    ok = all(r["recv_rows_equal"] and r["offsets_equal"] and r["combine_max_abs_diff"] <= 1e-2
             for rank in report["results"].values() for r in rank.values())  # fmt: skip
    report["ok"] = ok
    Path(out_json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------------------
# CUDA-graph capture of a whole layer


def _capture_layer(rank: int, world: int) -> dict:
    import epmoe
    import torch

    cfg = epmoe.MoEConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=64, top_k=8, num_shared_experts=1,
                          dtype=torch.bfloat16, exchange_mode="capacity", capacity=1024, record_load=False)
    moe = epmoe.MoE(cfg).cuda().eval()
    x = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = moe(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            moe(x)
        end.record()
        end.synchronize()
        eager_us = start.elapsed_time(end) * 1e3 / 5
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = moe(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        max_diff = float((out.float() - eager.float()).abs().max())
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        replay_us = start.elapsed_time(end) * 1e3 / 20
    return {"tokens": 1024, "eager_us": eager_us, "replay_us": replay_us, "max_abs_diff_vs_eager": max_diff,
            "finite": bool(out.isfinite().all())}


def capture(out_json: str, dry_run: bool) -> int:
    from ep_harness import run_ranks

    if dry_run:
        report = {"dry_run": True, "plan": "MoE(H=2048, I=768, E=64, k=8, capacity mode) forward captured, replayed"}
    else:
        report = run_ranks(_capture_layer, 1, timeout=120)[0]
        report["ok"] = report["finite"] and report["max_abs_diff_vs_eager"] <= 5e-2
    Path(out_json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if report.get("ok", dry_run) else 1


# ---------------------------------------------------------------------------------------------------------------
# benchmark arguments and imports

# `python SCRIPT ARGS` without the interpreter's own path setup: sys.path[0] is the script's folder, as for a script
# run by path (so its sibling modules import), and nothing else of this checkout.
_BENCH_PROBE = """
import os, runpy, sys
root, path = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(path))
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
import epmoe
assert epmoe.__file__.startswith(root + "/python/"), f"{path} imported epmoe from {epmoe.__file__}"
print(f"{' '.join(sys.argv)}: arguments and imports ok (epmoe from {epmoe.__file__})")
"""


def bench_args(commands: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # measures nothing, also where a GPU is present
    failed = 0
    for command in commands:
        proc = subprocess.run([sys.executable, "-c", _BENCH_PROBE, str(ROOT), *shlex.split(command)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
        print(proc.stdout[-2000:] + proc.stderr[-4000:], end="")
        failed += proc.returncode != 0
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# summary


def _figures(name: str, log: str, work: Path, out: Path) -> dict:
    """Key figures of a step, read off its log or its JSON."""
    fig: dict = {}
    if name == "preflight" and (out / "env.txt").exists():
        for line in (out / "env.txt").read_text().splitlines():
            key, value = line[:22].strip(), line[22:].strip()  # the report's "name (22 columns) value" lines
            if line.startswith("MISSING:"):
                fig["missing"] = line.split(":", 1)[1].strip()
            elif key in ("torch", "GPU"):
                fig[key.lower()] = value.split(" at ")[0][:70]
    pytest_lines = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error).* in [\d.]+s", line)]
    for count, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)",
                                  pytest_lines[-1] if pytest_lines else ""):  # fmt: skip
        fig[what] = int(count)
    if name in ("cpp_tests", "memcheck_cpp", "racecheck_cpp"):
        for what in ("PASSED", "SKIPPED", "FAILED"):
            hit = re.search(rf"\[\s+{what}\s+\] (\d+) test", log)
            if hit:
                fig[what.lower()] = int(hit.group(1))
    hit = re.search(r"ERROR SUMMARY: (\d+) error", log)
    if hit:
        fig["sanitizer_errors"] = int(hit.group(1))
    hit = re.search(r"RACECHECK SUMMARY: (\d+) hazard", log)
    if hit:
        fig["hazards"] = int(hit.group(1))
    hit = re.search(r"(\d+)/(\d+) tests collected", log)
    if hit:
        fig["collected"] = int(hit.group(1))
    for json_name in {"nccl": "nccl.json", "capture": "capture.json", "bench_experts": "bench_experts_gpu.json",
                      "bench_route": "bench_route.json"}.get(name, "").split():  # fmt: skip
        path = out / json_name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if name == "nccl":
            fig.update({k: data[k] for k in ("world", "ok", "two_ranks_per_device") if k in data})
        elif name == "capture":
            fig.update({k: data[k] for k in ("eager_us", "replay_us", "max_abs_diff_vs_eager") if k in data})
        elif name == "bench_experts" and "ceilings" in data:
            fig.update({f"ceiling_{k}": round(v, 1) for k, v in data["ceilings"].items()})
            for row in data.get("results", []):
                if row["op"] == "grouped_swiglu" and row["rows_per_expert"] == 512:
                    fig[f"swiglu_{row['shape']}_tflops"] = round(row["tflops"], 1)
                    if "speedup_vs_grouped_mm" in row:
                        fig[f"swiglu_{row['shape']}_vs_grouped_mm"] = round(row["speedup_vs_grouped_mm"], 2)
        elif name == "bench_route":
            for row in data.get("gpu", []):
                fig[f"{row['shape']}_T{row['num_tokens']}_us"] = round(row["kernel_us"], 2)
    return fig


def summary(work: str, out: str, dry_run: bool) -> int:
    work_dir, out_dir = Path(work), Path(out)
    steps = []
    for line in (work_dir / "steps.tsv").read_text().splitlines():
        name, status, seconds, budget, reason = (line.split("\t") + [""] * 5)[:5]
        log_path = work_dir / f"{name}.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        steps.append({"name": name, "status": status, "seconds": int(seconds), "budget_s": int(budget),
                      "figures": _figures(name, log, work_dir, out_dir), "reason": reason})  # fmt: skip
    failed = [s["name"] for s in steps if s["status"] not in ("passed", "skipped")]
    report = {"mode": "dry-run" if dry_run else "gpu", "ok": not failed, "failed": failed,
              "budget_s": sum(s["budget_s"] for s in steps if s["status"] != "skipped"),
              "seconds": sum(s["seconds"] for s in steps),
              "steps": steps}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1))
    rows = [f"epmoe GPU check ({report['mode']}): {'OK' if report['ok'] else 'FAILED: ' + ', '.join(failed)}",
            f"{'step':<18}{'status':<10}{'s':>5}{'/budget':>8}  figures / reason"]  # fmt: skip
    for s in steps:
        figures = ", ".join(f"{k}={v}" for k, v in s["figures"].items())
        rows.append(f"{s['name']:<18}{s['status']:<10}{s['seconds']:>5}{s['budget_s']:>8}  "
                    f"{(figures + ' ' + s['reason']).strip()[:160]}")  # fmt: skip
    rows.append(f"total {report['seconds']} s of a {report['budget_s']} s budget; files in {out_dir}")
    text = "\n".join(rows) + "\n"
    (out_dir / "summary.txt").write_text(text)
    # steps.log: the tail of every step's log (the whole log stays small enough to come back)
    with open(out_dir / "steps.log", "w") as f:
        for s in steps:
            log_path = work_dir / f"{s['name']}.log"
            body = log_path.read_text(errors="replace") if log_path.exists() else ""
            f.write(f"===== {s['name']}: {s['status']} ({s['seconds']} s) {s['reason']}\n{body[-60000:]}\n")
    print(text, end="")
    return 0 if report["ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["preflight", "nccl", "capture", "bench-args", "summary"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--dry-run", action="store_true", help="everything that needs no GPU")
    args = parser.parse_args()
    if args.command == "preflight":
        return preflight(args.paths[0], args.dry_run)
    if args.command == "nccl":
        return nccl(args.paths[0], args.dry_run)
    if args.command == "capture":
        return capture(args.paths[0], args.dry_run)
    if args.command == "bench-args":
        return bench_args(args.paths)
    return summary(args.paths[0], args.paths[1], args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
