from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import psutil
import pytest

# The launched scripts and the models and harnesses tests share live in helpers/ (test_*.py stay at the top).
HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
sys.path.insert(0, HELPERS)

_LEAKY_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")


@pytest.fixture(autouse=True, scope="session")
def own_hardware_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """plan="auto" (the default) caches its measurement of the machine: in the session's folder, not the user's.

    The first run that plans measures the machine once (about 10 s), as on a fresh install, whatever
    an earlier session left in ~/.cache.
    """
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Each test leaves no child process, no process group and no distributed env var behind."""
    env = {k: os.environ.get(k) for k in _LEAKY_ENV}
    yield
    import torch.distributed as dist

    leaked_group = dist.is_available() and dist.is_initialized()
    if leaked_group:
        dist.destroy_process_group()
    children = [c for c in psutil.Process().children(recursive=True) if not _is_benign(c)]
    for child in children:
        child.kill()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    assert not leaked_group, "a test left a process group initialized"
    assert not children, f"a test left child processes running: {[c.pid for c in children]}"


def _is_benign(process: psutil.Process) -> bool:
    """Exited-but-unreaped children, and Python's own multiprocessing resource tracker (lives with us)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE or "multiprocessing.resource_tracker" in " ".join(
            process.cmdline()
        )
    except psutil.NoSuchProcess:
        return True
