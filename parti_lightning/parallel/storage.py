"""Sharded storage (ZeRO-1/2/3, hybrid data × shard) on torch's own machinery.

- ``"parameters"`` (ZeRO-3) and ``"gradients"`` (ZeRO-2): FSDP2 ``fully_shard`` on each unit, then
  on the root. With ``data > 1`` the 2-D ``(data, shard)`` mesh makes it HSDP: replicated over
  ``data``, sharded over ``shard``.
- ``"optimizer"`` (ZeRO-1): the module stays whole and its gradients are all-reduced by plain data
  parallel; :func:`shard_optimizer` wraps the optimizer in ``ZeroRedundancyOptimizer`` over the
  ``shard`` group.

Plus gathered (full) state dicts for checkpoints, keyed by the module's own parameter names in
every storage mode, and a count of the bytes a rank holds. No Lightning here: the strategy calls
these functions in the order their docstrings give.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils._pytree import tree_map_only

from parti_lightning.parallel.blocks import resolve_units
from parti_lightning.parallel.names import optimizer_parameter_names
from parti_lightning.plan import MeshAxis, PartitionPlan, PlanError

log = logging.getLogger(__name__)

MESH_DIMS = (str(MeshAxis.DATA), str(MeshAxis.SHARD))
_BYTE_KEYS = ("parameters", "gradients", "optimizer_state", "scalars")


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
        fully_shard(module, **options)
        if reduce_unused_parameters:
            module.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    return module


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
        _drop_zero_global_state(sharded)
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


# ------------------------------------------------------------------------------------ state dicts


def full_state_dict(module: nn.Module, *, rank0_only: bool = True) -> dict[str, Tensor]:
    """The module's whole state dict, gathered from the shards onto CPU. Collective: call it on every rank.

    Keys are those of the unsharded module's ``state_dict()`` (parameters and persistent buffers), in
    every storage mode.

    Args:
        module: the model, sharded by :func:`apply_storage` or not.
        rank0_only: only global rank 0 gets the tensors (the others get ``{}``), so that only one host
            copy of the model exists at a time.

    Returns:
        name to CPU tensor; never the live tensors themselves, so the next step does not change it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = _to_cpu(get_model_state_dict(module, options=options))
    return _unaliased(state, [*module.parameters(), *module.buffers()])


def load_full_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, from_rank0: bool = False, strict: bool = True
) -> None:
    """Load a full (unsharded) state dict into ``module``, each rank keeping its shard. Collective.

    Args:
        module: the model, sharded by :func:`apply_storage` or not.
        state_dict: as returned by :func:`full_state_dict` or by an unsharded module's ``state_dict()``.
        from_rank0: only global rank 0 passes the real dict (the others pass ``{}``); rank 0 broadcasts
            it. Otherwise every rank passes the whole dict (e.g. each read the checkpoint file).
        strict: as in ``nn.Module.load_state_dict``.
    """
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0, strict=strict)
    set_model_state_dict(module, dict(state_dict), options=options)


def full_optimizer_state_dict(module: nn.Module, optimizer: Optimizer, *, rank0_only: bool = True) -> dict[str, Any]:
    """The optimizer's whole state, gathered onto CPU and keyed by parameter name. Collective.

    The format is ``torch.distributed.checkpoint``'s: ``{"state": {name: {...}}, "param_groups":
    [{..., "params": [name, ...]}]}``, the same whether the optimizer is plain, over FSDP-sharded
    parameters, or a ``ZeroRedundancyOptimizer``; so it loads under any other storage mode.

    Args:
        module: the model the optimizer's parameters belong to.
        optimizer: the optimizer (as returned by :func:`shard_optimizer` under ZeRO-1).
        rank0_only: only global rank 0 gets the state (the others get ``{}``).

    Returns:
        the state dict described above; never the live tensors themselves, so the next step does not
        change it.
    """
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        state = _zero_full_state_dict(module, optimizer, rank0_only)
    elif not optimizer.state:
        # Why not DCP here: before the first step it would create the state with a zero-lr step, which
        # also advances Adam's step counters, so saving early would change the training that follows.
        state = {} if rank0_only and dist.is_initialized() and dist.get_rank() != 0 else optimizer.state_dict()
        state = _named(module, optimizer, state) if state else {}
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
        state = _to_cpu(get_optimizer_state_dict(module, optimizer, options=options))
    return _unaliased(state, _optimizer_tensors(optimizer))


