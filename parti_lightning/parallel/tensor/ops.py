"""What DTensor lacks for ops that transformer blocks run: CPU attention, cache appends, experts, packed outputs.

torch 2.13 registers DTensor strategies for the CUDA attention kernels only: scaled dot-product
attention on CPU DTensors raises ``NotImplementedError``. The CPU flash kernel is independent per
batch element and per head, so it runs unchanged on a batch- or head-sharded input; these
registrations (torch's ``register_sharding`` API, nothing re-implemented) say so, and the
tensor-parallel layout keeps attention head-sharded with no communication.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.placement_types import _StridedShard
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

_aten = torch.ops.aten


@functools.cache
def register_cpu_attention_sharding() -> None:
    """Register head- and batch-sharded strategies for the CPU flash attention kernel (once per process)."""
    register_sharding(_aten._scaled_dot_product_flash_attention_for_cpu.default)(_attention_forward)
    register_sharding(_aten._scaled_dot_product_flash_attention_for_cpu_backward.default)(_attention_backward)


def _mask_placement(attn_mask: object, dim: int) -> object:
    """The mask's placement when q/k/v are sharded on ``dim``: broadcast dims stay replicated."""
    if attn_mask is None:
        return None
    shape = attn_mask.tensor_meta.shape
    return Shard(dim) if shape[dim] != 1 else Replicate()


def _replicated_mask(attn_mask: object) -> object:
    return None if attn_mask is None else Replicate()


def _attention_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    # Outputs: (output [B, H, T, D], logsumexp [B, H, T]); inputs: q, k, v, dropout_p, is_causal, attn_mask.
    strategies = [
        ([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), None, None, _replicated_mask(attn_mask)])
    ]
    for dim in (0, 1):
        shard = Shard(dim)
        strategies.append(([shard, shard], [shard, shard, shard, None, None, _mask_placement(attn_mask, dim)]))
    return strategies


def _attention_backward(
    grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None
):
    # Outputs: grad_q, grad_k, grad_v; inputs: grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, attn_mask.
    replicate = Replicate()
    strategies = [([replicate] * 3, [replicate] * 6 + [None, None, _replicated_mask(attn_mask)])]
    for dim in (0, 1):
        shard = Shard(dim)
        strategies.append(([shard] * 3, [shard] * 6 + [None, None, _mask_placement(attn_mask, dim)]))
    return strategies


# ------------------------------------------------------------------------------ functions run on local shards

