"""Sharded storage (ZeRO-1/2/3, hybrid data × shard) on torch's own machinery.

- ``"parameters"`` (ZeRO-3) and ``"gradients"`` (ZeRO-2): FSDP2 ``fully_shard`` on each unit, then
  on the root. With ``data > 1`` the 2-D ``(data, shard)`` mesh makes it HSDP: replicated over
  ``data``, sharded over ``shard``.
- ``"optimizer"`` (ZeRO-1): the module stays whole and its gradients are all-reduced by plain data
  parallel; :func:`shard_optimizer` wraps the optimizer in ``ZeroRedundancyOptimizer`` over the
  ``shard`` group.

Gathered (full) state dicts are in :mod:`~parti_lightning.parallel.full_state`, the bytes a rank holds in
:mod:`~parti_lightning.parallel.state_bytes`. No Lightning here: the strategy calls these functions in the
order their docstrings give.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from parti_lightning.parallel.blocks import resolve_units
from parti_lightning.plan import MeshAxis, PartitionPlan, PlanError

log = logging.getLogger(__name__)

MESH_DIMS = (str(MeshAxis.DATA), str(MeshAxis.SHARD))


# ---------------------------------------------------------------------------------------- sharding


def apply_storage(
    module: nn.Module,
    mesh: DeviceMesh,
    plan: PartitionPlan,
    *,
    reduce_unused_parameters: bool = False,
    shard_root: bool = True,
    units: Sequence[tuple[str, nn.Module]] | None = None,
    exempt: Sequence[nn.Parameter] | None = None,
    root_mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Shard the storage of ``module`` over the ``shard`` axis of ``mesh`` as ``plan.storage`` says.

    Call it after tensor parallelism and activation checkpointing, and before the optimizer is
    built: FSDP replaces every parameter with a sharded ``DTensor`` parameter, so an optimizer built
    earlier would hold the old tensors.

    - ``"parameters"`` (ZeRO-3): ``fully_shard`` each unit (``plan.sharding_units``, or the repeated
      blocks found by :func:`~parti_lightning.parallel.blocks.find_blocks`), deepest first, then the
      root, all with ``reshard_after_forward=True``: a unit's parameters are gathered for its
      forward, freed, and gathered again for its backward.
    - ``"gradients"`` (ZeRO-2): the same units with ``reshard_after_forward=False``.
    - ``"optimizer"`` (ZeRO-1): the module is returned untouched; see :func:`shard_optimizer`.

    Args:
        module: the model, on the mesh's device or on CPU (FSDP moves it to the mesh's device).
        mesh: 2-D mesh with dims ``("data", "shard")`` and the sizes of ``plan.data``, ``plan.shard``.
        plan: a resolved plan (``plan.resolve(world_size)``) with sharded storage and ``shard > 1``.
        reduce_unused_parameters: set it when which parameters get a gradient depends on the data
            (conditional branches, mixture of experts). FSDP reduce-scatters the gradients a rank has,
            so ranks that disagree on which exist hang in the collective. With this set, a missing
            gradient counts as zeros; the cost is that a parameter unused on every rank gets a zero
            gradient instead of none, so an optimizer with weight decay still decays it. Ignored by
            ZeRO-1, whose gradients data parallel reduces.
        shard_root: shard the root module as the last unit (it takes every parameter the units left,
            and tied weights across children). Its parameters are then gathered around the root's
            ``forward`` only, so every use of the module must go through ``module(...)``. With
            ``False``, each top-level child holding parameters becomes a unit instead and the root is
            left alone: any method may call the children (a LightningModule's ``training_step`` with
            several backward passes in it), but the root must own no parameter directly and no
            parameter may be shared between two children (see :func:`root_free_units`).
        units: the ``(name, submodule)`` units to shard before the root; ``None`` for ``plan.sharding_units``
            or the blocks :func:`~parti_lightning.parallel.blocks.find_blocks` finds (a pipeline stage passes
            the blocks it holds).
        exempt: :func:`storage_exempt_parameters` of ``module`` if the caller already has them; ``None``
            computes them.
        root_mesh: the 1-D mesh the root shards its own parameters over, if not the units' (a pipeline stage's
            root: the parameters outside the trunk are the same on every pipeline rank, see
            :func:`shard_outside_trunk`).

    Returns:
        ``module``, sharded in place.

    Raises:
        PlanError: the plan is not resolved.
        ValueError: the plan shards nothing (``storage="replicated"`` or ``shard == 1``: use plain data
            parallel), the mesh does not match the plan, a unit name is unknown, or a unit shares a
            parameter with a module outside it.
    """
    _check_storage_args(mesh, plan)
    if plan.storage == "optimizer":
        # ZeRO-1 shards only optimizer state, which does not exist yet: parameters and gradients stay
        # whole on every rank and plain data parallel averages the gradients.
        return module
    units = list(units) if units is not None else resolve_units(module, plan.sharding_units)
    _check_units_own_their_parameters(module, units)
    if not shard_root:
        units = [*units, *root_free_units(module, units)]
    if not units:
        log.info("no repeated blocks found in %s: sharding it as one unit", type(module).__name__)
    # Why 2-D for HSDP: fully_shard replicates over mesh dim 0 and shards over dim 1.
    fsdp_mesh = mesh if plan.data > 1 else mesh[str(MeshAxis.SHARD)]
    # ZeRO-2 with FSDP2: parameters stay gathered from a unit's forward until its backward is done
    # (no second all-gather in backward), gradients are reduce-scattered to shards and the optimizer
    # state is sharded. Unlike DeepSpeed's ZeRO-2, FSDP2 frees the gathered parameters again after
    # backward (reshard_after_backward), so between steps the parameters are sharded too: at rest it
    # holds what ZeRO-3 holds; the difference is the peak (all units gathered between forward and
    # backward) and one all-gather per unit per step instead of two.
    reshard_after_forward = plan.storage == "parameters"
    options: dict[str, Any] = {
        "mesh": fsdp_mesh,
        "reshard_after_forward": reshard_after_forward,
        "offload_policy": _offload_policy(plan, mesh),
        "shard_placement_fn": _storage_placement,
    }
    ignored = set(storage_exempt_parameters(module) if exempt is None else exempt)
    if ignored:
        options["ignored_params"] = ignored
    for _, unit in _deepest_first(units):
        fully_shard(unit, **options)
        if reduce_unused_parameters:
            unit.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    if shard_root:
        fully_shard(module, **(options if root_mesh is None else {**options, "mesh": root_mesh}))
        if reduce_unused_parameters:
            module.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    return module


