"""Run a script as a multi-process job with a hard timeout; on failure show every rank's output."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(args: list[str], timeout: float, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` in its own session; kill the whole process tree if it outlives ``timeout``.

    Lightning's launcher re-runs the script for ranks > 0 as children of rank 0, so their output
    lands in the same pipes and a failure message shows every rank's traceback.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        full_env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"`{' '.join(args)}` did not finish in {timeout:.0f}s; output:\n{out}") from None
    finally:
        survivors = _session_members(proc.pid, grace=5.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the job left behind
    # Output ends only when every process holding the pipe has exited, so survivors here are
    # processes that closed their output and lingered: a leak the caller should fail on.
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "\n".join(map(str, survivors)))


def _session_members(sid: int, grace: float) -> list[int]:
    """Live processes of session ``sid``, after giving ones already killed ``grace`` seconds to go."""
    deadline = time.monotonic() + grace
    while True:
        members = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                    members.append(process.pid)
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.1)


def check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit code {result.returncode}; output of every rank:\n{result.stdout}"
    assert not result.stderr, f"processes left running after the job ended: {result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class Job:
    """One launch for :func:`run_scripts`: ``python *args`` in ``cwd``, ``env`` added; ``processes`` processes."""

    args: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    processes: int = 2


@dataclass(frozen=True)
class Launch:
    """A finished :func:`run_script` job, with when it started and ended (``time.time()``)."""

    result: subprocess.CompletedProcess[str]
    started: float
    ended: float

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


def run_scripts(jobs: Mapping[Hashable, Job], timeout: float, at_once: int = 2) -> dict[Hashable, Launch]:
    """Run independent jobs (each as :func:`run_script`, with the same hard timeout) ``at_once`` at a time.

    Why: a launched job is mostly interpreter start-up, and its ranks start one after another (rank 0
    imports, then launches the others), so one job keeps about one core busy; two at a time use both cores
    of a small machine and nearly halve the wall time (measured: two 2-rank failing runs, 28.8 s one after
    the other, 15.3 s side by side). A job of more than ``at_once`` processes runs alone, after the others
    (which have warmed the caches a first run fills), so that timing bounds on it keep their meaning.
    """
    alone = [key for key, job in jobs.items() if job.processes > at_once]
    paired = [key for key in jobs if key not in alone]

    def launch(key: Hashable) -> Launch:
        job, started = jobs[key], time.time()
        try:
            result = run_script(list(job.args), timeout=timeout, env=dict(job.env or {}), cwd=job.cwd)
        except AssertionError as timed_out:  # killed at the timeout: this job's test fails, not its neighbours'
            result = subprocess.CompletedProcess(list(job.args), -signal.SIGKILL, str(timed_out), str(timed_out))
        return Launch(result, started, time.time())

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        done = dict(zip(paired, pool.map(launch, paired), strict=True))
    done.update({key: launch(key) for key in alone})
    return done


def selected_tests(request: pytest.FixtureRequest) -> list[pytest.Item]:
    """The tests of ``request``'s module that this session runs (after ``-k`` and the like)."""
    return [item for item in request.session.items if item.module is request.module]
