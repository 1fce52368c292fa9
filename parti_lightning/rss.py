"""A process's peak resident memory, measured so that a parent's memory is not counted.

Why not ``getrusage(RUSAGE_SELF).ru_maxrss`` alone: Linux carries a process's peak across ``exec`` from the
forked copy of its parent, so a rank started by a large process (a launcher, a benchmark driver, a rank that
had already built its model) reports at least its parent's resident memory at the fork (a 13 MiB child of a
500 MiB parent reports 514 MiB). ``VmHWM`` in ``/proc/self/status`` is the peak of the process's own address
space, which ``exec`` starts anew.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``VmHWM`` on Linux, ``ru_maxrss`` elsewhere)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux and the BSDs kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