def shard_outside_trunk(module: nn.Module, mesh: DeviceMesh, trunk_parameters: Sequence[nn.Parameter]) -> None:
    """Shard the parameters outside a pipelined trunk over ``mesh``, the trunk's own left as they are.

    Under pipeline parallelism every pipeline rank runs the code around the trunk (embeddings, head, loss),
    so its parameters are the same on every rank, and get the same gradient: holding them whole on each
    rank wastes ``pipeline - 1`` copies (on a Llama, the embedding and head are a third of the model). As a
    ZeRO-3 root unit over ``pipeline × data × shard`` (see
    :attr:`~parti_lightning.mesh.ParallelMesh.outside_trunk_mesh`), each rank holds one shard, FSDP gathers
    them for the forward and backward, and its averaging reduce-scatter is the data-parallel average (the
    pipeline ranks' gradients are equal). The root then runs every step through ``module(...)``, as under
    ZeRO-3.

    Args:
        module: the root, its trunk already split (the other stages' blocks freed).
        mesh: the 1-D mesh of every rank with this rank's tensor coordinate.
        trunk_parameters: this stage's block parameters; their storage is the plan's (whole, or sharded by FSDP
            units already), and they are left to it.
    """
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}
    if trunk_parameters:
        options["ignored_params"] = set(trunk_parameters)
    fully_shard(module, **options)


def storage_exempt_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters sharded storage leaves whole on every data-parallel rank: their gradients must be
    averaged over those ranks like replicated ones.

    These are tensor-parallel parameters in a packed layout (a strided shard, see
    :mod:`~parti_lightning.parallel.tensor.region`) with no other dimension FSDP could shard: the biases
    of packed q/k/v layers. Why: FSDP describes its shard of a tensor-parallel shard of the same dimension
    as a nested strided shard, and torch 2.13 reads that wrongly when the tensor-parallel shard is itself
    strided (``full_tensor()`` and distributed checkpoints reorder its rows; the training step is right).
    A weight avoids the nesting by being sharded on another dimension (:func:`_storage_placement`); a 1-D
    tensor has none. They are a block's smallest tensors. Call it before :func:`apply_storage`, whose own
    shards are strided too.
    """
    return [
        param
        for param in module.parameters()
        if _strided_dims(param) and all(dim in _strided_dims(param) for dim in range(param.ndim))
    ]


def _storage_placement(param: nn.Parameter) -> Shard | None:
    """FSDP's shard dimension for ``param``: the first one not strided by tensor parallelism (``None``: dim 0)."""
    strided = _strided_dims(param)
    if 0 not in strided:
        return None
    return Shard(next(dim for dim in range(param.ndim) if dim not in strided))


