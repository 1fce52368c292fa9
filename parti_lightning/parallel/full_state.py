"""Gathered (full) state dicts of a module and its optimizers, keyed by the module's own names, in every storage mode.

Checkpoints and consolidation read and write whole tensors through these, whether the module is
replicated, sharded by FSDP (ZeRO-2/3) or stepped by ``ZeroRedundancyOptimizer`` (ZeRO-1): torch's
``torch.distributed.checkpoint.state_dict`` does the gathering where it can, and the functions here
cover what it does not (ZeRO-1, an optimizer with no state yet, live tensors aliased by the result).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
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
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.utils._pytree import tree_map_only

from parti_lightning.parallel.names import optimizer_parameter_names
from parti_lightning.parallel.storage import drop_zero_global_state
from parti_lightning.parallel.tensor.region import implicit_replication


def full_state_dict(module: nn.Module, *, rank0_only: bool = True) -> dict[str, Tensor]:
    """The module's whole state dict, gathered from the shards onto CPU. Collective: call it on every rank.

    Keys are those of the unsharded module's ``state_dict()`` (parameters and persistent buffers), in
    every storage mode.

    Args:
        module: the model, sharded by :func:`~parti_lightning.parallel.storage.apply_storage` or not.
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
        module: the model, sharded by :func:`~parti_lightning.parallel.storage.apply_storage` or not.
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
        optimizer: the optimizer (under ZeRO-1, as :func:`~parti_lightning.parallel.storage.shard_optimizer` returns).
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
    # DCP's zero-lr step that creates the state runs outside the strategy's step context: a foreach optimizer
    # (`foreach=True`) would get sharded and whole parameters in one kernel there too.
    with _gradients_set_aside(optimizer), implicit_replication():
        set_optimizer_state_dict(module, optimizer, dict(state_dict), options=options)
    _drop_state_not_in(module, optimizer, saved[0] or set())


# ----------------------------------------------------------------------------------------- helpers


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
    drop_zero_global_state(optimizer)


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
