"""Tier 3 at 4 ranks: tensor × data and pipeline × data through the Trainer compute what one process computes.

One launch of 4 processes trains both (see compose_run.py); each test compares one of them with a single
process over the same global batches (two data-parallel replicas' worth) from the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compose_run import COMPOSED

from launch import check, run_script
from scenarios import Scenario, run_reference

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compose")
    check(run_script(["tests/compose_run.py", str(out)], timeout=500))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario", COMPOSED, ids=[s.name for s in COMPOSED])
def test_model_parallel_with_data_parallel_matches_one_process(composed: Path, scenario: Scenario) -> None:
    got = torch.load(composed / f"{scenario.name}.pt", weights_only=True)
    plan = got["plan"]
    assert plan["data"] == 2 and (plan["tensor"], plan["pipeline"]) in ((2, 1), (1, 2)), plan
    want = run_reference(scenario)
    assert got["state"].keys() == want["state"].keys()
    for key, expected in want["state"].items():
        torch.testing.assert_close(got["state"][key], expected, rtol=RTOL, atol=ATOL, msg=f"state {key}")
    # Logged values, including a torchmetrics sample count, are those of one process: the model-parallel
    # replicas of a batch are not counted twice.
    for key, expected in want["metrics"].items():
        torch.testing.assert_close(got["metrics"][key], expected, rtol=RTOL, atol=ATOL, msg=f"logged {key}")
    torch.testing.assert_close(got["val_loss"], want["val_loss"], rtol=RTOL, atol=ATOL)
    rel = (got["output"] - want["output"]).norm() / want["output"].norm()
    assert rel <= 1e-5, f"outputs differ: relative error {rel:.2e}"