def _strided_dims(param: Tensor) -> set[int]:
    placements = param.placements if isinstance(param, DTensor) else ()
    return {placement.dim for placement in placements if isinstance(placement, _StridedShard)}


def root_free_units(module: nn.Module, units: Sequence[tuple[str, nn.Module]] = ()) -> list[tuple[str, nn.Module]]:
    """The top-level children that must become units when the root itself is not sharded.

    Those holding a parameter that no unit in ``units`` holds. Cheap (walks the module tree only), so
    it also validates a model before launch.

    Raises:
        ValueError: the root owns a parameter directly, or two children share one (tied weights):
            both need a sharded root.
    """
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"{type(module).__name__} owns parameters directly ({', '.join(own[:3])}): sharding it without"
            " sharding the root needs every parameter inside a child module."
        )
    covered = {id(p) for _, unit in units for p in unit.parameters()}
    children = [
        (name, child)
        for name, child in module.named_children()
        if any(id(p) not in covered for p in child.parameters())
    ]
    _check_units_own_their_parameters(module, children)
    return children


def shard_optimizer(optimizer: Optimizer, group: dist.ProcessGroup | None = None) -> Optimizer:
    """Shard the state of an already-built optimizer over ``group`` (ZeRO-1).

    Returns a ``ZeroRedundancyOptimizer`` that runs ``type(optimizer)`` on the parameters this rank
    owns (whole parameters, balanced greedily by size) and broadcasts the updated parameters after
    each step. It starts from copies of ``optimizer.param_groups`` (every hyper-parameter, including
    a scheduler's ``initial_lr``) and from ``optimizer``'s state, if any. The original optimizer is
    left behind: re-point every LR scheduler built on it with :func:`retarget_lr_scheduler`. The
    gradients must already be averaged over all data-parallel ranks (``data × shard``) when
    ``step()`` runs: ZeRO-1 does not reduce them.

    Args:
        optimizer: the user's optimizer over the module's (unsharded) parameters.
        group: the ranks that split the state, ``mesh["shard"].get_group()``; ``None`` is the world.

    Returns:
        the sharded optimizer, or ``optimizer`` itself when ``group`` has a single rank or it is
        already a ``ZeroRedundancyOptimizer``.

    Raises:
        TypeError: the optimizer class cannot be rebuilt from ``optimizer.defaults``.
    """
    if isinstance(optimizer, ZeroRedundancyOptimizer) or dist.get_world_size(group) == 1:
        return optimizer
    optimizer_class = type(optimizer)
    try:
        # Why copies: sharing the dicts would only last until the first load_state_dict, which
        # replaces them; a scheduler left on the original optimizer must fail visibly, not later.
        sharded = ZeroRedundancyOptimizer(
            [dict(group) for group in optimizer.param_groups],
            optimizer_class=optimizer_class,
            process_group=group,
            **_constructor_defaults(optimizer_class, optimizer.defaults),
        )
    except TypeError as err:
        raise TypeError(
            f"storage='optimizer' rebuilds each rank's {optimizer_class.__name__} from its defaults"
            f" {sorted(optimizer.defaults)}, which failed ({err}). Give the optimizer a constructor that"
            " accepts its defaults as keyword arguments, or use storage='gradients'."
        ) from err
    if optimizer.state:
        sharded.load_state_dict(optimizer.state_dict())
        drop_zero_global_state(sharded)
    return sharded


def retarget_lr_scheduler(scheduler: Any, optimizer: Optimizer) -> None:
    """Point an LR scheduler built on the original optimizer at its replacement.

    Besides setting ``scheduler.optimizer``, this marks ``optimizer.step`` the way
    ``LRScheduler.__init__`` marks the optimizer it is built with; without that, the scheduler warns
    that ``optimizer.step()`` was overridden, or that it ran before ``optimizer.step()``.

    Args:
        scheduler: any LR scheduler (``torch.optim.lr_scheduler.LRScheduler``, ``ReduceLROnPlateau``
            or anything with an ``optimizer`` attribute).
        optimizer: the optimizer that now steps, e.g. from :func:`shard_optimizer`.
    """
    previous = getattr(scheduler, "optimizer", None)
    scheduler.optimizer = optimizer
    wrapped = previous is not None and hasattr(previous.step, "_wrapped_by_lr_sched")
    if isinstance(scheduler, LRScheduler) and wrapped and not hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        optimizer.step = _step_marked_for_lr_scheduler(optimizer)  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------- helpers


