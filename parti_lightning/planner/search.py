"""Enumerate the plans a world shape allows, predict each, and choose the fastest that fits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.table import Table

from parti_lightning.plan import ActivationCheckpointing, PartitionPlan, PlanError, ResolvedPlan, Storage
from parti_lightning.planner.cost import Estimate, estimate
from parti_lightning.planner.hardware import HardwareProfile
from parti_lightning.planner.profile import ModelProfile

if TYPE_CHECKING:
    from parti_lightning.planner.calibration import Correction

GIB = 1024**3
# Simpler first: on a tie the earlier storage level wins.
STORAGE_ORDER: tuple[Storage, ...] = ("replicated", "optimizer", "gradients", "parameters")
# How much more ranks a "would fit with" hint tries before giving up.
_MAX_WORLD_HINT = 4096


def default_headroom(device_type: str) -> float:
    """The fraction of the budget kept free when none is given: none on CPU, where each prediction carries the
    margin its measured spread asks for (:attr:`~parti_lightning.planner.cost.Estimate.margin_bytes`); 10% on
    CUDA, whose predictions have not been measured against runs yet."""
    return 0.0 if device_type == "cpu" else 0.1


class NoPlanFits(PlanError):
    """No plan fits one rank's memory budget; the message gives the smallest footprint and what would fit."""


@dataclass(frozen=True)
class Candidate:
    """One plan the planner considered.

    Attributes:
        plan: the resolved plan.
        estimate: its predicted memory and time.
        fits: whether its peak and margin stay within the usable budget.
        reason: why it was chosen or rejected, in words.
        chosen: whether it is the planner's choice.
    """

    plan: ResolvedPlan
    estimate: Estimate
    fits: bool
    reason: str = ""
    chosen: bool = False

    @property
    def peak_bytes(self) -> int:
        return self.estimate.peak_bytes

    @property
    def step_seconds(self) -> float:
        return self.estimate.seconds

    @property
    def label(self) -> str:
        plan = self.plan
        name = {"replicated": "ddp", "optimizer": "zero1", "gradients": "zero2", "parameters": "zero3"}[plan.storage]
        if plan.data > 1 and plan.shard > 1:
            name = f"hybrid {name}"
        if plan.data * plan.shard == 1:
            name = ""  # no data-parallel ranks: the model-parallel axes say it all
        model_parallel = []
        if plan.pipeline > 1:
            bubble = (plan.pipeline - 1) / (plan.micro_batches + plan.pipeline - 1)
            model_parallel.append(f"pp{plan.pipeline} ({plan.schedule}, {plan.micro_batches} micro-batches,"
                                  f" bubble {bubble:.0%})")
        if plan.tensor > 1:
            model_parallel.append(f"tp{plan.tensor}")
        name = " × ".join([*model_parallel, *([name] if name else [])])
        return name + (" + checkpointing" if plan.activation_checkpointing == "blocks" else "")


@dataclass(frozen=True)
class PlanReport:
    """The planner's choice and its reasons.

    Attributes:
        chosen: the resolved plan to run.
        candidates: every plan considered, in the order of the table (simplest first).
        budget_bytes: one rank's memory budget.
        headroom: the fraction of the budget kept free.
        profile: the model profile the predictions came from.
        hardware: the hardware profile they came from.
        corrections: measured corrections applied to the predictions, by plan kind (see
            :mod:`~parti_lightning.planner.calibration`); only those of kinds among the candidates.
    """

    chosen: ResolvedPlan
    candidates: tuple[Candidate, ...]
    budget_bytes: int
    headroom: float
    profile: ModelProfile
    hardware: HardwareProfile
    world_size: int = 1
    notes: tuple[str, ...] = field(default=())
    corrections: Mapping[str, Correction] = field(default_factory=dict)

    @property
    def chosen_candidate(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)

    @property
    def usable_bytes(self) -> int:
        return int(self.budget_bytes * (1 - self.headroom))

    @property
    def keeps_margins(self) -> bool:
        """Whether some candidate must fit with a margin beyond its peak (CPU ranks with glibc's own heap)."""
        return any(c.estimate.margin_bytes for c in self.candidates)

    def table(self) -> Table:
        """The candidates as a rich table, the chosen one marked."""
        from parti_lightning.planner.explain import report_table

        return report_table(self)

    def render(self, width: int = 170) -> str:
        """The same table and notes as plain text (for logs)."""
        from parti_lightning.planner.explain import render_text

        return render_text(self, width)

    def __str__(self) -> str:
        return self.render()


