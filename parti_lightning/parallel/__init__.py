"""Applying a plan: :func:`parallelize` composes the techniques, each a set of plain functions in its own file.

The order is fixed, and each step has a reason to come where it does:

1. pipeline split: decides which blocks this rank holds at all (the others' parameters are freed), so
   every later step touches only those; the trunk then runs pipelined whenever the forward calls it;
2. tensor parallel: replaces a layer's weights by tensor-axis shards (``DTensor`` parameters), checked on
   a real batch first; everything after it sees the parameters it leaves;
3. activation checkpointing: wraps whole blocks before FSDP, so the recomputation runs inside each
   unit's backward, after FSDP has gathered that unit's parameters for it;
4. storage: FSDP (ZeRO-2/3) replaces every parameter with a sharded one, so it comes after everything
   that reads or replaces parameters and before the optimizers are built; or, for whole parameters
   (replicated, ZeRO-1), gradient averaging over the data-parallel ranks;
5. compilation (when the user compiled the model): each block's ``forward`` on its own, last, so it
   compiles the code the user wrote on what the plan made of it, with parti's hooks left eager.

Nothing here imports Lightning: the strategy adapts what :func:`parallelize` returns to Lightning's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from parti_lightning.mesh import ParallelMesh
from parti_lightning.parallel.activation_checkpoint import apply_activation_checkpointing
from parti_lightning.parallel.blocks import find_blocks, resolve_units
from parti_lightning.parallel.compile import TENSOR_PARALLEL_EAGER, compile_blocks
from parti_lightning.parallel.data import GradientSynchronizer
from parti_lightning.parallel.norm import clip_grad_norm_
from parti_lightning.parallel.pipeline import PipelineParallel, apply_pipeline, check_pipeline_settings
from parti_lightning.parallel.storage import (
    apply_storage,
    root_free_units,
    shard_optimizer,
    shard_outside_trunk,
    storage_exempt_parameters,
)
from parti_lightning.parallel.tensor import (
    TensorParallelReport,
    apply_tensor_parallel,
    tensor_parallel_step,
    validate_tensor_rules,
)
from parti_lightning.plan import ResolvedPlan

# Set on a module that tensor or pipeline parallelism changed in place (its split cannot be applied twice).
_APPLIED = "_parti_model_parallel"

__all__ = [
    "Parallelized", "check_module", "holds_part_of_the_model", "holds_sharded_tensors", "parallelize",
    "shards_module", "steps_through_root",
]


def shards_module(plan: ResolvedPlan) -> bool:
    """ZeRO-2/3 with more than one shard: FSDP owns the parameters and reduces the gradients."""
    return plan.storage in ("gradients", "parameters") and plan.shard > 1


def shards_optimizer(plan: ResolvedPlan) -> bool:
    """ZeRO-1 with more than one shard: each rank steps the optimizer for its own parameters."""
    return plan.storage == "optimizer" and plan.shard > 1


def steps_through_root(module: nn.Module) -> bool:
    """Whether a step must run through ``module.__call__``: FSDP sharded the root (ZeRO-2/3, automatic
    optimization), and gathers the root's parameters in hooks around its ``forward`` only.

    Read from the module, not the plan, so it holds after ``fit`` too (``validate`` on a sharded module).
    """
    return isinstance(module, FSDPModule)


def holds_sharded_tensors(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (a shard), whatever the plan that made it one."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def holds_part_of_the_model(module: nn.Module) -> bool:
    """Whether this rank's module lacks parameters other ranks hold (a pipeline stage, or a tensor-parallel split)."""
    return bool(getattr(module, _APPLIED, False))


