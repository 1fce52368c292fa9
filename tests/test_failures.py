"""What the user sees when a run fails: a clear error before launch, or every rank gone quickly."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import lightning as L
import pytest

import parti_lightning  # noqa: F401
from parti_lightning import PartiStrategy, PlanError

from launch import Job, Launch, run_scripts, selected_tests


def _trainer(**kwargs: object) -> L.Trainer:
    kwargs.setdefault("strategy", "parti")
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **kwargs)


def test_unknown_plan_name_fails_before_launch() -> None:
    with pytest.raises(PlanError, match="unknown plan 'zero9'"):
        _trainer(strategy=PartiStrategy(plan="zero9"), devices=2)


def test_unknown_strategy_alias_is_refused_by_lightning() -> None:
    with pytest.raises(ValueError, match="invalid strategy name"):
        _trainer(strategy="parti_zero9", devices=2)


def test_more_devices_than_cores_fails_before_launch() -> None:
    with pytest.raises(ValueError, match=r"devices=512 but this process may use \d+ CPU core"):
        _trainer(devices=512)


def test_backend_that_does_not_fit_the_device_fails_before_launch() -> None:
    with pytest.raises(ValueError, match="process_group_backend='nccl' needs CUDA devices"):
        _trainer(strategy=PartiStrategy(process_group_backend="nccl"), devices=2)


@pytest.mark.parametrize("name", ["timeout", "startup_timeout"])
def test_timeouts_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}=0 must be positive"):
        PartiStrategy(**{name: 0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"plan": {"preset": "auto", "data": 2}}, "the planner chooses every field"),
        ({"memory_budget": 0}, "memory_budget=0"),
        ({"memory_budget": 1.5}, "memory_budget=1.5"),
        ({"planner_headroom": 1.0}, "planner_headroom=1.0"),
        ({"resume": "always"}, "resume='always'"),
        ({"planner_headroom": -0.1}, "planner_headroom=-0.1"),
        ({"state_dict_type": "both"}, "state_dict_type='both'"),
    ],
)
def test_bad_planner_and_checkpoint_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PartiStrategy(**kwargs)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="process_group_backend='mpi2'"):
        PartiStrategy(process_group_backend="mpi2")  # type: ignore[arg-type]


def test_mesh_that_does_not_match_world_size_fails_before_launch() -> None:
    with pytest.raises(PlanError, match="mesh data=3 .* does not match world size 2"):
        _trainer(strategy=PartiStrategy(plan={"data": 3}), devices=2)


def test_unknown_sharding_unit_fails_before_any_process_starts() -> None:
    from scenarios import ToyRegressor

    trainer = _trainer(strategy=PartiStrategy(plan={"preset": "zero3", "sharding_units": ["encoder.9"]}), devices=2)
    with pytest.raises(ValueError, match="encoder.9"):
        trainer.fit(ToyRegressor())
    assert "LOCAL_RANK" not in os.environ, "the launcher started ranks before refusing the plan"


def test_activation_checkpointing_auto_needs_the_planner_to_choose() -> None:
    with pytest.raises(NotImplementedError, match="decided by the planner only with plan='auto'"):
        _trainer(strategy=PartiStrategy(plan={"activation_checkpointing": "auto"}), devices=2)


# The arguments of failing_run.py for each test below that launches a failing run, from the test's parameters.
FAILING_RUNS: dict[str, Callable[..., tuple[str, ...]]] = {
    "test_a_rank_that_stops_taking_part_makes_the_others_time_out": lambda hanging_rank: (str(hanging_rank), "hang"),
    "test_ranks_syncing_different_metric_names_get_a_clear_error": lambda: ("1", "names"),
    "test_a_rank_raising_stops_every_process": lambda mode, where, failing_rank, world: (
        str(failing_rank), mode, str(world)),
    "test_a_model_parallel_rank_failing_stops_every_process": lambda mode, plan: ("1", mode, "2", plan),
    "test_a_rank_killed_mid_step_stops_every_process": lambda killed_rank: (str(killed_rank), "sigkill"),
    "test_rank0_exiting_after_catching_a_failure_ends_the_other_ranks": lambda: ("0", "caught"),
}
# Every failing run ends itself (or is ended by its hard timeout); the test timeout covers all of them, since the
# first test to ask runs every selected one (two at a time).
RUNS_TIMEOUT = 900


def _failing_run_args(item: pytest.Item) -> tuple[str, ...] | None:
    make = FAILING_RUNS.get(getattr(item, "originalname", ""))
    callspec = getattr(item, "callspec", None)
    return None if make is None else make(**(callspec.params if callspec else {}))


@pytest.fixture(scope="module")
def failing_runs(request: pytest.FixtureRequest) -> dict[tuple[str, ...], Launch]:
    """The failing runs of every selected test of this module, launched two at a time (independent jobs)."""
    wanted = dict.fromkeys(args for args in map(_failing_run_args, selected_tests(request)) if args)
    # failing_run.py RANK MODE [WORLD_SIZE [PLAN]]: WORLD_SIZE processes, 2 by default.
    world = {args: int(args[2]) if len(args) > 2 else 2 for args in wanted}
    return run_scripts({args: Job(["tests/helpers/failing_run.py", *args], processes=world[args]) for args in wanted},
                       timeout=120)


@pytest.fixture
def failing_run(request: pytest.FixtureRequest, failing_runs: dict[tuple[str, ...], Launch]) -> Launch:
    """This test's failing run."""
    return failing_runs[_failing_run_args(request.node)]