def candidate_plans(profile: ModelProfile, world_size: int, ranks_per_node: int) -> list[ResolvedPlan]:
    """Every plan worth predicting, over the mesh degrees the model and the world allow; all resolved.

    For each split of the world into model-parallel and data-parallel ranks: each storage level, flat
    and (over several nodes) hybrid, with and without block checkpointing when the model has repeated
    blocks. Simplest first, which is the order ties are broken in.
    """
    checkpointing: tuple[ActivationCheckpointing, ...] = ("none", "blocks") if profile.blocks else ("none",)
    plans: list[ResolvedPlan] = []
    for pipeline, tensor in _model_parallel_degrees(profile, world_size):
        data_parallel = world_size // (pipeline * tensor)
        for storage in STORAGE_ORDER if data_parallel > 1 else ("replicated",):
            for data, shard in _storage_degrees(storage, data_parallel, ranks_per_node):
                for ac in checkpointing:
                    for settings in _pipeline_settings(profile, pipeline, storage):
                        plan = ResolvedPlan(pipeline=pipeline, tensor=tensor, data=data, shard=shard,
                                            storage=storage, activation_checkpointing=ac, **settings)
                        try:
                            plan.check_implemented()
                        except NotImplementedError:
                            continue  # a combination parti refuses is never proposed
                        plans.append(plan)
    return plans


def _model_parallel_degrees(profile: ModelProfile, world_size: int) -> list[tuple[int, int]]:
    """``(pipeline, tensor)`` degrees the model and the world allow, ``(1, 1)`` first.

    Tensor degrees that divide every attention head count the model declares and both sides of every matrix
    in its blocks (so that no layer would fall back); pipeline degrees up to the number of blocks.
    """
    divisors = _divisors(world_size)
    tensors = [1, *(t for t in divisors if _tensor_fits(profile, t))]
    pipelines = [1, *(p for p in divisors if p <= len(profile.blocks))] if not _pipeline_refusal(profile) else [1]
    return [(p, t) for p in pipelines for t in tensors if world_size % (p * t) == 0]


def _divisors(world_size: int) -> list[int]:
    """The model-parallel degrees a world of ``world_size`` ranks can hold: its divisors above 1."""
    return [d for d in range(2, world_size + 1) if world_size % d == 0]


def _tensor_fits(profile: ModelProfile, degree: int) -> bool:
    if profile.tensor_refusal or any(heads % degree for heads in profile.heads):
        return False
    matrices = [p.shape for p in profile.block_parameters if len(p.shape) == 2 and p.splittable]
    return bool(matrices) and all(dim % degree == 0 for shape in matrices for dim in shape)


def _pipeline_refusal(profile: ModelProfile) -> str:
    """Why pipeline parallelism would refuse the model (empty: it would run)."""
    return profile.pipeline_refusal or ("the model has no repeated trunk" if len(profile.blocks) < 2 else "")


def _left_out(profile: ModelProfile, world_size: int) -> list[str]:
    """Why tensor or pipeline plans are not among the candidates at ``world_size``, in words (nothing: they are)."""
    divisors = _divisors(world_size)
    if not divisors:
        return []
    reasons = []
    if not any(_tensor_fits(profile, t) for t in divisors):
        why = profile.tensor_refusal or (
            f"no degree in {divisors} divides every head count {list(profile.heads)} and every matrix of its blocks"
        )
        reasons.append(f"tensor parallel left out: {why}")
    if why := _pipeline_refusal(profile):
        reasons.append(f"pipeline parallel left out: {why}")
    return reasons


def refusal(profile: ModelProfile, plan: ResolvedPlan) -> str:
    """Why the run would refuse ``plan`` or split nothing of it for this model (empty: it runs as planned)."""
    if plan.pipeline > 1 and (why := _pipeline_refusal(profile)):
        return f"pipeline refused: {why}"
    if plan.tensor > 1 and not _tensor_fits(profile, plan.tensor):
        return f"tensor would fall back: {profile.tensor_refusal or 'heads or matrices not divisible'}"
    return ""


def _pipeline_settings(profile: ModelProfile, pipeline: int, storage: str) -> list[dict[str, Any]]:
    """Micro-batches and schedules for a pipeline degree: the most micro-batches (up to 8) that divide the batch;
    GPipe (no recompute: faster), then 1F1B where it can run (at least as many micro-batches as stages, storage
    not sharded), which recomputes the trunk to hold fewer activations."""
    if pipeline == 1:
        return [{}]
    batch = profile.batch_size or 1
    micro = max(m for m in (1, 2, 4, 8) if batch % m == 0)
    settings = [{"micro_batches": micro, "schedule": "gpipe"}]
    if micro >= pipeline and storage in ("replicated", "optimizer"):
        settings.append({"micro_batches": micro, "schedule": "1f1b"})
    return settings


