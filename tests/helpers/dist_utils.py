"""Run a function on N gloo ranks on CPU, each in its own fresh Python process.

One call starts a group of processes, runs ``fn(*args)`` on every rank inside an initialised gloo
process group and returns what each rank returned. Process start-up dominates on small machines
(importing torch takes seconds per process), so tests should make one call run several checks
rather than start a group per check.

The ranks are plain subprocesses (this file run as a script), not ``multiprocessing`` children:
``multiprocessing``'s spawn start method also starts a resource-tracker process that outlives the
call, which the suite's leak check would rightly flag.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Seconds the other ranks get to finish after one failed: a rank blocked in a collective with a
# dead peer never returns on its own.
_GRACE_AFTER_FAILURE = 10.0
# Seconds hung ranks get to write their stacks (SIGUSR1 -> faulthandler) before they are killed.
_DUMP_WAIT = 2.0
# Lines of each failed rank's output shown in the error.
_LOG_TAIL = 60


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung; the message holds every failed rank's traceback or stack dump."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks and return each rank's result, by rank.

    ``fn`` must be importable by name (defined at module level) and ``args`` and the results picklable.
    Inside ``fn`` the default process group is initialised (gloo, CPU, one intra-op thread) and the
    usual variables are set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); ``torch.distributed.get_rank()`` says which rank runs. The group is destroyed
    after ``fn`` returns, and every process is gone when this function returns.

    Args:
        fn: the function every rank runs.
        world_size: how many processes to start.
        *args: positional arguments passed to ``fn`` on every rank.
        timeout: seconds for the whole group, start-up included; on expiry every rank still running
            dumps its stacks, is killed, and the error shows the dumps.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        DistributedTestError: a rank raised (the message has its traceback and every other failed
            rank's), a rank died without reporting, or the group ran past ``timeout``.
    """
    with tempfile.TemporaryDirectory(prefix="parti-dist-") as tmp:
        job = Path(tmp)
        # Why apart from the pickle: unpickling `fn` imports its module, which needs this sys.path first.
        (job / "sys_path.json").write_text(json.dumps(sys.path))
        (job / "job.pkl").write_bytes(pickle.dumps((fn, args)))
        port = free_port()
        procs = [_start(job, rank, world_size, port) for rank in range(world_size)]
        try:
            hung = _wait(procs, timeout)
            _dump_stacks(procs, hung)
        finally:
            _kill(procs)
        outcomes = [_outcome(job, rank, procs[rank], rank in hung, timeout) for rank in range(world_size)]
    return _unpack(outcomes)


def _start(job: Path, rank: int, world_size: int, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        # Why one thread: N ranks on a couple of cores with default intra-op threads oversubscribe badly.
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    with open(job / f"rank{rank}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, __file__, str(job), str(rank)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # so that killing its process group leaves nothing behind
        )


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every rank to exit; return the ranks still running at the deadline.

    A rank exits with a non-zero code when it failed; the others then get a short grace.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        if all(code is not None for code in codes):
            return []
        if any(code not in (None, 0) for code in codes):
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE)
        time.sleep(0.1)
    return [rank for rank, proc in enumerate(procs) if proc.poll() is None]


def _dump_stacks(procs: list[subprocess.Popen], ranks: list[int]) -> None:
    for rank in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[rank].pid, signal.SIGUSR1)
    if ranks:
        time.sleep(_DUMP_WAIT)


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def _outcome(job: Path, rank: int, proc: subprocess.Popen, hung: bool, timeout: float) -> tuple[str, Any]:
    log = (job / f"rank{rank}.log").read_text(errors="replace").splitlines()
    tail = "\n".join(log[-_LOG_TAIL:]) or "(no output)"
    result = job / f"rank{rank}.result"
    if result.exists():  # even from a rank that then hung in teardown: its result is what counts
        status, payload = pickle.loads(result.read_bytes())
        return (status, f"{payload}\noutput:\n{tail}") if status == "error" else (status, payload)
    if hung:
        return "hung", f"still running at timeout={timeout}s or after another rank failed; stacks and output:\n{tail}"
    return "died", f"exited with code {proc.returncode} without reporting; output:\n{tail}"


def _unpack(outcomes: list[tuple[str, Any]]) -> list[Any]:
    failures = [(rank, status, payload) for rank, (status, payload) in enumerate(outcomes) if status != "ok"]
    if not failures:
        return [payload for _, payload in outcomes]
    sections = [f"----- rank {rank}: {status} -----\n{payload}" for rank, status, payload in failures]
    raise DistributedTestError(f"{len(failures)} of {len(outcomes)} rank(s) failed:\n" + "\n".join(sections))


# ----------------------------------------------------------------------------------- rank process


def _rank_main(job: Path, rank: int) -> int:
    import faulthandler

    # Stacks of every thread go to this rank's log when the parent decides the rank hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        sys.path[:] = json.loads((job / "sys_path.json").read_text())
        fn, args = pickle.loads((job / "job.pkl").read_bytes())
        _init_group()
        outcome: tuple[str, Any] = ("ok", fn(*args))
    except BaseException:
        outcome = ("error", traceback.format_exc())
    # The outcome is written before the group is torn down, so a teardown that blocks on a dead peer
    # cannot swallow the traceback.
    _write_outcome(job, rank, outcome)
    _destroy_group()
    return 0 if outcome[0] == "ok" else 1


def _init_group() -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _write_outcome(job: Path, rank: int, outcome: tuple[str, Any]) -> None:
    try:
        data = pickle.dumps(outcome)
    except Exception:
        data = pickle.dumps(("error", f"the result of rank {rank} cannot be pickled:\n{traceback.format_exc()}"))
    # Written whole, then renamed: the parent never reads half a result.
    partial = job / f"rank{rank}.result.partial"
    partial.write_bytes(data)
    partial.rename(job / f"rank{rank}.result")


if __name__ == "__main__":
    sys.exit(_rank_main(Path(sys.argv[1]), int(sys.argv[2])))
