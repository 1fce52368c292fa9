"""Activation checkpointing of whole units (usually the repeated blocks).

Applied before storage sharding: the recomputation then runs inside each FSDP unit's backward,
after FSDP has all-gathered that unit's parameters for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.distributed._composable import checkpoint


def apply_activation_checkpointing(module: nn.Module, units: Sequence[tuple[str, nn.Module]]) -> nn.Module:
    """Recompute each unit's activations in the backward pass instead of storing them.

    Uses torch's composable ``checkpoint`` (non-reentrant ``torch.utils.checkpoint`` run from forward
    hooks) rather than ``checkpoint_wrapper``: the wrapper inserts a ``_checkpoint_wrapped_module``
    level into every parameter name, which would leak into optimizer parameter groups built from
    ``named_parameters()`` and into anything else keyed by name. The hooks leave the module tree and
    its names as they were, and compose with ``fully_shard``.

    Args:
        module: the model (returned as is, modified in place).
        units: ``(name, submodule)`` pairs, e.g. from :func:`~parti_lightning.parallel.blocks.resolve_units`.
            A unit inside another unit is skipped: the outer recomputation already covers it.

    Returns:
        ``module``.
    """
    for _, unit in _outermost(units):
        checkpoint(unit)
    return module


def _outermost(units: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    names = [name for name, _ in units]
    return [(name, unit) for name, unit in units if not any(name.startswith(f"{other}.") for other in names)]
