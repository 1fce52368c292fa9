"""``plan="auto"`` and ``parti-lightning plan``: the planner inside a run and before one.

The planner's own logic is tested without processes in test_planner.py, and the plans it chooses are
parity-tested in test_parity.py (scenarios ``auto`` and ``auto_tight_budget``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from launch import REPO, check, run_script

TIGHT = str(10**6)  # bytes per rank: below any process's own overhead


def test_the_planner_profiles_the_batch_training_step_receives() -> None:
    """One loader: its batch; a list or dict of loaders: the list or dict of batches, as Lightning combines them."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from parti_lightning.lightning_adapters.autoplan import training_batch

    from scenarios import ToyRegressor, make_dataset

    module, loader = ToyRegressor(), DataLoader(make_dataset(), batch_size=4)
    for source, check_batch in [
        (loader, lambda b: len(b) == 2 and b[0].shape == (4, 6)),
        ([loader, loader], lambda b: len(b) == 2 and b[1][0].shape == (4, 6)),
        ({"a": loader, "b": loader}, lambda b: set(b) == {"a", "b"} and b["b"][0].shape == (4, 6)),
        (None, lambda b: len(b) == 2 and b[0].shape == (8, 6)),  # the module's own train_dataloader
    ]:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
        trainer.strategy.connect(module)
        trainer._data_connector.attach_data(module, train_dataloaders=source)
        batch = training_batch(trainer, module)
        assert check_batch(batch), (source, batch)
        assert all(t.dtype == torch.float32 for t in torch.utils._pytree.tree_leaves(batch))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # Fresh, as on a new install: the first run below measures the machine, every later one reads this cache.
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def auto_run(cache: dict[str, str]) -> tuple[bool, str]:
    """One ``plan="auto"`` fit on a new machine with a short run timeout, shared by the tests that read its log.

    Returns whether the machine was unmeasured before the run, and the run's output.
    """
    fresh = not (Path(cache["XDG_CACHE_HOME"]) / "parti-lightning" / "hardware.json").exists()
    # Rank 0 measures the machine (~10 s) while rank 1 waits, longer than timeout=3 s.
    return fresh, check(run_script(["tests/helpers/auto_run.py", "0", "3"], timeout=180, env=cache))


def _plan_command(*args: str, env: dict[str, str]):
    """``parti-lightning plan`` as a user runs it: the installed console script, in its own process."""
    command = shutil.which("parti-lightning")
    assert command, "the parti-lightning console script is not installed"
    return run_script(
        [command, "plan", "--model=scenarios.BlockRegressor", "--trainer.devices=2", "--trainer.accelerator=cpu",
         *args],
        timeout=150, cwd=REPO / "tests" / "helpers", env=env,
    )


@pytest.fixture
def plan_in_process(
    cache: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str]]:
    """``parti-lightning plan ARGS`` run in this process (``cli.main``): the same code as the console script,
    without a new interpreter's start-up. Returns the exit code and everything printed."""
    from parti_lightning import cli

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setenv("XDG_CACHE_HOME", cache["XDG_CACHE_HOME"])
        monkeypatch.chdir(REPO / "tests" / "helpers")
        monkeypatch.setattr(sys, "argv", ["parti-lightning"])  # the plan command resets sys.argv
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            cli.main(["plan", "--model=scenarios.BlockRegressor", "--trainer.devices=2", "--trainer.accelerator=cpu",
                      *args])
        out = capsys.readouterr()
        return int(exit_.value.code or 0), out.out + out.err

    return run


@pytest.mark.timeout(200)
def test_choosing_on_a_new_machine_is_start_up_not_cut_off_by_a_short_run_timeout(
    cache: dict[str, str], auto_run: tuple[bool, str]
) -> None:
    fresh, out = auto_run
    assert fresh, "the machine was measured before the run: this run did not choose on a new machine"
    assert "rank 1: trained under data=2 × shard=1" in out
    assert (Path(cache["XDG_CACHE_HOME"]) / "parti-lightning" / "hardware.json").exists()


@pytest.mark.timeout(200)
def test_auto_logs_its_choice_and_then_measured_against_predicted(
    cache: dict[str, str], auto_run: tuple[bool, str], plan_in_process: Callable[..., tuple[int, str]]
) -> None:
    out = auto_run[1]
    assert "parti: plan='auto' chose data=2 × shard=1" in out
    assert "chosen: the fastest that fits" in out  # the table, logged at fit start
    assert "parti: plan='auto' measured over steps 3-7:" in out and "peak memory per rank" in out
    assert "rank 1: trained under data=2 × shard=1" in out
    # The measured ratio is kept for this machine, and the next plan here is corrected by it.
    calibration = json.loads((Path(cache["XDG_CACHE_HOME"]) / "parti-lightning" / "calibration.json").read_text())
    ((model, entries),) = next(iter(calibration.values())).items()
    assert model.startswith("BlockRegressor|") and set(entries) == {"replicated"}
    assert entries["replicated"]["memory"] > 0 and entries["replicated"]["time"] > 0
    code, replanned = plan_in_process()
    assert code == 0, replanned
    assert "corrected by earlier runs of this model on this machine" in replanned and "replicated memory ×" in replanned


@pytest.mark.timeout(200)
def test_plan_command_explains_the_choice_without_launching(cache: dict[str, str]) -> None:
    out = check(_plan_command(env=cache))
    assert "parti plan for BlockRegressor" in out and "verdict" in out
    assert "chosen: the fastest that fits" in out
    assert "plan='auto' would choose: data=2 × shard=1" in out
    assert "processes joined" not in out, "the plan command started a run"


@pytest.mark.timeout(200)
def test_plan_command_draws_the_plan(plan_in_process: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
    picture = tmp_path / "plan.png"
    code, out = plan_in_process(f"--plot={picture}")
    assert code == 0, out
    assert f"drawn to {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000


@pytest.mark.timeout(200)
def test_plan_command_fails_clearly_when_nothing_fits(plan_in_process: Callable[..., tuple[int, str]]) -> None:
    budget = f"--trainer.strategy.memory_budget={TIGHT}"
    code, out = plan_in_process("--trainer.strategy=parti_lightning.PartiStrategy", budget)
    assert code == 2, out
    assert "NoPlanFits: no plan fits BlockRegressor" in out
    assert "It would fit with more memory per rank" in out


@pytest.mark.timeout(200)
def test_auto_stops_every_rank_when_nothing_fits(cache: dict[str, str]) -> None:
    result = run_script(["tests/helpers/auto_run.py", TIGHT], timeout=180, env=cache)
    assert result.returncode != 0
    assert not result.stderr, f"processes left running: {result.stderr}"
    # Every rank raises it (rank 0 sends its planner's error to the others); rank 0's failure then
    # ends the node's other ranks, which may go before they print theirs.
    assert "[parti rank 0/2] NoPlanFits: no plan fits BlockRegressor" in result.stdout, result.stdout
    assert "trained under" not in result.stdout


@pytest.mark.timeout(200)
def test_plan_command_predicts_a_fixed_plan_given_as_a_mapping(plan_in_process: Callable[..., tuple[int, str]]) -> None:
    code, out = plan_in_process("--trainer.strategy=parti_lightning.PartiStrategy",
                                "--trainer.strategy.plan={preset: zero3, activation_checkpointing: blocks}")
    assert code == 0, out
    assert "this configuration fixes plan data=1 × shard=2" in out and "activation_checkpointing=blocks" in out
    assert "GiB per rank" in out and "s per step" in out
