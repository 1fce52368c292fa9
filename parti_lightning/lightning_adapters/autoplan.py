"""``plan="auto"`` inside a run: what the strategy needs around the planner.

The planner itself (``parti_lightning.planner``) is pure: a profile, a hardware profile, a choice. Here
is the Lightning side: one example batch from whatever the Trainer will train on, the choice made
once on global rank 0 and sent to every rank (each rank's own measurements could differ and split
the mesh), and the measured step time and memory logged beside the prediction after a few steps,
and kept for the next plan on this machine (:mod:`~parti_lightning.planner.calibration`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng

from parti_lightning.accelerator import PartiAccelerator, usable_cores
from parti_lightning.mesh import ParallelMesh
from parti_lightning.plan import PartitionPlan
from parti_lightning.planner import HardwareProfile, PlanReport, choose_plan, example_batch, profile_model
from parti_lightning.planner import calibration as calibration_module
from parti_lightning.planner.calibration import MEMORY_MARGIN, TIME_MARGIN, Correction
from parti_lightning.planner.cost import Estimate
from parti_lightning.planner.timing import time_blocks
from parti_lightning.rss import peak_rss_bytes

log = logging.getLogger(__name__)

GIB = 1024**3


def training_batch(trainer: Trainer, module: LightningModule) -> Any:
    """The first batch ``training_step`` will get, else ``module.example_input_array``."""
    # The fit loop's data source is what Trainer.fit resolved: dataloaders passed to `fit`, the
    # datamodule's hook, or the module's. The loop combines them as a CombinedLoader does here, so a
    # list or dict of loaders gives the list or dict of batches the step receives.
    source = trainer.fit_loop._data_source
    loader = source.dataloader() if source.is_defined() else None
    if loader is None:
        return example_batch(module, None)
    combined = loader if isinstance(loader, CombinedLoader) else CombinedLoader(loader, mode="max_size_cycle")
    try:
        batch, _, _ = next(iter(combined))
    except StopIteration:
        raise ValueError("plan='auto' needs one training batch to profile the model; the loader is empty.") from None
    return batch


def choose_on_rank0(make_report: Callable[[], PlanReport]) -> tuple[PartitionPlan, PlanReport | None]:
    """Run the planner (``make_report``) on global rank 0 and give every rank its choice. Collective.

    Raises the planner's error (``NoPlanFits`` and the like) on every rank, so that no rank waits for a
    plan that will not come. Returns the report on rank 0 only.
    """
    outcome: list[Any] = [None]
    report = None
    if dist.get_rank() == 0:
        try:
            # Drawing the first batch (a shuffling sampler seeds itself from the global RNG) and the
            # hardware micro-benchmark must not move rank 0's random streams away from the others'.
            with isolate_rng():
                report = make_report()
            outcome[0] = report.chosen.to_dict()
        except Exception as err:  # sent to every rank and raised there
            outcome[0] = err
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return PartitionPlan.from_value(outcome[0]), report


def plan_for(
    module: LightningModule,
    batch: Any,
    device_type: str,
    memory_budget: int,
    world_size: int,
    ranks_per_node: int,
    headroom: float | None,
    calibrated: bool = True,
) -> PlanReport:
    """The planner's report for training ``module`` on batches like ``batch`` on this machine.

    ``calibrated``: predictions corrected by what earlier runs on this machine measured.
    """
    profile = profile_model(module, batch)
    hardware = _hardware(device_type, ranks_per_node)
    hardware = dataclasses.replace(hardware, memory_bytes=memory_budget)
    if device_type == "cpu":  # on a GPU, blocks are not timed yet: FLOPs over the matmul rate
        profile = time_blocks(module, batch, profile, ranks_per_node)
    machine = calibration_module.machine_key(device_type, ranks_per_node)
    corrections = calibration_module.load(machine, calibration_module.model_key(profile)) if calibrated else None
    return choose_plan(profile, hardware, world_size=world_size, ranks_per_node=ranks_per_node, headroom=headroom,
                       corrections=corrections)


def choose_in_run(
    trainer: Trainer,
    module: LightningModule,
    mesh: ParallelMesh,
    device: torch.device,
    *,
    budget: int,
    ranks_per_node: int,
    headroom: float | None,
    calibration: bool = True,
    startup_timeout: timedelta,
    timeout: timedelta,
) -> tuple[PartitionPlan, PlanReport | None, StepMeter]:
    """The plan for this run, chosen on global rank 0 from the first training batch. Collective.

    Args:
        calibration: correct the predictions by earlier runs' measurements on this machine, and keep
            this run's (see :mod:`~parti_lightning.planner.calibration`).

    Returns:
        the chosen plan (every rank), the planner's report (rank 0 only, else ``None``), and the meter
        that logs the measured step time and memory beside the prediction after the first steps.
    """
    world_size = dist.get_world_size()
    # Planning is start-up: the other ranks wait while rank 0 profiles the model and, on a machine it has
    # not seen, measures it (seconds), which a short run `timeout` must not cut off.
    mesh.set_timeout(startup_timeout)
    try:
        chosen, report = choose_on_rank0(
            lambda: plan_for(
                module, training_batch(trainer, module), device.type, budget, world_size, ranks_per_node, headroom,
                calibrated=calibration,
            )
        )
    finally:
        mesh.set_timeout(timeout)
    prediction = None
    if report is not None:
        rank_zero_info(f"parti: plan='auto' chose {report.chosen.describe()}\n{report.render()}")
        kind = calibration_module.plan_kind(report.chosen)
        prediction = Prediction(
            estimate=report.chosen_candidate.estimate,
            applied=report.corrections.get(kind),
            kind=kind,
            machine=calibration_module.machine_key(device.type, ranks_per_node),
            model=calibration_module.model_key(report.profile),
            record=calibration,
            headroom=report.headroom,
        )
    return chosen, report, StepMeter("plan='auto'", prediction, device)


def rank_budget(memory_budget: int | None, accelerator: Any) -> int:
    """The memory one rank may use: the strategy's ``memory_budget``, else the accelerator's device partition's."""
    if memory_budget is not None:
        return memory_budget
    assert isinstance(accelerator, PartiAccelerator), "plan='auto' needs the PartiAccelerator"
    return accelerator.memory_budget