def _check_storage_args(mesh: DeviceMesh, plan: PartitionPlan) -> None:
    if not plan.is_resolved:
        raise PlanError("apply_storage needs a resolved plan: call plan.resolve(world_size) first.")
    if plan.storage == "replicated":
        raise ValueError("plan.storage='replicated' shards nothing: use plain data parallel instead of apply_storage.")
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"apply_storage needs a 2-D mesh with dims {MESH_DIMS}, got dims {mesh.mesh_dim_names}.")
    if tuple(mesh.shape) != (plan.data, plan.shard):
        raise ValueError(
            f"mesh shape {tuple(mesh.shape)} does not match the plan's data={plan.data} × shard={plan.shard}."
        )
    if plan.shard == 1:
        raise ValueError(
            f"plan.shard=1 with storage={plan.storage!r} shards nothing: use plain data parallel over all"
            f" {plan.data} ranks instead of apply_storage."
        )


def _check_units_own_their_parameters(module: nn.Module, units: Sequence[tuple[str, nn.Module]]) -> None:
    """Raise if a unit's parameter is also registered outside the unit (tied weights).

    FSDP gives each parameter to the one unit that owns it and gathers it only around that unit's
    forward; a use from outside the unit would see the shard.
    """
    owners: dict[int, list[str]] = {}
    for name, submodule in module.named_modules(remove_duplicate=False):
        for param_name, param in submodule.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{name}.{param_name}" if name else param_name)
    for unit_name, unit in units:
        for param in unit.parameters():
            outside = [owner for owner in owners[id(param)] if not owner.startswith(f"{unit_name}.")]
            if outside:
                raise ValueError(
                    f"sharding unit {unit_name!r} shares a parameter with {outside[0]!r} outside it (tied"
                    " weights?): FSDP gathers a parameter only for the unit that owns it. List units in"
                    " plan.sharding_units that keep tied parameters inside one unit, or leave them to the root."
                )


def _deepest_first(units: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    # fully_shard groups the parameters not already claimed by an inner call, so inner units go first.
    return sorted(units, key=lambda unit: -unit[0].count("."))


def _offload_policy(plan: PartitionPlan, mesh: DeviceMesh) -> OffloadPolicy:
    if plan.offload != "cpu":
        return OffloadPolicy()
    if mesh.device_type == "cpu":
        log.info("plan.offload='cpu' has no effect on a CPU mesh: sharded storage already lives in host memory.")
        return OffloadPolicy()
    return CPUOffloadPolicy()


def _constructor_defaults(optimizer_class: type[Optimizer], defaults: Mapping[str, Any]) -> dict[str, Any]:
    # Why filter: `defaults` can hold keys the constructor does not take (AdamW's
    # `decoupled_weight_decay`). They are not lost: they stay in the shared param groups, which
    # ZeroRedundancyOptimizer copies into its local optimizer at every step.
    parameters = inspect.signature(optimizer_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(defaults)
    return {key: value for key, value in defaults.items() if key in parameters}


def _step_marked_for_lr_scheduler(optimizer: Optimizer) -> Any:
    # Mirrors LRScheduler.__init__'s patch: the scheduler checks these two markers to warn about
    # a step order it cannot see otherwise. A weak reference avoids an optimizer -> step -> optimizer cycle.
    step = optimizer.step
    owner = weakref.ref(optimizer)

    @functools.wraps(step)
    def marked_step(*args: Any, **kwargs: Any) -> Any:
        opt = owner()
        if opt is not None:
            opt._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    marked_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return marked_step


def drop_zero_global_state(optimizer: ZeroRedundancyOptimizer) -> None:
    # ZeroRedundancyOptimizer.load_state_dict also keeps the loaded state of its own parameters in the
    # outer `state` (the real one lives in `optimizer.optim.state`): a second copy that nothing reads,
    # since `state_dict()` rebuilds the global state from the consolidated local states.
    optimizer.state.clear()
