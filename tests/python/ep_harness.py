"""Runs a function on N gloo ranks in fresh processes: free port, per-run timeout, worker exceptions fail the test."""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, pg_timeout):
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        import datetime

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world_size, *args)
        # By value: tensors put on the queue as is travel as shared-memory handles that the parent can only open
        # while this process is alive, and it may exit first.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - any failure of a worker fails the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 90.0, pg_timeout: float = 30.0, allow_exit=()):
    """Runs fn(rank, world_size, *args) on world_size ranks; returns {rank: result}. Ranks in allow_exit may die
    without reporting."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, pg_timeout), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    expected = world_size - len(allow_exit)
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < expected:
        remaining = deadline - time.monotonic()
        try:
            rank, status, payload = queue.get(timeout=max(remaining, 0.1))
        except queue_mod.Empty:
            break
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("worker failed:\n" + "\n".join(errors))
    missing = [r for r in range(world_size) if r not in results and r not in allow_exit]
    if missing:
        raise AssertionError(f"ranks {missing} did not finish within {timeout} s (hang?)")
    return results
