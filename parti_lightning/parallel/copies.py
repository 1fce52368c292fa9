"""Copies of a user's module to trial-run (the tensor setup check, the planner's profile and timing, the pipeline
contract's dry run before launch).

``copy.deepcopy`` fails on a module that holds a process group (``SyncBatchNorm`` and parti's CPU one after
``sync_batchnorm=True``: "cannot pickle ProcessGroup"). A process group is a handle to the run's
communicator, not state of the module: the copy shares it with the original, as it shares the classes.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import nn
from torch.distributed import ProcessGroup

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# The largest module (parameters and buffers) copied whole for a trial run its code cannot make on meta tensors
# (it reads values: Hugging Face's mask and loss code). The process holds the module already, and a copy of this
# size is cheap next to a rank's start-up.
REAL_COPY_BYTES = 1 << 30


def module_copy(module: ModuleT, memo: dict[int, Any] | None = None) -> ModuleT:
    """A deep copy of ``module`` that shares the process groups its submodules hold with the original.

    Args:
        module: the module to copy.
        memo: ``copy.deepcopy``'s memo, for objects the caller replaces or shares too.
    """
    memo = {} if memo is None else memo
    for submodule in module.modules():
        for value in vars(submodule).values():
            if isinstance(value, ProcessGroup):
                memo.setdefault(id(value), value)
    return copy.deepcopy(module, memo)


def state_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers: what :func:`trial_copy` copies."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def trial_copy(module: ModuleT, memo: dict[int, Any] | None = None) -> ModuleT:
    """A copy of ``module`` for a trial run that must not touch the original (its own tensors, unless ``memo``
    replaces them: the planner's meta copy).

    A LightningModule's Trainer (or Fabric) is left out: it would drag its dataloaders into the copy.
    """
    memo = {} if memo is None else memo
    for attribute in ("_trainer", "_fabric"):
        owner = getattr(module, attribute, None)
        if owner is not None:
            memo[id(owner)] = None
    return module_copy(module, memo)
