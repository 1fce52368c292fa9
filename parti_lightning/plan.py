"""The partition plan: how one training step is split across a mesh of devices.

Pure data and validation; nothing here touches ``torch.distributed``, so plans can be built,
checked and printed before any process is launched.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args

Storage = Literal["replicated", "optimizer", "gradients", "parameters"]
Offload = Literal["none", "cpu"]
ActivationCheckpointing = Literal["none", "blocks", "auto"]
Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]
# Schedules under which a rank holds several stages (torch's PipelineScheduleMulti).
INTERLEAVED_SCHEDULES = ("interleaved-1f1b",)
Degree = Union[int, Literal["auto"]]
ShardDegree = Union[int, Literal["auto", "node"]]
TensorStyle = Literal["colwise", "rowwise", "replicate"]


class MeshAxis(str, enum.Enum):
    """Names of the device-mesh axes, in the order plans are written and printed.

    The mesh itself is laid out in another order (pipeline outermost, tensor innermost): see
    :data:`parti_lightning.mesh.MESH_ORDER`.
    """

    DATA = "data"
    SHARD = "shard"
    TENSOR = "tensor"
    PIPELINE = "pipeline"

    def __str__(self) -> str:
        return self.value


class PlanError(ValueError):
    """A plan that cannot run, with the field at fault and what to do about it."""


# ZeRO stage of each storage level, as users of DeepSpeed know them.
ZERO_STAGE: dict[str, int] = {"replicated": 0, "optimizer": 1, "gradients": 2, "parameters": 3}


@dataclass(frozen=True)
class PartitionPlan:
    """How the compute and the storage of a training step are partitioned.

    Args:
        data: degree of the ``data`` axis (ranks that replicate the model state), or ``"auto"``
            for whatever the other axes leave of the world size.
        shard: degree of the ``shard`` axis (ranks that split parameters, gradients or optimizer
            state between them), ``"auto"``: the whole data-parallel width when ``storage`` shards
            something, else 1; or ``"node"``: the ranks of one node (hybrid sharding: shard inside a
            node over its fast links, replicate across nodes).
        tensor: degree of the ``tensor`` axis: ranks that split each layer's weight matrices (and see the
            same batch); ``"auto"``: the ranks that ``data``, ``shard`` and ``pipeline`` (all fixed) leave.
        pipeline: degree of the ``pipeline`` axis: consecutive stages of the trunk of repeated blocks, one per
            rank (which see the same batch); ``"auto"``: the ranks that ``data``, ``shard`` and ``tensor``
            (all fixed) leave.
        storage: what is sharded over the ``shard`` axis: ``"replicated"`` (ZeRO-0, plain data
            parallel), ``"optimizer"`` (ZeRO-1), ``"gradients"`` (ZeRO-2), ``"parameters"`` (ZeRO-3).
        offload: ``"cpu"`` keeps sharded storage in host memory between uses (GPU runs only).
        activation_checkpointing: ``"blocks"`` recomputes the activations of each repeated block
            in the backward pass instead of storing them.
        micro_batches: with ``pipeline > 1``, how many micro-batches the trunk splits each batch into; must
            divide the batch each data-parallel rank gets.
        schedule: with ``pipeline > 1``, the training schedule. ``"gpipe"``: every micro-batch forward, then
            every backward, the forward's activations kept between them (no recompute: the faster).
            ``"1f1b"`` (needs ``micro_batches >= pipeline``): the backward re-runs the trunk's forward
            under 1F1B, so that no activations are kept between forward and backward and at most
            ``pipeline`` micro-batches' are in flight (the smaller; one extra trunk forward per step).
            ``"interleaved-1f1b"``: 1F1B with ``stages_per_rank`` stages per rank (rank ``r`` holds stages
            ``r, r + pipeline, ...``), which divides the bubble by about ``stages_per_rank`` for more
            point-to-point sends; recomputes like ``"1f1b"``.
        stages_per_rank: with an interleaved schedule, the stages each rank holds (default 2).
        pipeline_cuts: with ``pipeline > 1``, the block names (as in ``named_modules``) where stages 2, 3,
            ... start; ``None`` balances the stages by parameter count.
        sharding_units: module names (as in ``named_modules``) to shard as units; ``None`` finds
            repeated blocks automatically.
        tensor_rules: with ``tensor > 1``, how to split layers: ``fnmatch`` patterns over
            ``named_modules()`` names to ``"colwise"``, ``"rowwise"`` or ``"replicate"``; ``None`` takes
            the model's own plan (a Hugging Face ``tp_plan``) or finds rules from each block's structure.
            Every rule set is checked on a real batch before training; one that changes the function
            falls back (see the README).
    """

    data: Degree = "auto"
    shard: ShardDegree = "auto"
    tensor: Degree = 1
    pipeline: Degree = 1
    storage: Storage = "replicated"
    offload: Offload = "none"
    activation_checkpointing: ActivationCheckpointing = "none"
    micro_batches: int = 1
    schedule: Schedule = "gpipe"
    stages_per_rank: int | None = None
    pipeline_cuts: tuple[str, ...] | None = field(default=None)
    sharding_units: tuple[str, ...] | None = field(default=None)
    tensor_rules: tuple[tuple[str, TensorStyle], ...] | None = field(default=None)

    def __post_init__(self) -> None:
        # In this order, so that a plan with several faults is refused for the same one first.
        self._check_degrees()
        self._check_auto_axes()
        check_pipeline_settings(None, self.pipeline, micro_batches=self.micro_batches, schedule=self.schedule,
                                stages_per_rank=self.stages_per_rank)
        self._check_pipeline_fields()
        self._check_options()
        self._check_names("pipeline_cuts", "block names")
        self._check_storage()
        self._check_names("sharding_units", "module names")
        self._check_tensor_rules()

    def _check_degrees(self) -> None:
        """Every axis degree a positive integer or ``"auto"`` (``shard`` also ``"node"``)."""
        for name in ("data", "shard"):
            value = getattr(self, name)
            if value == "auto" or (name == "shard" and value == "node"):
                continue
            if not _is_int(value) or value < 1:
                extra = ", 'auto' or 'node'" if name == "shard" else " or 'auto'"
                raise PlanError(f"plan.{name}={value!r} is invalid: use a positive integer{extra}.")
        for name in ("tensor", "pipeline"):
            value = getattr(self, name)
            if value != "auto" and (not _is_int(value) or value < 1):
                raise PlanError(f"plan.{name}={value!r} is invalid: use a positive integer or 'auto'.")

    def _check_auto_axes(self) -> None:
        """An ``"auto"`` tensor or pipeline degree needs every other axis fixed (and is one of them only)."""
        if self.tensor == "auto" and self.pipeline == "auto":
            raise PlanError("plan.tensor and plan.pipeline cannot both be 'auto': give one of them as a number.")
        for name in ("tensor", "pipeline"):
            fixed_shard = _is_int(self.shard) or (self.shard == "auto" and self.storage == "replicated")
            if getattr(self, name) == "auto" and not (_is_int(self.data) and fixed_shard):
                raise PlanError(
                    f"plan.{name}='auto' takes the ranks the other axes leave: give data and shard as numbers"
                    f" (got data={self.data!r}, shard={self.shard!r})."
                )

    def _check_pipeline_fields(self) -> None:
        """Pipeline-only fields (``micro_batches``, ``pipeline_cuts``) need a pipeline."""
        cuts = "pipeline_cuts" if self.pipeline_cuts is not None else None
        name = "micro_batches" if self.micro_batches > 1 else cuts
        if self.pipeline == 1 and name is not None:
            raise PlanError(
                f"plan.{name}={getattr(self, name)!r} only applies to pipeline parallelism, but plan.pipeline=1: set"
                " pipeline > 1, or drop the field."
            )

    def _check_options(self) -> None:
        """Storage, offload and checkpointing among their choices."""
        _check_choice("storage", self.storage, Storage)
        _check_choice("offload", self.offload, Offload)
        _check_choice("activation_checkpointing", self.activation_checkpointing, ActivationCheckpointing)

    def _check_names(self, name: str, what: str) -> None:
        """``pipeline_cuts`` or ``sharding_units``: ``None`` or non-empty strings, kept as a tuple."""
        names = getattr(self, name)
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise PlanError(f"plan.{name}={names!r} is invalid: give a list of {what}.")
            object.__setattr__(self, name, tuple(names))

    def _check_storage(self) -> None:
        """A shard axis with something to shard; offload to CPU of sharded parameters only."""
        if self.storage == "replicated" and _is_int(self.shard) and self.shard > 1:
            raise PlanError(
                f"plan.shard={self.shard} with plan.storage='replicated' shards nothing: set storage to"
                " 'optimizer', 'gradients' or 'parameters', or drop shard."
            )
        if self.offload == "cpu" and self.storage == "replicated":
            raise PlanError(
                "plan.offload='cpu' needs sharded storage to offload, but plan.storage='replicated' shards"
                " nothing: set storage='parameters' (ZeRO-3) or offload='none'."
            )
        if self.offload == "cpu" and self.storage != "parameters":
            raise PlanError(
                f"plan.offload='cpu' is supported with storage='parameters' only (got storage={self.storage!r}):"
                " set storage='parameters' or offload='none'."
            )

    def _check_tensor_rules(self) -> None:
        """``tensor_rules`` pairs of a pattern and a style, kept as a tuple, and only with ``tensor > 1``."""
        if self.tensor_rules is not None:
            object.__setattr__(self, "tensor_rules", _tensor_rules(self.tensor_rules))
            if self.tensor == 1:
                raise PlanError("plan.tensor_rules is set but plan.tensor=1 splits nothing: set tensor > 1.")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_value(cls, value: PlanLike) -> PartitionPlan:
        """A plan from a preset name, a mapping (optionally ``{"preset": name, **overrides}``) or a plan."""
        if isinstance(value, PartitionPlan):
            return value
        if isinstance(value, str):
            return preset(value)
        if isinstance(value, Mapping):
            fields = dict(value)
            base = preset(fields.pop("preset")) if "preset" in fields else cls()
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(fields) - known)
            if unknown:
                raise PlanError(f"unknown plan field(s) {unknown}: valid fields are {sorted(known)}.")
            for name in ("sharding_units", "pipeline_cuts"):
                if isinstance(fields.get(name), list):
                    fields[name] = tuple(fields[name])
            plan = dataclasses.replace(base, **fields)
            plan.check_implemented()
            return plan
        raise PlanError(
            f"plan={value!r} is invalid: give a preset name ({', '.join(PRESETS)}), 'auto',"
            " or a mapping of plan fields."
        )

    def check_implemented(self) -> None:
        """Raise ``NotImplementedError`` for a valid plan that parti cannot run yet.

        Separate from validation so that the mesh and the planner can reason about such plans; every
        path from a user's plan to a run calls it before anything is launched.
        """
        if self.tensor != 1 and self.storage == "optimizer":
            raise NotImplementedError(
                f"plan.tensor={self.tensor} with storage='optimizer': ZeRO-1 on top of tensor parallelism is not"
                " implemented yet (its optimizer broadcasts whole parameters, which tensor-parallel ones are not);"
                " use storage='gradients' (ZeRO-2) or 'parameters' (ZeRO-3), which shard the optimizer state too."
            )
        if self.pipeline != 1 and self.storage in ("gradients", "parameters") and self.schedule != "gpipe":
            raise NotImplementedError(
                f"plan.pipeline={self.pipeline} with storage={self.storage!r} runs schedule='gpipe' only: under 1F1B a"
                " stage's forward passes come between its backward passes, which FSDP (torch 2.13) takes for"
                " activation-checkpointing recomputation and then skips a micro-batch's gradient reduction; set"
                " schedule='gpipe'."
            )
        if self.pipeline != 1 and self.storage == "optimizer" and self.schedule in INTERLEAVED_SCHEDULES:
            raise NotImplementedError(
                f"plan.pipeline={self.pipeline} with storage='optimizer' under schedule={self.schedule!r} is not"
                " implemented yet (never run); use schedule='gpipe' or '1f1b' with ZeRO-1."
            )
        if self.pipeline != 1 and self.tensor != 1 and self.schedule in INTERLEAVED_SCHEDULES:
            raise NotImplementedError(
                f"plan.pipeline={self.pipeline} × tensor={self.tensor} under schedule={self.schedule!r} is not"
                " implemented yet (never run); use schedule='gpipe' or '1f1b' with tensor parallelism."
            )
        if self.pipeline != 1 and self.tensor != 1 and self.storage != "replicated":
            raise NotImplementedError(
                f"plan.pipeline={self.pipeline} × tensor={self.tensor} with storage={self.storage!r}: all three"
                " together are not implemented yet (each pair is); drop one of them."
            )

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that ``from_value`` turns back into this plan (YAML/JSON friendly)."""
        out = dataclasses.asdict(self)
        for name in ("sharding_units", "pipeline_cuts"):
            if out[name] is not None:
                out[name] = list(out[name])
        if out["tensor_rules"] is not None:
            out["tensor_rules"] = {pattern: style for pattern, style in self.tensor_rules or ()}
        return out

    # ---------------------------------------------------------------- resolution

    def resolve(self, world_size: int, ranks_per_node: int | None = None) -> ResolvedPlan:
        """The same plan with every ``"auto"``/``"node"`` degree replaced by a number that fits ``world_size``."""
        if not _is_int(world_size) or world_size < 1:
            raise PlanError(f"world size {world_size!r} is invalid: it must be a positive integer.")
        if self.shard == "node":
            if ranks_per_node is None:
                raise PlanError("plan.shard='node' needs the number of ranks per node to resolve.")
            return dataclasses.replace(self, shard=ranks_per_node).resolve(world_size)
        for name in ("tensor", "pipeline"):
            if getattr(self, name) == "auto":
                return dataclasses.replace(self, **{name: self._axis_left(name, world_size)}).resolve(world_size)
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise PlanError(
                f"mesh tensor={self.tensor} × pipeline={self.pipeline} = {model_parallel} does not divide"
                f" world size {world_size}."
            )
        dp = world_size // model_parallel
        data, shard = self.data, self.shard
        if shard == "auto":
            if self.storage == "replicated":
                shard = 1
            else:
                shard = dp if data == "auto" else _exact(dp, data, "data", world_size)
        if data == "auto":
            data = _exact(dp, shard, "shard", world_size)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        resolved = ResolvedPlan(**{**fields, "data": data, "shard": shard})
        resolved.check_world_size(world_size)
        return resolved

    def _axis_left(self, name: str, world_size: int) -> int:
        """The degree of the ``"auto"`` model-parallel axis ``name``: the ranks the fixed axes leave."""
        shard = 1 if self.shard == "auto" and self.storage == "replicated" else self.shard
        other_axis = "pipeline" if name == "tensor" else "tensor"
        # `__post_init__` refused an "auto" axis unless data and shard are numbers here.
        other = self.data * shard * getattr(self, other_axis)  # type: ignore[operator]
        if world_size % other:
            raise PlanError(
                f"plan.{name}='auto': data={self.data} × shard={shard} × {other_axis}={getattr(self, other_axis)} ="
                f" {other} does not divide world size {world_size}."
            )
        return world_size // other

    def check_world_size(self, world_size: int) -> None:
        """Raise if the resolved mesh does not multiply out to ``world_size``."""
        if not isinstance(self, ResolvedPlan):
            raise PlanError("plan has 'auto' degrees: call plan.resolve(world_size) first.")
        product = self.data * self.shard * self.tensor * self.pipeline
        if product != world_size:
            raise PlanError(f"mesh {self.mesh_description()} = {product} does not match world size {world_size}.")

    @property
    def is_resolved(self) -> bool:
        return isinstance(self, ResolvedPlan)

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Axis name to degree, in :class:`MeshAxis` order (resolved plans only)."""
        raise PlanError("plan has 'auto' degrees: call plan.resolve(world_size) first.")

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different batches: data × shard (resolved plans only)."""
        raise PlanError("plan has 'auto' degrees: call plan.resolve(world_size) first.")

    @property
    def zero_stage(self) -> int:
        return ZERO_STAGE[self.storage]

    def mesh_description(self) -> str:
        return " × ".join(f"{a.value}={getattr(self, a.value)}" for a in MeshAxis)

    @property
    def virtual_stages(self) -> int:
        """Stages per pipeline rank: ``stages_per_rank``, by default 2 under an interleaved schedule, else 1."""
        if self.stages_per_rank is not None:
            return self.stages_per_rank
        return 2 if self.schedule in INTERLEAVED_SCHEDULES else 1

    def describe(self) -> str:
        """One line for logs: mesh, storage and the options that are on."""
        parts = [self.mesh_description(), f"storage={self.storage} (ZeRO-{self.zero_stage})"]
        if self.tensor_rules is not None:
            parts.append(f"tensor_rules={dict(self.tensor_rules)}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        if self.activation_checkpointing != "none":
            parts.append(f"activation_checkpointing={self.activation_checkpointing}")
        if self.pipeline != 1:
            parts.append(f"micro_batches={self.micro_batches}, schedule={self.schedule}")
            if self.schedule in INTERLEAVED_SCHEDULES:
                parts.append(f"stages_per_rank={self.virtual_stages}")
            if self.pipeline_cuts is not None:
                parts.append(f"pipeline_cuts={list(self.pipeline_cuts)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ResolvedPlan(PartitionPlan):
    """A plan whose degrees are fixed numbers for one world size: what :meth:`PartitionPlan.resolve` returns.

    Everything that runs a plan (the mesh, ``parallelize``, the planner's cost model) takes this type,
    so the degrees it reads are integers and checked as such.
    """

    data: int = 1
    shard: int = 1
    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("data", "shard", "tensor", "pipeline"):
            if not _is_int(getattr(self, name)):
                raise PlanError(f"a resolved plan needs an integer {name} degree, got {getattr(self, name)!r}.")

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {str(a): getattr(self, a.value) for a in MeshAxis}

    @property
    def data_parallel_size(self) -> int:
        return self.data * self.shard


def check_pipeline_settings(
    num_blocks: int | None, num_stages: Degree, *, micro_batches: int, batch_size: int | None = None,
    schedule: str = "gpipe", stages_per_rank: int | None = 1,
) -> None:
    """Refuse pipeline settings that cannot run: the one place these rules live.

    Pure (no model, no process group), so it runs before anything is launched: a plan checks itself with it
    before the model is known, and the pipeline again once it knows the trunk's ``num_blocks``, split over
    ``num_stages`` ranks, and the ``batch_size`` each data-parallel rank's step gets. What is not known yet is
    not checked: ``num_blocks`` or ``batch_size`` ``None``, ``num_stages`` ``"auto"``, ``stages_per_rank``
    ``None`` (the schedule's default).

    Raises:
        PlanError: ``micro_batches < 1``, an unknown schedule, ``stages_per_rank`` other than 1 for a
            non-interleaved schedule (below 2 for an interleaved one), more stages than blocks, micro-batches
            not in whole rounds of the ranks (interleaved), fewer than stages (1F1B), or not dividing the batch.
    """
    if not _is_int(micro_batches) or micro_batches < 1:
        raise PlanError(f"plan.micro_batches={micro_batches!r} is invalid: use an integer of at least 1.")
    if schedule not in get_args(Schedule):
        raise PlanError(
            f"plan.schedule={schedule!r} is invalid: unknown pipeline schedule; choose one of"
            f" {', '.join(map(repr, get_args(Schedule)))}."
        )
    interleaved = schedule in INTERLEAVED_SCHEDULES
    if stages_per_rank is not None:
        if not _is_int(stages_per_rank) or stages_per_rank < 1:
            raise PlanError(f"plan.stages_per_rank={stages_per_rank!r} is invalid: use a positive integer.")
        if interleaved and stages_per_rank < 2 or not interleaved and stages_per_rank != 1:
            raise PlanError(
                f"plan.stages_per_rank={stages_per_rank} with schedule={schedule!r}: an interleaved"
                " schedule holds 2 or more stages per rank, the others 1."
            )
    if num_blocks is None or not _is_int(num_stages) or stages_per_rank is None:
        return
    if num_stages * stages_per_rank > num_blocks:
        stages = f"{num_stages} × {stages_per_rank} stages" if interleaved else f"{num_stages} stages"
        raise PlanError(
            f"pipeline={num_stages}: {stages} but the trunk has only {num_blocks} blocks: every stage needs at least"
            " one block; use fewer stages."
        )
    if interleaved:
        rounds = max(1, micro_batches // num_stages)
        if micro_batches % rounds:
            raise PlanError(
                f"schedule {schedule!r} runs micro-batches in rounds of {num_stages} (the ranks): micro_batches="
                f"{micro_batches} is not a multiple of its {rounds} rounds; use a multiple of {num_stages}."
            )
    if schedule == "1f1b" and micro_batches < num_stages:
        raise PlanError(
            f"schedule '1f1b' needs at least as many micro-batches as stages, got micro_batches={micro_batches} for"
            f" pipeline={num_stages}; raise micro_batches (at least {num_stages}) or use schedule='gpipe'."
        )
    if batch_size is not None and batch_size % micro_batches:
        raise PlanError(
            f"micro_batches={micro_batches} does not divide the batch of {batch_size} each data-parallel rank gets;"
            " choose a divisor of the batch size."
        )


def _tensor_rules(value: Any) -> tuple[tuple[str, TensorStyle], ...]:
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        rules = tuple((pattern, style) for pattern, style in pairs)
    except (TypeError, ValueError):
        raise PlanError(
            f"plan.tensor_rules={value!r} is invalid: give a mapping of module-name patterns to"
            " 'colwise', 'rowwise' or 'replicate'."
        ) from None
    for pattern, style in rules:
        if not isinstance(pattern, str) or not pattern:
            raise PlanError(f"plan.tensor_rules: pattern {pattern!r} is invalid: give a module-name pattern.")
        _check_choice(f"tensor_rules[{pattern!r}]", style, TensorStyle)
    return rules


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _exact(total: int, part: Any, name: str, world_size: int) -> int:
    if total % part:
        raise PlanError(
            f"plan.{name}={part} does not divide the {total} data-parallel ranks of world size {world_size}:"
            f" choose a divisor of {total}."
        )
    return total // part


def _check_choice(name: str, value: Any, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise PlanError(f"plan.{name}={value!r} is invalid: choose one of {', '.join(map(repr, allowed))}.")


PlanLike = Union[str, Mapping[str, Any], PartitionPlan]

PRESETS: dict[str, PartitionPlan] = {
    "ddp": PartitionPlan(storage="replicated"),
    "zero1": PartitionPlan(storage="optimizer"),
    "zero2": PartitionPlan(storage="gradients"),
    "zero3": PartitionPlan(storage="parameters"),
    # Every rank splits every layer (no data parallelism); combine with data for 2-D, e.g. {"preset": "tp", "data": 2,
    # "tensor": 2}.
    "tp": PartitionPlan(data=1, tensor="auto"),
    # Every rank holds one stage of the trunk; 4 micro-batches per batch (1F1B needs at least one per stage).
    "pp": PartitionPlan(data=1, pipeline="auto", micro_batches=4),
    # Shard inside each node, replicate across nodes (HSDP). On one node it is zero3.
    "hybrid": PartitionPlan(storage="parameters", shard="node"),
}
# "auto" asks the planner, which needs the module and a batch: `PartiStrategy` runs it in `setup`. As a
# plain plan value (before launch, or outside a strategy) it stands for replicated data parallel.
AUTO = "auto"


def preset(name: str) -> PartitionPlan:
    """The plan of a preset name (case-insensitive), e.g. ``"zero3"``."""
    key = name.strip().lower()
    if key == AUTO:
        return PRESETS["ddp"]
    if key not in PRESETS:
        raise PlanError(f"unknown plan {name!r}: choose one of {', '.join([AUTO, *PRESETS])}, or give a mapping.")
    return PRESETS[key]