@dataclass
class Parallelized:
    """What the strategy needs to run a step of a module that :func:`parallelize` applied a plan to.

    Attributes:
        module: the module, changed in place; this rank's part of it.
        plan: the plan applied.
        gradient_sync: averages whole gradients over the data-parallel ranks after backward
            (replicated and ZeRO-1); ``None`` where FSDP reduces them, or with one data-parallel rank.
        optimizer_shard_group: the ranks that split the optimizer state (ZeRO-1), else ``None``.
        tensor_report: what tensor parallelism split and what fell back, with ``tensor > 1``.
        pipeline: this rank's stage of the pipelined trunk, with ``pipeline > 1``.
        compile_note: what ``compiler`` did (blocks compiled, and which stayed eager), when one was given.
        mixes_tensor_kinds: whether the parameters are a mix of ``DTensor`` and plain tensors (see
            :meth:`step_context`); found once, when the plan is applied.
    """

    module: nn.Module
    plan: ResolvedPlan
    gradient_sync: GradientSynchronizer | None = None
    optimizer_shard_group: ProcessGroup | None = field(default=None, repr=False)
    tensor_report: TensorParallelReport | None = None
    pipeline: PipelineParallel | None = None
    compile_note: str = ""
    mixes_tensor_kinds: bool = False

    def describe(self) -> list[str]:
        """What model parallelism did to the module, for the log: tensor layouts, pipeline stages."""
        lines = []
        if self.tensor_report is not None:
            lines.append(self.tensor_report.describe())
        if self.compile_note:
            lines.append(self.compile_note)
        if self.pipeline is not None:
            stages = "; ".join(f"stage {i}: {', '.join(names)}" for i, names in enumerate(self.pipeline.stages))
            p, v, m = self.pipeline.num_ranks, self.plan.virtual_stages, self.plan.micro_batches
            bubble = (p - 1) / (v * m + p - 1)
            lines.append(
                f"pipeline: {self.pipeline.num_stages} stages on {p} ranks, {m} micro-batches,"
                f" {self.plan.schedule} (predicted bubble {bubble:.0%} of each pass): {stages}"
            )
        return lines

    def step_context(self) -> Any:
        """The context backward passes, optimizer steps and gradient clipping run in.

        Under tensor parallelism the parameters are a mix of sharded ``DTensor`` and plain tensors, which
        torch's foreach optimizers and ``clip_grad_norm_`` cannot take together; in this context they can,
        and the norm is the global one. A backward pass needs it too: autograd runs every node with the
        thread state of the ``backward()`` call, and the backward of a block's ops mixes the plain tensors its
        forward created (a causal mask) with DTensors, as its forward did under implicit replication.

        Under pipeline parallelism the parameters outside the trunk are sharded (``DTensor``) and the stage's
        blocks may be whole: a foreach optimizer (``foreach=True``) gets both in one list.
        """
        return tensor_parallel_step() if self.mixes_tensor_kinds else nullcontext()

    def sync_gradients(self) -> None:
        """After a backward pass: average the gradients it produced (a no-op where FSDP does it)."""
        if self.gradient_sync is not None:
            self.gradient_sync.sync()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate local gradients without reducing them (gradient accumulation steps)."""
        # Both can be on: FSDP reduces the gradients it shards, the synchronizer those it left whole.
        with self.gradient_sync.no_sync() if self.gradient_sync is not None else nullcontext():
            if isinstance(self.module, FSDPModule):
                # FSDP: accumulate unsharded local gradients, reduce-scatter at the boundary step.
                self.module.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    self.module.set_requires_gradient_sync(True)
            else:
                yield

    def clip_grad_norm_(self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip gradients in place by the norm of the whole model's gradients, and return that norm.

        The drop-in for ``torch.nn.utils.clip_grad_norm_`` under model parallelism: the norm counts every
        pipeline stage's blocks and each split parameter whole, and works over parameters on several
        meshes (tensor parallelism with sharded storage). Every rank must call it.
        """
        if self.pipeline is not None:
            return self.pipeline.clip_grad_norm_(parameters, max_norm, norm_type)
        return clip_grad_norm_(parameters, max_norm, norm_type)

    def wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer that steps under this plan: ZeRO-1's sharded one, else ``optimizer`` itself.

        Re-point LR schedulers built on ``optimizer`` at the result
        (:func:`~parti_lightning.parallel.storage.retarget_lr_scheduler`).
        """
        if self.optimizer_shard_group is None:
            return optimizer
        return shard_optimizer(optimizer, self.optimizer_shard_group)

    def remove(self) -> None:
        """Remove the hooks the plan put on the module's parameters (the sharding itself stays)."""
        if self.gradient_sync is not None:
            self.gradient_sync.remove()
            self.gradient_sync = None