def _hardware(device_type: str, ranks_per_node: int) -> HardwareProfile:
    # Measured once per machine shape and cached; a first measurement from inside a CPU rank must not
    # run on that rank's pinned cores alone (its helper processes would inherit them).
    pinned = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    try:
        if pinned is not None:
            os.sched_setaffinity(0, usable_cores())
        return HardwareProfile.measure(device_type, ranks_per_node)  # type: ignore[arg-type]
    finally:
        if pinned is not None:
            os.sched_setaffinity(0, pinned)
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Prediction:
    """What the planner predicted for the chosen plan, and where a measured correction is kept.

    Attributes:
        estimate: the prediction shown, with ``applied`` in it.
        applied: the correction from earlier runs already in ``estimate`` (``None``: the cost model alone).
        kind: the plan's kind (:func:`~parti_lightning.planner.calibration.plan_kind`).
        machine: the machine shape's key.
        model: the model's key (:func:`~parti_lightning.planner.calibration.model_key`).
        record: whether to keep this run's measurement.
        headroom: the planner's headroom (for the advice when memory is under-predicted).
    """

    estimate: Estimate
    applied: Correction | None
    kind: str
    machine: str
    model: str
    record: bool = True
    headroom: float = 0.1


class StepMeter:
    """Measures step time and peak memory over the first steps; logs them beside the prediction and keeps the ratio.

    Step time is the median interval between optimizer steps ``warmup`` to ``warmup + steps``; memory
    is the largest peak over the ranks: the CUDA allocator's peak on GPU, the process's peak resident
    set on CPU (what the prediction's ``overhead`` part stands for is included in both). When either is
    off the prediction by more than the planner's aims (memory ±15%, time ±25%), a warning says so and
    what to do; with ``prediction.record``, global rank 0 keeps measured over uncorrected predicted in
    the calibration cache, which the next plan on this machine applies.
    """

    def __init__(self, report_line: str, prediction: Prediction | None, device: torch.device,
                 warmup: int = 2, steps: int = 5) -> None:
        self.report_line = report_line
        self.prediction = prediction  # global rank 0 only
        self.device = device
        self.warmup, self.steps = warmup, steps
        self.times: list[float] = []
        self.measured: dict[str, float] | None = None
        self.recorded: Correction | None = None

    def step(self) -> None:
        """Call after every optimizer step, on every rank (the last call is a collective)."""
        if self.measured is not None:
            return
        self.times.append(time.perf_counter())
        if len(self.times) < self.warmup + self.steps + 1:
            return
        measured = self.times[self.warmup :]
        intervals = [b - a for a, b in zip(measured, measured[1:], strict=False)]
        peak = torch.tensor([float(self._peak_bytes()), statistics.median(intervals)], dtype=torch.float64)
        if self.device.type == "cuda":
            peak = peak.to(self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peak_bytes, seconds = float(peak[0]), float(peak[1])
        self.measured = {"peak_bytes": peak_bytes, "step_seconds": seconds}
        if self.prediction is not None:
            self._report(peak_bytes, seconds, self.prediction)

    def _report(self, peak_bytes: float, seconds: float, prediction: Prediction) -> None:
        predicted_bytes, predicted_seconds = prediction.estimate.peak_bytes, prediction.estimate.seconds
        time_line = f"{seconds:.3f} s/step (predicted {predicted_seconds:.3f}, {_ratio(seconds, predicted_seconds)})"
        memory_line = (
            f"peak memory per rank {peak_bytes / GIB:.2f} GiB (predicted {predicted_bytes / GIB:.2f},"
            f" {_ratio(peak_bytes, predicted_bytes)})"
        )
        steps = f"{self.warmup + 1}-{self.warmup + self.steps}"
        rank_zero_info(f"parti: {self.report_line} measured over steps {steps}: {time_line}, {memory_line}")
        if predicted_bytes <= 0 or predicted_seconds <= 0:
            return
        memory_ratio, time_ratio = peak_bytes / predicted_bytes, seconds / predicted_seconds
        applied = prediction.applied or Correction()
        where = ""
        if prediction.record:
            # Against the uncorrected prediction: the correction replaces, not compounds, the last one.
            self.recorded = Correction(memory_ratio * applied.memory, time_ratio * applied.time)
            path = calibration_module.record(prediction.machine, prediction.model, prediction.kind, self.recorded)
            where = f"; later plans of this kind for this model on this machine are corrected by it ({path})"
        advice = []
        if memory_ratio > 1 + MEMORY_MARGIN:
            headroom = 1 - (1 - prediction.headroom) / memory_ratio
            advice.append(
                f"peak memory is {memory_ratio:.2f}× the prediction (aim: within {MEMORY_MARGIN:.0%}): a plan chosen"
                f" close to the budget could run out of memory; raise planner_headroom to {headroom:.2f} or lower"
                " memory_budget"
            )
        elif memory_ratio < 1 - MEMORY_MARGIN:
            advice.append(
                f"peak memory is {memory_ratio:.2f}× the prediction (aim: within {MEMORY_MARGIN:.0%}): the planner"
                " was cautious, and may have chosen a slower plan than one that fits"
            )
        if abs(time_ratio - 1) > TIME_MARGIN:
            advice.append(
                f"step time is {time_ratio:.2f}× the prediction (aim: within {TIME_MARGIN:.0%}): plans predicted"
                " close in time may be ranked wrongly; `parti-lightning plan` shows the candidates"
            )
        if advice:
            rank_zero_warn(f"parti: {self.report_line} ({prediction.kind}): " + "; ".join(advice) + where)

    def _peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


def _ratio(measured: float, predicted: float) -> str:
    return f"{measured / predicted:.2f}× the prediction" if predicted > 0 else "no prediction"
