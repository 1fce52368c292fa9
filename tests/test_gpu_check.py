"""The prepared GPU check runs its CPU version (``benchmarks/gpu_check.py --cpu``) with every check ok.

The script is meant for a CUDA machine lent now and then for a few minutes: this keeps it working in
between. Each line it prints for a check is ``NAME  ok``, ``NAME  FAILED`` or ``NAME  skipped (reason)``.
"""

from __future__ import annotations

import re

import pytest

from launch import check, run_script

CHECK_LINE = re.compile(r"^(?P<name>\S.*?)\s+(?P<status>ok|FAILED|skipped \(.+?\))(?:\s{2}(?P<detail>.*))?$")
SUMMARY = re.compile(r"^summary: (?P<ok>\d+) ok, (?P<failed>\d+) FAILED, (?P<skipped>\d+) skipped")
# Every kind of check must have run, not just printed nothing.
EXPECTED = [
    "parity ddp 32-true", "parity zero1 32-true", "parity zero2 32-true", "parity zero3 32-true",
    "parity ddp bf16-mixed", "parity zero3 bf16-mixed", "sync_batchnorm", "checkpoint cpu zero3 -> cpu ddp",
    "checkpoint cpu zero2 -> cpu zero3", "plan=auto", "throughput parti-ddp vs Lightning ddp",
    "parity tensor 32-true", "parity pipeline 32-true",
]


@pytest.mark.timeout(400)
def test_gpu_check_cpu_version_passes_every_check() -> None:
    output = check(run_script(["benchmarks/gpu_check.py", "--cpu"], timeout=360))
    lines = [m for m in map(CHECK_LINE.match, output.splitlines()) if m and not m["name"].startswith("#")]
    statuses = {m["name"]: m["status"] for m in lines}
    for name in EXPECTED:
        assert statuses.get(name) == "ok", f"{name}: {statuses.get(name)}\n{output}"
    for name, status in statuses.items():
        assert status == "ok" or re.fullmatch(r"skipped \(.{10,}\)", status), f"{name}: {status}\n{output}"
    summary = next((SUMMARY.match(line) for line in output.splitlines() if SUMMARY.match(line)), None)
    assert summary is not None, output
    assert int(summary["failed"]) == 0
    # The summary counts exactly the check lines: none went missing from the parse.
    assert int(summary["ok"]) + int(summary["skipped"]) == len(statuses), output