def check_module(module: nn.Module, plan: ResolvedPlan, *, automatic_optimization: bool = True) -> None:
    """Checks of ``plan`` against ``module`` that need no process: run before anything is launched.

    Cheap: walks the module tree only (a meta-device module works).

    Raises:
        ValueError: a sharding unit name is unknown.
        NotImplementedError: the module cannot run the plan as asked (the message says what to use instead).
    """
    units = []
    if plan.sharding_units is not None or plan.activation_checkpointing == "blocks":
        units = resolve_units(module, plan.sharding_units)  # names an unknown unit clearly
    # A module split by an earlier fit (validate or test after fit) holds only its stages' blocks; it was
    # checked when it was split.
    if plan.pipeline > 1 and not getattr(module, _APPLIED, False):
        blocks = find_blocks(module)
        check_pipeline_settings(len(blocks), plan.pipeline, micro_batches=plan.micro_batches, schedule=plan.schedule,
                                stages_per_rank=plan.virtual_stages)
        if not automatic_optimization and plan.storage != "replicated":
            raise NotImplementedError(
                f"manual optimization with pipeline parallelism and storage={plan.storage!r} is not supported yet"
                " (never run: FSDP's gradient reduction inside stages under several backward passes per step);"
                " use storage='replicated' with pipeline, or automatic optimization."
            )
    if plan.tensor > 1 and plan.tensor_rules is not None:
        validate_tensor_rules(module, dict(plan.tensor_rules), plan.tensor)
    if shards_module(plan) and not automatic_optimization:
        try:
            root_free_units(module, units)
        except ValueError as err:
            raise NotImplementedError(
                f"manual optimization with plan storage={plan.storage!r} is not supported for this"
                f" module: {err} Use storage='optimizer' (ZeRO-1) or 'replicated'."
            ) from err


def parallelize(
    module: nn.Module,
    mesh: ParallelMesh,
    *,
    automatic_optimization: bool = True,
    run_example: Callable[[], Any] | None = None,
    batch_size: int | None = None,
    compiler: Callable[[Callable[..., Any]], Any] | None = None,
) -> Parallelized:
    """Apply ``mesh.plan`` to ``module`` in place, in the order of this module's docstring.

    Call it on every rank, with the module's weights already the same on every rank (or already
    sharded by an earlier call), and before the optimizers are built.

    Args:
        module: the user's module.
        mesh: the run's mesh; its plan is the one applied.
        automatic_optimization: ``False`` when the module runs its own backward passes inside a step
            (Lightning's manual optimization): FSDP then leaves the root unsharded, since a backward
            would run before any root forward ended.
        run_example: runs the module once on a real batch, the same on every rank (no gradients needed):
            tensor parallelism checks each block's rules on the inputs it really gets. Without it, rules
            are applied unchecked and none are found automatically. Pipeline parallelism checks the trunk's
            contract with it.
        batch_size: the batch each data-parallel rank's step gets, if known: pipeline micro-batches must
            divide it.
        compiler: wraps a function into its compiled form (the ``dynamo_ctx`` of ``torch.compile(model)``):
            each block's ``forward`` is compiled once the plan is applied.

    Returns:
        what the strategy needs to run a step.
    """
    plan = mesh.plan
    plan.check_implemented()
    if holds_part_of_the_model(module) and (mesh.tensor_enabled or mesh.pipeline_enabled):
        raise NotImplementedError(
            f"{type(module).__name__} was already split by tensor or pipeline parallelism in an earlier fit: fitting"
            " it again is not supported yet. Build a fresh module and resume from a checkpoint instead."
        )
    result = Parallelized(module, plan)
    # 1. Pipeline split: this rank keeps its stages' blocks and frees the others.
    if mesh.pipeline_enabled:
        result.pipeline = apply_pipeline(
            module, mesh.pipeline_group, micro_batches=plan.micro_batches, schedule=plan.schedule,
            stages_per_rank=plan.virtual_stages, cuts=plan.pipeline_cuts, device=next(module.parameters()).device,
            run_example=run_example, batch_size=batch_size,
        )
    # The blocks every later step works on, found once: those this stage holds under pipeline parallelism (once
    # the other stages' blocks are freed, `find_blocks` would read another structure), else the repeated blocks.
    blocks = _held_blocks(module, result.pipeline) if result.pipeline is not None else find_blocks(module)
    # 2. Tensor parallel: the layers of the blocks split over the tensor ranks, checked on the example.
    if mesh.tensor_enabled:
        rules = dict(plan.tensor_rules) if plan.tensor_rules is not None else None
        result.tensor_report = apply_tensor_parallel(module, mesh.tensor_mesh, rules, run_example, blocks=blocks)
    # Units of checkpointing and sharding: the blocks, unless the plan names its own.
    units = blocks if plan.sharding_units is None else resolve_units(module, plan.sharding_units)
    # 3. Activation checkpointing of whole units (FSDP's units when storage is sharded).
    if plan.activation_checkpointing == "blocks":
        apply_activation_checkpointing(module, units)
    # 4. Storage: FSDP shards parameters, gradients and optimizer state (ZeRO-2/3), or whole parameters'
    #    gradients are averaged over the data-parallel ranks (replicated, ZeRO-1).
    #    Under pipeline parallelism, what lies outside the trunk is sharded over every pipeline rank too.
    outside = mesh.outside_trunk_mesh if _shards_outside_trunk(result, automatic_optimization) else None
    if shards_module(plan):
        result.gradient_sync = _shard_storage(module, mesh, units, automatic_optimization, outside)
    elif outside is not None:
        trunk = [p for _, block in blocks for p in block.parameters()]
        shard_outside_trunk(module, outside, trunk)
        result.gradient_sync = _average_gradients(module, mesh, trunk)
    else:
        result.gradient_sync = _average_gradients(module, mesh)
        if shards_optimizer(plan):
            result.optimizer_shard_group = mesh.shard_group
    # Tensor parallel splits some parameters; a pipeline's sharded embeddings sit beside its stage's whole blocks.
    result.mixes_tensor_kinds = mesh.tensor_enabled or (mesh.pipeline_enabled and holds_sharded_tensors(module))
    # 5. Compilation of each block on its own, on what the plan made of it.
    if compiler is not None:
        eager = compile_blocks(blocks, compiler)
        result.compile_note = f"compiled {len(blocks) - len(eager)} of {len(blocks)} blocks" + (
            f"; {TENSOR_PARALLEL_EAGER}" if eager else ""
        )
    if mesh.tensor_enabled or mesh.pipeline_enabled:
        setattr(module, _APPLIED, True)
    return result


