"""Run a script as a multi-process job with a hard timeout; on failure show every rank's output."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

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
