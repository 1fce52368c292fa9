"""Tier 3 at 4 ranks: tensor × data, pipeline × data, tensor × shard (2-D), pipeline × tensor, pipeline × shard and
pipeline × ZeRO-1 through the Trainer compute what one process computes, and checkpoints cross these plans.

One launch of 4 processes trains them all (see compose_run.py); each test compares one of them with a single
process over the same global batches (two data-parallel replicas' worth) from the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compose_run import COMPOSED, TWO_D

from launch import check, run_script
from scenarios import Scenario, run_reference

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compose")
    check(run_script(["tests/helpers/compose_run.py", str(out)], timeout=560))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario", COMPOSED, ids=[s.name for s in COMPOSED])
def test_model_parallel_with_data_parallel_matches_one_process(composed: Path, scenario: Scenario) -> None:
    got = torch.load(composed / f"{scenario.name}.pt", weights_only=True)
    plan = got["plan"]
    assert plan["data"] * plan["shard"] == scenario.data_parallel, plan
    assert plan["tensor"] * plan["pipeline"] * scenario.data_parallel == 4, plan
    if plan["tensor"] > 1:  # the blocks' layers really were split (no fall-back to replicated blocks)
        assert got["tensor_split_parameters"] >= 6, got["tensor_split_parameters"]
    if plan["storage"] == "parameters":  # FSDP holds this rank's parameters as shards
        assert got["sharded_parameters"] >= 6, got["sharded_parameters"]
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


def test_tensor_times_shard_is_two_dimensional(composed: Path) -> None:
    plan = torch.load(composed / f"{TWO_D.name}.pt", weights_only=True)["plan"]
    assert (plan["shard"], plan["tensor"], plan["storage"]) == (2, 2, "parameters"), plan


def _tensors(states: list[dict]) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}.{key}": value
        for i, state in enumerate(states)
        for name, entry in state["state"].items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor)
    }


def _assert_restored(restored: dict, saved_state: dict, saved_optimizers: list[dict]) -> None:
    assert restored["state_dict"].keys() == saved_state.keys()
    for key, value in saved_state.items():
        assert torch.equal(restored["state_dict"][key], value), f"weight {key} changed on resume"
    want, got = _tensors(saved_optimizers), _tensors(restored["optimizer_states"])
    assert want and got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), f"optimizer state {key} changed on resume"


def test_single_file_resumes_under_tensor_times_shard(composed: Path) -> None:
    saved = torch.load(composed / "2d.ckpt", weights_only=True)
    restored = torch.load(composed / "resumed_2d.ckpt_as_1.pt", weights_only=True)
    assert restored["global_step"] == saved["global_step"] == TWO_D.max_steps
    _assert_restored(restored, saved["state_dict"], saved["optimizer_states"])


@pytest.mark.parametrize(
    ("source", "hop", "steps"),
    [("2d_sharded", 2, 2), ("zero3_sharded", 3, 4), ("2d_sharded", 4, 2), ("2d_sharded", 5, 2),
     ("pp_zero1_sharded", 6, 10)],
    ids=["2d-as-zero3", "zero3-as-2d", "2d-as-pp_x_shard", "2d-as-pp_x_zero1", "pp_x_zero1-as-2d"],
)
def test_sharded_directories_convert_and_resume_across_model_parallel_plans(
    composed: Path, tmp_path: Path, source: str, hop: int, steps: int
) -> None:
    """2-D shards resumed under ZeRO-3 over 4 ranks and under pipeline × shard; ZeRO-3 shards under tensor × shard."""
    from parti_lightning.checkpoint import positional_to_named
    from parti_lightning.convert import NAMES_KEY, convert

    # `parti-lightning convert`: the shards become one plain Lightning file ...
    converted = tmp_path / "converted.ckpt"
    convert(composed / source, converted)
    saved = torch.load(converted, weights_only=True)
    assert saved["global_step"] == TWO_D.max_steps + steps
    # ... holding exactly what the next plan restored from the shards. The file keys optimizer state by position,
    # as stock Lightning does, with the names beside it.
    restored = torch.load(composed / f"resumed_{source}_as_{hop}.pt", weights_only=True)
    assert restored["global_step"] == saved["global_step"]
    named = [positional_to_named(s, n) for s, n in zip(saved["optimizer_states"], saved[NAMES_KEY], strict=True)]
    _assert_restored(restored, saved["state_dict"], named)
