"""Drop-in for existing Lightning scripts: what they do around `fit` keeps working under parti.

One 2-rank launch (dropin_run.py) checks, in the same processes: the interface variables parti sets for a
single-node run are given back when each run ends (a later run and a plain `init_process_group` are not
pinned); an exception the caller catches leaves the other ranks alive, so the run resumes; resuming from a
single file with an optimizer that holds no state, and from a file written by Lightning's own `ddp`; the
default checkpoint (a file under ddp, a directory under ZeRO-3) through Lightning's entry points.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging, WeightAveraging

from parti_lightning import PartiStrategy
from parti_lightning.checkpoint import checkpoint_kind
from parti_lightning.lightning_adapters.compat import check_callbacks
from parti_lightning.plan import PartitionPlan

from launch import check, run_script


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[str]]:
    out = tmp_path_factory.mktemp("dropin")
    stdout = check(run_script(["tests/helpers/dropin_run.py", str(out)], timeout=400))
    (line,) = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT ")), stdout.splitlines()


def _env(lines: list[str], stage: str) -> set[str]:
    # Searched anywhere in the output, the value by its shape (a repr: None or a quoted name): both ranks write
    # to one pipe, so another rank's text can run on from the end of a line, or begin in the middle of one.
    return set(re.findall(rf"ENV {re.escape(stage)} rank\d+ (None|'[^']*')", "\n".join(lines)))


@pytest.mark.timeout(450)
def test_interface_variables_are_given_back_when_each_run_ends(run: tuple[dict, list[str]]) -> None:
    result, lines = run
    assert _env(lines, "start") == {"None"}
    for stage in ("fit1", "fit2", "zero3"):
        during = _env(lines, f"{stage}-during")
        assert len(during) == 1 and during != {"None"}, (stage, during)  # loopback while the run is on
    for stage in ("fit1-after", "fit2-after", "zero3-after", "plain-before"):
        assert _env(lines, stage) == {"None"}, stage
    assert result["plain_all_reduce"] == 2.0


@pytest.mark.timeout(450)
def test_an_exception_the_caller_catches_leaves_the_run_resumable(run: tuple[dict, list[str]]) -> None:
    result, lines = run
    # Searched anywhere in the output: both ranks write to one pipe, so a line can start mid-way through another's.
    assert set(re.findall(r"CAUGHT rank\d", "\n".join(lines))) == {"CAUGHT rank0", "CAUGHT rank1"}
    # The file of step 2 (the default under ddp: one file), resumed in the same two processes, to the end.
    assert result["a_last_is_file"] and "epoch=0-step=2.ckpt" in result["a_files"]
    assert (result["resumed_at"], result["resumed_to"]) == (2, 6)
    assert "FINISHED rank1" in lines, "rank 1 of the recovered run was ended when rank 0 exited"


@pytest.mark.timeout(450)
def test_resume_with_a_stateless_optimizer_and_from_lightning_ddp(run: tuple[dict, list[str]]) -> None:
    result, _ = run
    assert result["load_from_checkpoint"]
    for plan in ("zero1", "zero3"):
        assert result[f"ddp_as_{plan}"] == {"resumed_at": 4, "weights_equal": True}, plan


@pytest.mark.timeout(450)
def test_zero3_directory_through_lightnings_entry_points(run: tuple[dict, list[str]]) -> None:
    result, _ = run
    assert result["zero3_best_is_dir"] and result["validated"] and result["load_from_checkpoint_dir"]
    step = int(re.search(r"step=(\d+)", result["zero3_best"]).group(1))  # type: ignore[union-attr]
    assert result["zero3_resumed_at"] == step


@pytest.mark.parametrize(
    ("requested", "plan", "kind"),
    [
        ("auto", "ddp", "full"),
        ("auto", "zero1", "full"),
        ("auto", "zero2", "sharded"),
        ("auto", "zero3", "sharded"),
        ("auto", "hybrid", "sharded"),
        ("sharded", "ddp", "sharded"),
        ("full", "zero3", "full"),
    ],
)
def test_default_checkpoint_is_a_file_unless_parameters_are_sharded(requested: str, plan: str, kind: str) -> None:
    resolved = PartitionPlan.from_value(plan).resolve(4, ranks_per_node=2)
    assert checkpoint_kind(requested, resolved) == kind


def test_state_dict_type_defaults_to_auto() -> None:
    assert PartiStrategy()._requested_state_dict_type == "auto"


@pytest.mark.parametrize(
    "callback",
    [lambda: ModelPruning("l1_unstructured", amount=0.3), lambda: StochasticWeightAveraging(swa_lrs=0.1),
     lambda: WeightAveraging()],
    ids=["pruning", "swa", "ema"],
)
def test_callbacks_that_need_whole_parameters_are_refused_under_zero3_before_launch(callback: Any) -> None:
    from scenarios import ToyRegressor

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PartiStrategy(plan="zero3"), logger=False,
                        enable_checkpointing=False, callbacks=[callback()])
    with pytest.raises(NotImplementedError, match="needs whole parameters"):
        trainer.fit(ToyRegressor())
    assert "LOCAL_RANK" not in os.environ, "the launcher started ranks before refusing"
    check_callbacks([callback()], PartitionPlan.from_value("zero1").resolve(2, ranks_per_node=2))  # whole there


def test_a_wrapped_strategy_backward_runs_once_per_step() -> None:
    """Code that wraps ``Strategy.backward`` with the strategy's own bound ``backward`` (Lightning's SWA test does,
    with a mock) wraps parti's backward too: parti uses the hooks around it, not an override that would call the
    wrapper back without end."""
    from unittest import mock

    import torch
    from lightning.pytorch.strategies import Strategy

    from scenarios import ToyRegressor

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=PartiStrategy(plan="ddp"), max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = ToyRegressor()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        with mock.patch.object(Strategy, "backward", wraps=trainer.strategy.backward) as backward:
            trainer.fit(module)
    finally:
        if torch.distributed.is_initialized():  # a one-process run keeps its group in this process after fit
            torch.distributed.destroy_process_group()
    assert backward.call_count == 3
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_backward_that_raises_leaves_no_step_context_behind() -> None:
    """The step context a backward pass enters (implicit replication under tensor parallelism) ends at
    ``post_backward``, or, when the backward raised first, at ``on_exception``: a caller that catches the error
    and goes on in the same process finds DTensor as it was."""
    import torch
    from torch.distributed.tensor import DTensor

    from parti_lightning.parallel.tensor import tensor_parallel_step

    class _Parallel:
        def step_context(self) -> Any:
            return tensor_parallel_step()

        def sync_gradients(self) -> None:
            pass

    strategy = PartiStrategy(plan="ddp")
    strategy._parallel = _Parallel()  # type: ignore[assignment]
    flag = lambda: DTensor._op_dispatcher._allow_implicit_replication  # noqa: E731
    before = flag()
    strategy.pre_backward(torch.zeros(()))
    assert flag() is True
    strategy.post_backward(torch.zeros(()))
    assert flag() == before
    strategy.pre_backward(torch.zeros(()))
    strategy.on_exception(RuntimeError("raised in backward"))
    assert flag() == before
