"""Run a function on N gloo ranks on CPU, each in its own spawned process.

One call starts a fresh group of processes, runs ``fn(*args)`` on every rank inside an initialised
gloo process group and returns what each rank returned. Process start-up dominates on small
machines (importing torch takes seconds per process), so tests should make one call run several
checks rather than spawn once per check.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import queue
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Seconds the parent waits, after a rank failed, for the other ranks to report before killing them.
# A rank blocked in a collective with a dead peer never returns on its own.
_GRACE_AFTER_FAILURE = 10.0
# Seconds given to hung ranks to dump their stacks (SIGUSR1 -> faulthandler) before they are killed.
_DUMP_WAIT = 2.0


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung; the message holds every rank's traceback or stack dump."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks and return each rank's result, by rank.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level), and so must the results.
    Inside ``fn`` the default process group is initialised (gloo, CPU, one thread per rank) and the
    usual environment is set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); ``torch.distributed.get_rank()`` says which rank runs.

    Args:
        fn: the function every rank runs.
        world_size: how many processes to start.
        *args: positional arguments passed to ``fn`` on every rank.
        timeout: seconds for the whole group, start-up included; on expiry every rank's stack is
            dumped, every child is killed and the error shows the dumps.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        DistributedTestError: a rank raised (its traceback and any other rank's are in the message),
            a rank died without reporting, or the group ran past ``timeout``.
    """
    ctx = mp.get_context("spawn")
    results: queue.Queue = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="parti-dist-") as tmp:
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, args, rank, world_size, port, results, str(Path(tmp) / f"stack-{rank}.txt")),
                name=f"rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            outcomes, hung = _collect(procs, results, timeout)
            if hung:
                _dump_stacks(procs, hung)
                outcomes.update({rank: ("hung", _read_stack(tmp, rank)) for rank in hung})
        finally:
            _terminate(procs)
            results.close()
            results.join_thread()
    return _unpack(outcomes, world_size, timeout)


def _worker(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    world_size: int,
    port: int,
    results: queue.Queue,
    stack_file: str,
) -> None:
    # faulthandler needs a file that outlives the Python frames it describes; the parent reads it
    # after sending SIGUSR1 to a rank that has not reported in time.
    with open(stack_file, "w") as stack_out:
        faulthandler.register(signal.SIGUSR1, file=stack_out, all_threads=True)
        try:
            results.put((rank, "ok", _run_rank(fn, args, rank, world_size, port)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))


def _run_rank(fn: Callable[..., Any], args: tuple[Any, ...], rank: int, world_size: int, port: int) -> Any:
    import torch
    import torch.distributed as dist

    # Why one thread: N ranks on 2 cores with default intra-op threads oversubscribe badly.
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def _collect(
    procs: list[mp.Process], results: queue.Queue, timeout: float
) -> tuple[dict[int, tuple[str, Any]], list[int]]:
    """Read outcomes until every rank reported, one died silently, or time ran out; return the hung ranks."""
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(procs):
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            rank, status, payload = results.get(timeout=min(0.5, deadline - now))
            outcomes[rank] = (status, payload)
            if status == "error":
                # Peers of a failed rank usually block in a collective: give them a short grace.
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE)
        except queue.Empty:
            for rank, proc in enumerate(procs):
                if rank not in outcomes and proc.exitcode is not None:
                    outcomes[rank] = ("died", f"process exited with code {proc.exitcode} without reporting")
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE)
    hung = [rank for rank in range(len(procs)) if rank not in outcomes]
    return outcomes, hung


def _dump_stacks(procs: list[mp.Process], ranks: list[int]) -> None:
    for rank in ranks:
        if procs[rank].pid is not None and procs[rank].is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(_DUMP_WAIT)


def _read_stack(tmp: str, rank: int) -> str:
    path = Path(tmp) / f"stack-{rank}.txt"
    text = path.read_text() if path.exists() else ""
    return text.strip() or "(no stack dump: the rank did not start Python or did not answer SIGUSR1)"


def _terminate(procs: list[mp.Process]) -> None:
    for proc in procs:
        proc.join(timeout=5)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _unpack(outcomes: dict[int, tuple[str, Any]], world_size: int, timeout: float) -> list[Any]:
    if all(status == "ok" for status, _ in outcomes.values()) and len(outcomes) == world_size:
        return [outcomes[rank][1] for rank in range(world_size)]
    sections = []
    for rank in range(world_size):
        status, payload = outcomes.get(rank, ("hung", "(no report)"))
        if status == "ok":
            continue
        title = f"rank {rank}: {status}" + (f" (group ran past timeout={timeout}s; stack dump)" if status == "hung" else "")
        sections.append(f"----- {title} -----\n{payload}")
    raise DistributedTestError(f"{len(sections)} of {world_size} rank(s) failed:\n" + "\n".join(sections))
