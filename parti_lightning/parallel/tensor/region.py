"""Tensor-parallel regions: a block whose layers hold DTensor parameters, with plain tensors in and out.

Inside a region every intermediate is a DTensor with global semantics (see the package's docstring); the
hooks here make the boundary and fix Megatron's collectives (one all-reduce per split pair each way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._pytree import tree_map

from parti_lightning.parallel.tensor.ops import PackedSplit, RegionOps
from parti_lightning.parallel.tensor.rules import REPLICATE, ROWWISE, packed_parts, parameter_placements, split_target


@contextlib.contextmanager
def implicit_replication() -> Iterator[None]:
    """DTensor ops take plain tensors as replicated on the op's mesh, until exit; nests, and restores the outer state.

    Why the flag itself rather than torch's ``implicit_replication()``: that one resets the flag to False on
    exit, which would end an enclosing implicit replication early (a region inside a backward pass's step).
    """
    dispatcher = DTensor._op_dispatcher
    before = dispatcher._allow_implicit_replication
    dispatcher._allow_implicit_replication = True
    try:
        yield
    finally:
        dispatcher._allow_implicit_replication = before


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The device a collective over ``mesh``'s group moves tensors on (NCCL moves device tensors only)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


# Set on a unit made a region, so that later steps (compilation) can tell.
_REGION = "_parti_tensor_region"


def is_tensor_region(module: nn.Module) -> bool:
    """Whether tensor parallelism made ``module`` a region (split layers, DTensors inside)."""
    return getattr(module, _REGION, False)


def shard_unit(unit: nn.Module, rules: Mapping[str, str], mesh: DeviceMesh) -> None:
    """Turn ``unit`` into a region in place: parameters split by ``rules`` (names relative to ``unit``),
    every other parameter and buffer replicated, and hooks that take plain tensors in and give plain ones out.
    """
    converted: dict[int, nn.Parameter] = {}  # one DTensor per parameter object, so ties inside the unit hold
    modules = dict(unit.named_modules())
    targets = {name: split_target(unit, name, modules) for name in rules}
    parameter_rules: dict[str, dict[str, str]] = {}  # layer -> its parameters' own rules (stacked experts)
    for name, (layer_name, _, parameter) in targets.items():
        if parameter is not None:
            parameter_rules.setdefault(layer_name, {})[parameter] = rules[name]
    for name, layer in unit.named_modules():
        placements = parameter_placements(layer, rules.get(name, REPLICATE), parameter_rules.get(name))
        for param_name, param in list(layer.named_parameters(recurse=False)):
            if id(param) not in converted:
                data = distribute_tensor(param.detach(), mesh, [placements[param_name]])
                converted[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
                if param.requires_grad:
                    converted[id(param)].register_post_accumulate_grad_hook(_grad_as_parameter)
            layer.register_parameter(param_name, converted[id(param)])
        for buffer_name, buffer in list(layer.named_buffers(recurse=False)):
            if not isinstance(buffer, DTensor):
                # Replicated so that code mixing a buffer into the block's DTensors (a causal mask, rotary
                # tables) is not a mix of plain and distributed tensors.
                layer._buffers[buffer_name] = distribute_tensor(buffer, mesh, [Replicate()])
    region = _Region(mesh, packed=any(packed_parts(style) for style in rules.values()))
    styles: dict[str, list[str]] = {}  # layer -> the styles of its rules (a layer's, or its parameters')
    for name, (layer_name, _, _) in targets.items():
        styles.setdefault(layer_name, []).append(rules[name])
    for layer_name, layer_styles in styles.items():
        layer = modules[layer_name]
        # Megatron's layout, fixed rather than left to DTensor's choice: the rowwise sum is all-reduced at
        # once (DTensor may otherwise pick reduce-scatter + all-gather, the same bytes in two collectives),
        # and a colwise layer's input gradient is all-reduced once per input tensor (q/k/v share one).
        if ROWWISE in layer_styles:
            layer.register_forward_hook(_replicate_output)
        if any(style not in (ROWWISE, REPLICATE) for style in layer_styles):
            layer.register_forward_pre_hook(region.reduce_input_grad)
        if any(packed_parts(style) for style in layer_styles):
            layer.register_state_dict_post_hook(_plain_shard_state)
    setattr(unit, _REGION, True)
    unit.register_forward_pre_hook(region.enter, with_kwargs=True)
    # always_call: the implicit replication entered before the forward ends even when the forward raises.
    unit.register_forward_hook(region.exit, always_call=True)


class _Region:
    """The hooks around a region: plain tensors in, DTensors inside, plain tensors out.

    Inside, DTensor's implicit replication is on: a tensor the user's code creates in the forward
    (``torch.arange(T)`` for positions, a mask from ``torch.ones``) is a plain tensor, and is the same
    on every tensor rank, so treating it as replicated is exact.
    """

    def __init__(self, mesh: DeviceMesh, packed: bool = False) -> None:
        self.mesh = mesh
        self.packed = packed
        self._replication: list[contextlib.AbstractContextManager[None]] = []
        self._modes: list[RegionOps] = []
        self._grad_reduced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # Entered in the pre-hook and left in the forward hook: the forward runs between two hooks, not in a block.
        self._replication.append(implicit_replication())
        self._replication[-1].__enter__()
        self._grad_reduced.clear()
        self._modes.append(PackedSplit() if self.packed else RegionOps())
        self._modes[-1].__enter__()
        return tree_map(self._replicate, args), tree_map(self._replicate, kwargs)

    def exit(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self._grad_reduced.clear()
        if self._modes:
            self._modes.pop().__exit__(None, None, None)
        if self._replication:
            self._replication.pop().__exit__(None, None, None)
        return tree_map(lambda value: value.full_tensor() if isinstance(value, DTensor) else value, output)

    def reduce_input_grad(self, module: nn.Module, args: tuple) -> tuple | None:
        value = args[0] if args else None
        if not isinstance(value, DTensor) or not value.requires_grad:
            return None
        if id(value) not in self._grad_reduced:
            # Keyed by id with the tensor kept alive beside it, so an id is not reused within one forward.
            self._grad_reduced[id(value)] = (value, _ReplicatedGrad.apply(value))
        return (self._grad_reduced[id(value)][1], *args[1:])

    def _replicate(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            # No check: ranks of one tensor group see the same batch by contract. Backward sums the
            # partial input gradients of the split layers over the tensor ranks (one all-reduce).
            return DTensor.from_local(value, self.mesh, [Replicate()], run_check=False)
        return value


def _plain_shard_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Save a packed layer's strided-sharded weight and bias as plain shards of the same global tensor.

    Distributed checkpoints refuse strided shards; a plain ``Shard`` of the unchanged global tensor is the
    layout every other plan reads. Loading needs nothing: ``load_state_dict`` copies into the strided
    parameter, and DTensor's ``copy_`` redistributes. The redistribution is a collective: every tensor rank
    must call ``state_dict()`` together, as distributed checkpointing does.
    """
    for name, value in module.named_parameters(recurse=False):
        if prefix + name in state_dict:
            state_dict[prefix + name] = standard_layout(value.detach())


def standard_layout(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a layout distributed checkpoints save: a strided shard becomes a plain ``Shard`` of the
    same global tensor (a collective over its mesh), anything else is returned as is.

    For state that follows a packed parameter's layout outside ``state_dict()``: the optimizer's moments
    (``exp_avg`` of a packed weight is strided too). To load, ``copy_`` the loaded plain shard into the
    strided tensor: DTensor redistributes.
    """
    placements = tensor.placements if isinstance(tensor, DTensor) else ()
    if not any(isinstance(placement, _StridedShard) for placement in placements):
        return tensor
    plain = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in placements]
    return tensor.redistribute(tensor.device_mesh, plain)


def _grad_as_parameter(param: torch.Tensor) -> None:
    """Give a gradient its parameter's placement once, as soon as backward has accumulated it.

    Where the layout fell back (heads the degree does not divide, a block DTensor could not keep split),
    autograd leaves gradients ``Partial``. Left so, every optimizer kernel that reads one reduces it
    again: measured on a 2-block model, about 100 collectives a step inside AdamW. One reduction here
    gives the same values.
    """
    grad = param.grad
    if isinstance(param, DTensor) and isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


def _replicate_output(module: nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, DTensor) and any(placement.is_partial() for placement in output.placements):
        return output.redistribute(output.device_mesh, [Replicate()] * output.device_mesh.ndim)
    return output


class _ReplicatedGrad(torch.autograd.Function):
    """Identity forward; backward turns a partial-sum gradient into a replicated one (one all-reduce)."""

    @staticmethod
    def forward(ctx: Any, value: DTensor) -> DTensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> DTensor:
        if isinstance(grad, DTensor) and any(placement.is_partial() for placement in grad.placements):
            return grad.redistribute(grad.device_mesh, [Replicate()] * grad.device_mesh.ndim)
        return grad