def _shards_outside_trunk(result: Parallelized, automatic_optimization: bool) -> bool:
    """Whether step 4 shards the parameters outside a pipelined trunk over the pipeline ranks.

    Not under manual optimization (its backward passes run inside a step, before a root unit's forward
    ended), nor under ZeRO-1, whose optimizer shards whole parameters only: there they stay whole.
    """
    return result.pipeline is not None and automatic_optimization and result.plan.storage != "optimizer"


def _shard_storage(
    module: nn.Module,
    mesh: ParallelMesh,
    units: list[tuple[str, nn.Module]],
    automatic_optimization: bool,
    root_mesh: DeviceMesh | None = None,
) -> GradientSynchronizer | None:
    """Step 4 under ZeRO-2/3: FSDP over the storage mesh; what FSDP cannot shard keeps averaged whole gradients."""
    # Automatic optimization runs each step through the module's `__call__`, so the root can be a unit;
    # manual optimization runs backward passes inside a step, before any root forward would end, so only
    # the children are units.
    whole = storage_exempt_parameters(module)  # before FSDP, whose own shards are strided too
    apply_storage(
        module, mesh.storage_mesh, mesh.plan, shard_root=automatic_optimization, units=units, exempt=whole,
        root_mesh=root_mesh,
    )
    if whole and mesh.data_parallel_enabled:
        return GradientSynchronizer(module, mesh.data_parallel_group, comm_group=mesh.gradient_group, parameters=whole)
    return None


def _average_gradients(
    module: nn.Module, mesh: ParallelMesh, parameters: list[nn.Parameter] | None = None
) -> GradientSynchronizer:
    """Step 4 for whole parameters (replicated, ZeRO-1): gradients averaged over every data-parallel rank.

    ZeRO-1 then splits only the optimizer step. A pipeline rank averages the parameters of its stage
    (``parameters``); FSDP averages those outside the trunk. Under manual optimization or ZeRO-1 these are
    whole and averaged here too; no parameter is reduced over the pipeline axis (they get the same gradient
    on every stage by construction).
    """
    return GradientSynchronizer(module, mesh.data_parallel_group, comm_group=mesh.gradient_group, parameters=parameters)


def _held_blocks(module: nn.Module, pipeline: PipelineParallel) -> list[tuple[str, nn.Module]]:
    modules = dict(module.named_modules())
    return [(name, modules[name]) for name in pipeline.owned_blocks]
