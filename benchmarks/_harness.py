"""The launcher side and rank side that the multi-process CPU benchmarks share.

Why it exists: each of those benchmarks runs every mode it compares in its own fresh set of gloo
processes (so that peak resident memory is per mode), one process per rank, each writing its figures
to ``<out>/<name>-<rank>.json``. Picking a port, the ranks' environment, pinning, waiting with a
timeout, killing what is left, summarising a failed rank's log and leaving a rank without hanging
were written again in every such script; they live here once, so each script keeps only what it
measures and prints. Imported as ``_harness``: a script run as ``python benchmarks/<script>.py``
has ``benchmarks/`` on its path, and so do the ranks it re-runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2


def free_port() -> int:
    """A TCP port free on this host now, for one launch's rendezvous (``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """One rank's environment: the rendezvous, one OpenMP thread, this repository importable, then ``extra``."""
    return {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def worker_rank(pin: bool) -> int:
    """This rank's number (``RANK``); with ``pin``, first pins the process to its own core as ``PartiAccelerator``
    pins each rank. Call it before importing torch, so that torch's threads start on that core."""
    rank = int(os.environ["RANK"])
    if pin:
        os.sched_setaffinity(0, {rank % (os.cpu_count() or 1)})
    return rank


def log_summary(path: Path, rank: int) -> str:
    """A failed rank's log: the traceback's frames in this repository (where it failed), then its last 40 lines."""
    lines = path.read_text().splitlines() if path.exists() else []
    ours = [line.strip() for line in lines
            if line.strip().startswith('File "') and str(REPO) in line and f"{os.sep}.venv{os.sep}" not in line]
    return (f"--- rank {rank}: frames in this repository, innermost last\n" + "\n".join(ours[-12:])
            + f"\n--- rank {rank} log (last 40 lines)\n" + "\n".join(lines[-40:]))


def launch_ranks(
    command: list[str],
    *,
    name: str,
    out: Path,
    world: int,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    mark_failed: bool = True,
) -> list[dict[str, Any]] | str:
    """Run ``command`` once per rank and return every rank's ``<out>/<name>-<rank>.json``, or why it failed.

    Each rank's output goes to ``<out>/<name>-<rank>.log``; ``timeout`` (seconds) is for the whole launch,
    after which every rank still running is killed. The failure text carries each rank's ``log_summary``.
    A line ``[<name>] <seconds> s`` goes to stderr (with `` FAILED`` on a failure when ``mark_failed``).
    """
    port = free_port()
    procs = []
    logs = []
    for rank in range(world):
        log = open(out / f"{name}-{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        rank_environment = rank_env(rank, world, port, **(env or {}))
        procs.append(subprocess.Popen(command, env=rank_environment, stdout=log, stderr=subprocess.STDOUT, cwd=cwd))
    started = time.perf_counter()
    failure = ""
    try:
        for rank, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                failure = f"{name}: rank {rank} still running after {timeout:.0f} s"
                break
            if code:
                failure = f"{name}: rank {rank} exited with code {code}"
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    flag = " FAILED" if failure and mark_failed else ""
    print(f"[{name}] {time.perf_counter() - started:.0f} s{flag}", file=sys.stderr, flush=True)
    if failure:
        tails = [log_summary(out / f"{name}-{r}.log", r) for r in range(world)]
        return failure + "\n" + "\n".join(tails)
    return [json.loads((out / f"{name}-{rank}.json").read_text()) for rank in range(world)]


def run_worker(worker: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a rank's body; on any error print the traceback and leave at once, not waiting on a stuck peer."""
    try:
        worker(args)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait on a peer stuck in a collective


def finish_worker(path: Path, result: dict[str, Any]) -> NoReturn:
    """Write this rank's result, wait until every rank has written its own, and leave the process."""
    import torch.distributed as dist

    path.write_text(json.dumps(result))
    dist.barrier()
    # Not destroy_process_group: a rank was seen to hang in it (gloo, torch 2.13) after its peer had left.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ratio(value: float, base: float | None) -> str:
    """``value / base`` for a table cell, or ``-`` where there is no base (its mode failed or did not run)."""
    return f"{value / base:.2f}" if base else "-"


def table_head(*columns: str) -> list[str]:
    """A Markdown table's header row and its separator row."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