def _storage_degrees(storage: str, data_parallel: int, ranks_per_node: int) -> list[tuple[int, int]]:
    """``(data, shard)`` splits of the data-parallel ranks for ``storage``: all sharded, or shard inside a node."""
    if storage == "replicated":
        return [(data_parallel, 1)]
    splits = [(1, data_parallel)]
    if ranks_per_node < data_parallel and data_parallel % ranks_per_node == 0:
        splits.append((data_parallel // ranks_per_node, ranks_per_node))  # hybrid: replicate across nodes
    return splits


def choose_plan(
    profile: ModelProfile,
    hardware: HardwareProfile,
    world_size: int,
    ranks_per_node: int | None = None,
    headroom: float | None = None,
    tie_tolerance: float = 0.05,
    corrections: Mapping[str, Correction] | None = None,
    plans: Sequence[ResolvedPlan] | None = None,
) -> PlanReport:
    """The fastest plan whose predicted peak and margin fit one rank's memory, with every other candidate's reason.

    Args:
        profile: from :func:`~parti_lightning.planner.profile.profile_model`.
        hardware: one rank's share of a node.
        world_size: ranks in all.
        ranks_per_node: ranks sharing a node (default: all of them, one node).
        headroom: fraction of the memory budget kept free, on top of each prediction's margin (for what the
            model does not see: a dataloader's memory, logging); default :func:`default_headroom`.
        tie_tolerance: plans within this fraction of the fastest time count as tied; the simplest
            of them (lower ZeRO stage, then no checkpointing) wins, since it has less to go wrong.
        corrections: measured over predicted memory and time by plan kind, from earlier runs on this
            machine (:func:`~parti_lightning.planner.calibration.load`); each candidate's prediction is
            multiplied by its kind's.
        plans: the resolved plans to weigh, simplest first (ties go to the earliest); default: every plan the
            model and the world allow (:func:`candidate_plans`).

    Returns:
        the report; ``report.chosen`` is resolved for ``world_size``.

    Raises:
        NoPlanFits: even the smallest predicted footprint exceeds the usable budget.
        PlanError: a world size or headroom that makes no sense.
    """
    ranks_per_node = ranks_per_node or world_size
    headroom = default_headroom(hardware.device_type) if headroom is None else headroom
    if not 0 <= headroom < 1:
        raise PlanError(f"headroom={headroom!r} is invalid: give the fraction of memory kept free, in [0, 1).")
    if world_size < 1 or ranks_per_node < 1 or world_size % ranks_per_node and world_size > ranks_per_node:
        raise PlanError(f"world size {world_size} is not a multiple of {ranks_per_node} ranks per node.")
    from parti_lightning.planner.calibration import corrected, plan_kind

    usable = int(hardware.memory_bytes * (1 - headroom))
    corrections = corrections or {}
    plans = list(plans) if plans is not None else candidate_plans(profile, world_size, ranks_per_node)
    predicted = [(plan, corrected(estimate(profile, hardware, plan, ranks_per_node), corrections.get(plan_kind(plan))))
                 for plan in plans]
    used = {kind: corrections[kind] for kind in dict.fromkeys(plan_kind(plan) for plan in plans) if kind in corrections}
    refused = {id(plan): why for plan in plans if (why := refusal(profile, plan))}
    fitting = [(plan, est) for plan, est in predicted if est.needed_bytes <= usable and id(plan) not in refused]
    reasons = _left_out(profile, world_size)
    if not fitting:
        raise NoPlanFits(_no_fit_message(profile, hardware, predicted, usable, world_size, ranks_per_node, headroom)
                         + "".join(f" {why.capitalize()}." for why in reasons))
    # Seconds per sample: a step of a plan with fewer data-parallel ranks (tensor, pipeline) trains fewer samples.
    # Every plan competes on it (tensor plans pay DTensor's dispatch, measured); the candidates come simplest
    # first, data-parallel before model-parallel, so a tie goes to the simpler.
    fastest = min(_per_sample(p, e) for p, e in fitting)
    chosen, chosen_est = next((p, e) for p, e in fitting if _per_sample(p, e) <= fastest * (1 + tie_tolerance))
    chosen_rate = _per_sample(chosen, chosen_est)
    candidates = tuple(
        Candidate(plan, est, est.needed_bytes <= usable and id(plan) not in refused,
                  refused.get(id(plan)) or _reason(plan is chosen, _per_sample(plan, est) / chosen_rate
                                                   if chosen_rate else 1.0, est, usable, tie_tolerance),
                  plan is chosen)
        for plan, est in predicted
    )
    return PlanReport(chosen, candidates, hardware.memory_bytes, headroom, profile, hardware, world_size,
                      (*profile.notes, *reasons), used)


def _model_parallel(plan: ResolvedPlan) -> bool:
    return plan.tensor > 1 or plan.pipeline > 1


def _per_sample(plan: ResolvedPlan, est: Estimate) -> float:
    return est.seconds / plan.data_parallel_size


def _reason(is_chosen: bool, ratio: float, est: Estimate, usable: int, tolerance: float) -> str:
    """Why a candidate was or was not chosen; ``ratio``: its time per sample over the chosen plan's."""
    if is_chosen:
        return "chosen: the fastest that fits"
    if est.needed_bytes > usable:
        return f"needs {est.needed_bytes / GIB:.2f} GiB{_margin_words(est)} > usable {usable / GIB:.2f} GiB"
    if ratio <= 1 + tolerance:
        return f"as fast ({ratio:.2f}×), less simple"
    return f"slower: {ratio:.2f}× the chosen per sample"


def _no_fit_message(profile: ModelProfile, hardware: HardwareProfile, predicted: list[tuple[PartitionPlan, Estimate]],
                    usable: int, world_size: int, ranks_per_node: int, headroom: float) -> str:
    plan, smallest = min(predicted, key=lambda item: item[1].needed_bytes)
    label = f"storage={plan.storage}, activation_checkpointing={plan.activation_checkpointing}"
    hints = [f"more memory per rank (at least {smallest.needed_bytes / (1 - headroom) / GIB:.2f} GiB"
             f" at headroom {headroom:g})"]
    found = _ranks_that_fit(profile, hardware, usable, world_size, ranks_per_node)
    if found:
        ranks, plan_there = found
        hints.append(f"more ranks ({ranks} would fit, with {_describe(plan_there)})")
    model_parallel = [(est.peak_bytes, p) for p, est in predicted if _model_parallel(p)]
    if not model_parallel and len(profile.blocks) < 2 and world_size > 1:
        hints.append("a model with repeated blocks parti can split (tensor or pipeline parallelism found none here)")
    activations = smallest.memory.get("activations", 0)
    if activations:
        hints.append(f"a smaller batch (activations are {activations / GIB:.2f} GiB of it, about proportional"
                     " to the batch size)")
    return (
        f"no plan fits {profile.name} in {usable / GIB:.2f} GiB per rank ({hardware.memory_bytes / GIB:.2f} GiB budget"
        f" less {headroom:.0%} headroom) at world size {world_size}: the smallest, {label}, needs"
        f" {smallest.needed_bytes / GIB:.2f} GiB per rank{_margin_words(smallest)}. It would fit with "
        + ", or ".join(hints) + "."
    )


def _margin_words(est: Estimate) -> str:
    """What of ``est``'s needed memory is its margin, in words (nothing where it has none)."""
    if not est.margin_bytes:
        return ""
    return f" (a peak of {est.peak_bytes / GIB:.2f} GiB predicted, and {est.margin_bytes / GIB:.2f} GiB margin)"


def _ranks_that_fit(profile: ModelProfile, hardware: HardwareProfile, usable: int, world_size: int,
                    ranks_per_node: int) -> tuple[int, ResolvedPlan] | None:
    """The smallest larger world (doubling) where some plan fits, and the smallest-footprint plan there."""
    world = world_size * 2
    while world <= _MAX_WORLD_HINT:
        nodes_of = min(world, ranks_per_node)
        fits = [(est.peak_bytes, plan) for plan in candidate_plans(profile, world, nodes_of)
                if (est := estimate(profile, hardware, plan, nodes_of)).needed_bytes <= usable]
        if fits:
            return world, min(fits, key=lambda item: item[0])[1]
        world *= 2
    return None


def _describe(plan: ResolvedPlan) -> str:
    """A plan in the words of the table: its label and its mesh."""
    label = Candidate(plan, Estimate({}, 0, {}), fits=True).label
    return f"{label}, mesh {plan.pipeline}×{plan.data}×{plan.shard}×{plan.tensor} (p×d×s×t)"