def load_full_optimizer_state_dict(
    module: nn.Module, optimizer: Optimizer, state_dict: Mapping[str, Any], *, from_rank0: bool = False
) -> None:
    """Load a state from :func:`full_optimizer_state_dict` into ``optimizer``, each rank keeping its part. Collective.

    Args:
        module: the model the optimizer's parameters belong to.
        optimizer: the optimizer to load into (sharded or not); built with the same parameter groups.
        state_dict: the name-keyed state.
        from_rank0: only global rank 0 passes the real state (the others pass ``{}``).
    """
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        if from_rank0:
            box = [state_dict if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            state_dict = box[0]
        _zero_load_state_dict(module, optimizer, state_dict)
        return
    saved = [set(state_dict["state"]) if state_dict else None]
    if from_rank0:
        dist.broadcast_object_list(saved, src=0)
    if not saved[0]:
        _load_stateless(module, optimizer, state_dict, from_rank0=from_rank0)
        return
    # Why strict=False: a parameter that never had a gradient (unused, or not reached yet) has no
    # state, as with a plain optimizer; strict mode would refuse such a checkpoint. Parameter groups
    # and their sizes are still checked by the optimizer's own load_state_dict.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0, strict=False)
    with _gradients_set_aside(optimizer):
        set_optimizer_state_dict(module, optimizer, dict(state_dict), options=options)
    _drop_state_not_in(module, optimizer, saved[0] or set())


# ------------------------------------------------------------------------------------------- bytes


def rank_state_bytes(module: nn.Module, optimizers: Optimizer | Iterable[Optimizer] = ()) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state that this rank holds.

    Sharded tensors (``DTensor``) count their local shard; whole tensors count in full. Zero-dim
    tensors (Adam's ``step`` counters, scalar parameters), which no ZeRO stage shards, are counted
    apart under ``"scalars"``. Under ZeRO-1 only the state of the parameters this rank owns exists.
    Buffers and temporary all-gather/reduce-scatter buffers are not counted.

    Args:
        module: the model.
        optimizers: its optimizer(s).

    Returns:
        ``{"parameters", "gradients", "optimizer_state", "scalars", "total"}`` in bytes.
    """
    counts = dict.fromkeys(_BYTE_KEYS, 0)
    for param in module.parameters():
        _count(counts, "parameters", param)
        if param.grad is not None:
            _count(counts, "gradients", param.grad)
    for optimizer in [optimizers] if isinstance(optimizers, Optimizer) else optimizers:
        # ZeroRedundancyOptimizer keeps the state of this rank's parameters in its local optimizer.
        state = optimizer.optim.state if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer.state
        for per_param in state.values():
            for value in per_param.values():
                if isinstance(value, Tensor):
                    _count(counts, "optimizer_state", value)
    counts["total"] = sum(counts.values())
    return counts


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


def _drop_zero_global_state(optimizer: ZeroRedundancyOptimizer) -> None:
    # ZeroRedundancyOptimizer.load_state_dict also keeps the loaded state of its own parameters in the
    # outer `state` (the real one lives in `optimizer.optim.state`): a second copy that nothing reads,
    # since `state_dict()` rebuilds the global state from the consolidated local states.
    optimizer.state.clear()


@contextlib.contextmanager
def _gradients_set_aside(optimizer: Optimizer) -> Iterator[None]:
    # DCP creates the state it loads into with a zero-lr step, which it skips when any gradient
    # exists, and then fails to find the state ("Expected device to be set").
    params = [param for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
    grads = [param.grad for param in params]
    for param in params:
        param.grad = None
    try:
        yield
    finally:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad


def _load_stateless(
    module: nn.Module, optimizer: Optimizer, state_dict: Mapping[str, Any], *, from_rank0: bool
) -> None:
    # Why not DCP: with no per-parameter state to load (SGD without momentum, or a save before the first
    # step), torch's set_optimizer_state_dict finds no state tensor to read the device from and fails
    # ("Expected device to be set"). What remains are the groups' hyper-parameters (a scheduler's lr),
    # which the optimizer's own load_state_dict takes, checking the groups' sizes.
    box = [state_dict.get("param_groups") if state_dict else None]
    if from_rank0:
        dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise ValueError("the optimizer state to load has no 'param_groups'.")
    index_of = {name: index for index, name in enumerate(optimizer_parameter_names(module, optimizer))}
    unknown = sorted({name for group in box[0] for name in group["params"]} - set(index_of))
    if unknown:
        raise ValueError(f"optimizer groups name unknown parameter(s) {unknown[:5]} of {type(module).__name__}.")
    groups = [{**group, "params": [index_of[name] for name in group["params"]]} for group in box[0]]
    optimizer.load_state_dict({"state": {}, "param_groups": groups})


def _drop_state_not_in(module: nn.Module, optimizer: Optimizer, saved: set[str]) -> None:
    # DCP loads into a state it first creates with a zero-lr step, which leaves parameters that had no
    # saved state with a zeroed state whose step counter is 1 instead of none: their first real Adam
    # step would then be bias-corrected as a second one. Back to no state, as in the checkpoint.
    ordered = [param for group in optimizer.param_groups for param in group["params"]]
    for param, name in zip(ordered, optimizer_parameter_names(module, optimizer), strict=True):
        if name not in saved:
            optimizer.state.pop(param, None)


def _named(module: nn.Module, optimizer: Optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
    """An index-keyed optimizer state dict keyed by parameter name instead, as DCP keys it."""
    names = optimizer_parameter_names(module, optimizer)
    return {
        "state": {names[index]: value for index, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[index] for index in group["params"]]} for group in state["param_groups"]
        ],
    }


def _zero_full_state_dict(module: nn.Module, optimizer: ZeroRedundancyOptimizer, rank0_only: bool) -> dict[str, Any]:
    # Rank 0 of each shard group collects its group's states; with data > 1 every replica does the
    # same, and global rank 0 is rank 0 of its own shard group.
    optimizer.consolidate_state_dict(to=0)
    state = optimizer.state_dict() if optimizer.rank == 0 else None
    # Why: consolidation leaves a full host copy of the state on the receiving rank until the next one.
    optimizer._all_state_dicts = []
    if not rank0_only:
        box = [state]
        dist.broadcast_object_list(box, group_src=0, group=optimizer.process_group)
        state = box[0]
    if state is None or (rank0_only and dist.get_rank() != 0):
        return {}
    return _named(module, optimizer, state)


def _zero_load_state_dict(module: nn.Module, optimizer: ZeroRedundancyOptimizer, state: Mapping[str, Any]) -> None:
    index_of = {name: index for index, name in enumerate(optimizer_parameter_names(module, optimizer))}
    unknown = sorted(set(state["state"]) - set(index_of))
    if unknown:
        raise ValueError(f"optimizer state for unknown parameter(s) {unknown[:5]} of {type(module).__name__}.")
    # A fresh dict: ZeroRedundancyOptimizer.load_state_dict overwrites the entries of other ranks with None.
    indexed = {
        "state": {index_of[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [index_of[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }
    optimizer.load_state_dict(indexed)
    _drop_zero_global_state(optimizer)


def _count(counts: dict[str, int], key: str, tensor: Tensor) -> None:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    counts["scalars" if local.dim() == 0 else key] += local.numel() * local.element_size()


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return tree_map_only(Tensor, lambda tensor: tensor.cpu(), state)


def _optimizer_tensors(optimizer: Optimizer) -> list[Tensor]:
    state = optimizer.optim.state if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer.state
    return [value for per_param in state.values() for value in per_param.values() if isinstance(value, Tensor)]


def _unaliased(state: dict[str, Any], live: Iterable[Tensor]) -> dict[str, Any]:
    # Why: where there is nothing to gather (unsharded tensors, ZeRO-1, Adam's step counters) and the
    # state is already on CPU, the "full" state holds the live tensors themselves, which the next step
    # changes in place under the caller (and under an optimizer loaded from it). Only those are copied.
    pointers = {_storage_pointer(tensor) for tensor in live}
    return tree_map_only(Tensor, lambda t: t.clone() if _storage_pointer(t) in pointers else t, state)


def _storage_pointer(tensor: Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.untyped_storage().data_ptr()