@pytest.mark.timeout(RUNS_TIMEOUT)
@pytest.mark.parametrize("hanging_rank", [0, 1])
def test_a_rank_that_stops_taking_part_makes_the_others_time_out(hanging_rank: int, failing_run: Launch) -> None:
    from failing_run import HANG_TIMEOUT_S

    result, ended = failing_run.result, failing_run.ended
    assert result.returncode != 0
    hung_at = float(re.search(r"rank \d hangs at ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    # The other rank's collective times out after `timeout`; Lightning's launcher then ends the rest
    # (its watchdog polls every 5 s when the hanging rank is rank 0).
    assert ended - hung_at < HANG_TIMEOUT_S + 15, f"ran {ended - hung_at:.1f}s after the hang"
    assert f"Timed out waiting {HANG_TIMEOUT_S * 1000}ms" in result.stdout
    assert not result.stderr, f"processes left behind: {result.stderr}"


@pytest.mark.timeout(RUNS_TIMEOUT)
def test_ranks_syncing_different_metric_names_get_a_clear_error(failing_run: Launch) -> None:
    result = failing_run.result
    assert result.returncode != 0
    # Every rank detects it; which of them gets to print before the others are stopped may vary.
    assert re.search(r"logged 'training_step\.loss(_of_a_rank)?' with sync_dist=True while another rank",
                     result.stdout)
    assert "Timed out" not in result.stdout
    assert not result.stderr, f"processes left behind: {result.stderr}"


RAISES = [
    ("raise", "training_step", 0, 2),
    ("raise", "training_step", 1, 2),
    ("worker", "dataloader worker", 1, 2),
    ("callback", "callback", 0, 2),
    ("raise", "training_step", 3, 4),
]


@pytest.mark.timeout(RUNS_TIMEOUT)
@pytest.mark.parametrize(("mode", "where", "failing_rank", "world"), RAISES, ids=[f"{m}-rank{r}-of-{w}"
                                                                                     for m, _, r, w in RAISES])
def test_a_rank_raising_stops_every_process(
    mode: str, where: str, failing_rank: int, world: int, failing_run: Launch
) -> None:
    result, elapsed = failing_run.result, failing_run.elapsed
    assert result.returncode != 0
    # Start-up is ~5-10 s of it (more with 4 processes on 2 cores); failing and stopping, the rest.
    assert elapsed < 30 + 10 * world, f"took {elapsed:.0f}s to stop"
    # The original exception, and which rank raised it.
    assert f"boom from the user's {where} on rank {failing_rank}" in result.stdout, f"output:\n{result.stdout}"
    assert f"[parti rank {failing_rank}/{world}] RuntimeError" in result.stdout, f"output:\n{result.stdout}"
    assert not result.stderr, f"processes left behind: {result.stderr}"


MODEL_PARALLEL_FAILURES = [("raise", "tp"), ("raise", "pp"), ("sigkill", "pp")]


@pytest.mark.timeout(RUNS_TIMEOUT)
@pytest.mark.parametrize(("mode", "plan"), MODEL_PARALLEL_FAILURES, ids=["-".join(c) for c in MODEL_PARALLEL_FAILURES])
def test_a_model_parallel_rank_failing_stops_every_process(mode: str, plan: str, failing_run: Launch) -> None:
    # Rank 1 holds the other half of every layer (tp) or the last stage (pp): its peer waits on it in a
    # collective or a point-to-point receive, which must fail, not hang.
    result, elapsed = failing_run.result, failing_run.elapsed
    assert result.returncode != 0
    assert elapsed < 50, f"took {elapsed:.0f}s to stop"
    if mode == "raise":
        assert "boom from the user's training_step on rank 1" in result.stdout, f"output:\n{result.stdout}"
        assert "[parti rank 1/2] RuntimeError" in result.stdout, f"output:\n{result.stdout}"
    else:
        assert re.search(r"rank 1 killed at", result.stdout), f"output:\n{result.stdout}"
    assert not result.stderr, f"processes left behind: {result.stderr}"


@pytest.mark.timeout(RUNS_TIMEOUT)
@pytest.mark.parametrize("killed_rank", [0, 1])
def test_a_rank_killed_mid_step_stops_every_process(killed_rank: int, failing_run: Launch) -> None:
    result, ended = failing_run.result, failing_run.ended
    assert result.returncode != 0
    killed_at = float(re.search(r"rank \d killed at ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert ended - killed_at < 60, f"the others ran {ended - killed_at:.1f}s after the kill"
    assert not result.stderr, f"processes left behind: {result.stderr}"


@pytest.mark.timeout(RUNS_TIMEOUT)
def test_rank0_exiting_after_catching_a_failure_ends_the_other_ranks(failing_run: Launch) -> None:
    # Rank 1 sleeps in its step (no collective would ever fail it); rank 0's script catches the exception
    # and ends normally: the other ranks must not outlive it.
    result, ended = failing_run.result, failing_run.ended
    caught = re.search(r"the script caught at ([\d.]+): boom from the user's training_step on rank 0", result.stdout)
    assert caught is not None, result.stdout
    # Start-up time varies with the machine's load; the exit after the catch should not (a 5 s grace, then kill).
    assert ended - float(caught.group(1)) < 30, f"ran {ended - float(caught.group(1)):.1f}s after the catch"
    assert not result.stderr, f"processes left behind: {result.stderr}"