_CATS = (torch.cat, torch.concat, torch.concatenate)
_GROUPED_MM = tuple(
    f for f in (getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f
)


class RegionOps(TorchFunctionMode):
    """Functions inside a region that DTensor runs wrongly or not at all, run as torch defines them.

    - ``torch.cat`` with a legacy empty ``(0,)`` input: on plain tensors torch skips it, whatever the others'
      rank; DTensor's rule checks every input's dimensions and raises (``Dimension out of range``). Hugging
      Face caches start each layer's keys that way and append with ``cat(dim=-2)``. The empties are dropped.
    - grouped matrix products (mixture-of-experts layers, ``F.grouped_mm``): DTensor's shape propagation
      runs the meta kernel, which refuses float32 even where the CPU kernel takes it. Run on the local
      shards instead, by the expert weight's layout: split along its output features (colwise) each rank
      computes its columns; along its input features (rowwise) its partial sums; replicated, the whole
      product.
    - attention with a mask of one value per head (T5's position bias, a zero bias per head) on head-sharded
      queries: DTensor does not move a keyword-only argument to the layout the strategy above asks for, so the
      kernel got every head's mask with its own heads. The mask is sharded like the queries first.
    """

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CATS and args and isinstance(args[0], (list, tuple)):
            tensors = args[0]
            if any(isinstance(t, DTensor) for t in tensors) and any(_legacy_empty(t) for t in tensors):
                kept = [t for t in tensors if not _legacy_empty(t)]
                return func(kept, *args[1:], **kwargs)
        if func in _GROUPED_MM and len(args) >= 2 and isinstance(args[1], DTensor) and args[1].device_mesh.ndim == 1:
            return _local_grouped_mm(func, *args, **kwargs)
        if func is F.scaled_dot_product_attention and args and isinstance(args[0], DTensor):
            if isinstance(kwargs.get("attn_mask"), torch.Tensor):
                kwargs = {**kwargs, "attn_mask": _mask_like(kwargs["attn_mask"], args[0])}
            elif len(args) > 3 and isinstance(args[3], torch.Tensor):
                args = (*args[:3], _mask_like(args[3], args[0]), *args[4:])
        return func(*args, **kwargs)


def _mask_like(mask: torch.Tensor, query: DTensor) -> DTensor:
    """``mask`` as a DTensor sharded where ``query`` is and the mask is not broadcast (size 1), else replicated."""
    mesh = query.device_mesh
    if not isinstance(mask, DTensor):
        mask = DTensor.from_local(mask, mesh, [Replicate()] * mesh.ndim, run_check=False)
    offset = query.dim() - mask.dim()  # a mask may leave out leading dimensions it broadcasts over
    placements = [
        Shard(p.dim - offset)
        if type(p) is Shard and p.dim >= offset and mask.shape[p.dim - offset] == query.shape[p.dim]
        else Replicate()
        for p in query.placements
    ]
    return mask if list(mask.placements) == placements else mask.redistribute(mesh, placements)


def _legacy_empty(value: object) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == (0,)


def _local_grouped_mm(func: Callable, mat_a: torch.Tensor, mat_b: DTensor, *args: Any, **kwargs: Any) -> DTensor:
    """``func(mat_a, mat_b, ...)``: ``mat_a`` of shape (tokens, in), the expert weights ``mat_b`` (experts, in, out)."""
    mesh = mat_b.device_mesh
    placement = mat_b.placements[0]
    # Integer offsets and other tensor arguments are the same on every rank: used whole.
    args, kwargs = tree_map_only(DTensor, lambda t: t.full_tensor(), (args, kwargs))
    a = mat_a if isinstance(mat_a, DTensor) else DTensor.from_local(mat_a, mesh, [Replicate()], run_check=False)
    if isinstance(placement, (Shard, _StridedShard)) and placement.dim == 2:
        # Each rank's output columns from the whole input; the input's gradient is a partial sum over the ranks.
        local_a = a.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        out = func(local_a, mat_b.to_local(), *args, **kwargs)
        split = Shard(1) if type(placement) is Shard else _StridedShard(1, split_factor=placement.split_factor)
        return DTensor.from_local(out, mesh, [split], run_check=False)
    if type(placement) is Shard and placement.dim == 1:
        # Each rank's input features against its rows of the weight: partial sums, reduced where they are used.
        local_a = a.redistribute(mesh, [Shard(1)]).to_local()
        out = func(local_a, mat_b.to_local(), *args, **kwargs)
        return DTensor.from_local(out, mesh, [Partial()], run_check=False)
    local_a = a.redistribute(mesh, [Replicate()]).to_local()
    out = func(local_a, mat_b.redistribute(mesh, [Replicate()]).to_local(), *args, **kwargs)
    return DTensor.from_local(out, mesh, [Replicate()], run_check=False)


# ------------------------------------------------------------------------------ packed (fused) outputs

_CHUNKS = (torch.Tensor.chunk, torch.chunk)
_SPLITS = (torch.Tensor.split, torch.split)


def equal_parts(func: Callable, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(parts, dim)`` when ``func(*args, **kwargs)`` is a ``split``/``chunk`` into equal parts, else ``None``."""
    if func not in _CHUNKS + _SPLITS or not args or not isinstance(args[0], torch.Tensor):
        return None
    tensor = args[0]
    names = ("chunks",) if func in _CHUNKS else ("split_size_or_sections", "split_size")
    how = args[1] if len(args) > 1 else next((kwargs[name] for name in names if name in kwargs), None)
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % max(tensor.dim(), 1)
    size = tensor.shape[dim]
    parts = None
    if isinstance(how, int) and how > 0 and size % how == 0:
        parts = how if func in _CHUNKS else size // how
    elif isinstance(how, (list, tuple)) and how and len(set(how)) == 1 and sum(how) == size:
        parts = len(how)
    return (parts, dim) if parts is not None and parts > 1 else None


class PackedSplit(RegionOps):
    """Cuts a packed colwise output (strided-sharded: each rank holds its share of every part) locally.

    A fused q/k/v layer split by whole heads holds ``[q_r; k_r; v_r]`` on rank ``r``: its output is a
    ``_StridedShard`` DTensor, and the block's ``split(C, dim=2)`` would make DTensor gather it (no
    sharding rule of torch's maps it to plain shards). Each part's shard is already local, so the parts
    are cut from the local tensor and returned as ``Shard`` DTensors; autograd's ``cat`` of the local
    gradients is the matching backward, also without communication. Active only inside a region with a
    packed layer; every other call passes through.
    """

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        cut = equal_parts(func, args, kwargs)
        if cut is not None and isinstance(args[0], DTensor):
            parts = _local_parts(args[0], *cut)
            if parts is not None:
                return parts
        return super().__torch_function__(func, types, args, kwargs)


def _local_parts(tensor: DTensor, parts: int, dim: int) -> tuple[DTensor, ...] | None:
    mesh = tensor.device_mesh
    placement = tensor.placements[0] if mesh.ndim == 1 else None
    if not isinstance(placement, _StridedShard) or placement.dim != dim or placement.split_factor != parts:
        return None
    local = tensor.to_local()  # its backward wraps the concatenated local gradient in the same strided layout
    return tuple(
        DTensor.from_local(piece, mesh, [Shard(dim)], run_check=False) for piece in local.chunk(parts, dim=dim)
    )

