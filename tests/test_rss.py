"""The peak resident memory a rank reports is its own, not its parent's (tier 1: one small subprocess)."""

from __future__ import annotations

import subprocess
import sys

from parti_lightning import rss
from parti_lightning.rss import peak_rss_bytes

MIB = 2**20


def test_a_child_of_a_large_process_reports_its_own_peak() -> None:
    held = bytearray(300 * MIB)
    held[:: 4096] = b"\x01" * (len(held) // 4096)  # resident: every page touched
    assert peak_rss_bytes() >= 300 * MIB
    # The module alone, by path: importing the package would bring torch in, hundreds of MiB of its own.
    code = f"import runpy; print(runpy.run_path({rss.__file__!r})['peak_rss_bytes']())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    # A bare interpreter: far below the parent's 300 MiB, which ru_maxrss would have carried over exec.
    assert 0 < child < 150 * MIB
    del held
