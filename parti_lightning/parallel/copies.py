"""Copies of a user's module to trial-run (the tensor setup check, the planner's profile and timing).

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
