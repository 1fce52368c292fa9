"""Gradient norms and clipping over parameters that live on several device meshes.

Under tensor parallelism with sharded storage, the parameters of one model are ``DTensor``s on different
meshes: a block's layers on the ``(shard, tensor)`` mesh, the embeddings and head on the ``shard`` mesh
alone, a tensor-parallel parameter FSDP left whole on the ``tensor`` mesh. torch's ``clip_grad_norm_``
stacks the per-tensor norms into one tensor, which DTensor refuses across meshes, and its foreach
scaling runs one op over all of them. So the norm is taken per mesh (each reduced over its own mesh,
counting a replicated tensor once) and the per-mesh norms are combined as plain numbers; the scaling
runs per mesh too. With one mesh, or none, this is exactly what ``torch.nn.utils.clip_grad_norm_`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "total_norm"]


def total_norm(grads: Iterable[Tensor], norm_type: float = 2.0, device: torch.device | None = None) -> Tensor:
    """The ``norm_type`` norm of all of ``grads`` together, as a plain tensor (zero for no gradient).

    A ``DTensor`` gradient's norm is the norm of the whole tensor: its mesh's collectives reduce it.
    Every rank of each mesh involved must call this.
    """
    norms = [
        norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        for norm in (torch.nn.utils.get_total_norm(group, norm_type) for group in _by_mesh(grads).values())
    ]
    if not norms:
        return torch.zeros((), device=device)
    if len(norms) == 1:
        return norms[0].float()  # as torch computes it (a norm of one norm would round it once more)
    stacked = torch.stack([norm.float().to(norms[0].device) for norm in norms])
    return torch.linalg.vector_norm(stacked, norm_type)


def clip_grads_with_norm_(parameters: Iterable[Tensor], max_norm: float, norm: Tensor) -> None:
    """Scale the gradients of ``parameters`` in place by ``max_norm / norm`` where that is below one, as torch's
    function of this name does."""
    with_grads = [p for p in parameters if p.grad is not None]
    for group in _by_mesh(with_grads, key=lambda param: param.grad).values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters on several meshes: clips by, and returns, the total norm."""
    params = [p for p in parameters if p.grad is not None]
    norm = total_norm([p.grad for p in params], norm_type)
    clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _by_mesh(tensors: Iterable[Tensor], key: Callable[[Tensor], Any] = lambda t: t) -> dict[object, list[Tensor]]:
    """``tensors`` grouped by the device mesh of ``key(tensor)`` (``None`` for a plain tensor), in order."""
    groups: dict[object, list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(getattr(key(tensor), "device_mesh", None), []).append(tensor)
    return groups
