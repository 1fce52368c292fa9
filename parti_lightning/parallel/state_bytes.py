"""The bytes of parameters, gradients and optimizer state one rank holds, counted from the tensors.

What a plan is checked against (a model-parallel or sharded plan must really hold less than a replicated
one) and what the benchmarks report: local shards only, never an estimate.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

_BYTE_KEYS = ("parameters", "gradients", "optimizer_state", "scalars")


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


def _count(counts: dict[str, int], key: str, tensor: Tensor) -> None:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    counts["scalars" if local.dim() == 0 else key] += local.numel() * local.element_size()
