"""Parameter names: the one map from a module's parameters to the names checkpoints and optimizers use.

Every name-keyed structure in parti (checkpoints, optimizer state by name, ZeRO-1's consolidation)
goes through this map, so all of them agree with each other and with torch's
``torch.distributed.checkpoint``: a tied parameter is named once, by the first name
``named_parameters()`` gives it.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer


def parameter_names(module: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter this rank holds, to its name in ``module`` (the first name of a tied one).

    Parameters hash by identity, and an optimizer's parameters are the module's own objects. A rank
    that holds only part of the model (a pipeline stage) maps only what it holds.
    """
    return {param: name for name, param in module.named_parameters()}


def optimizer_parameter_names(module: nn.Module, optimizer: Optimizer) -> list[str]:
    """The name of each parameter of ``optimizer``, in its state-dict index order (groups in order).

    Raises:
        ValueError: an optimizer parameter is not a parameter of ``module``.
    """
    names = parameter_names(module)
    ordered = [param for group in optimizer.param_groups for param in group["params"]]
    missing = sum(param not in names for param in ordered)
    if missing:
        raise ValueError(f"{missing} optimizer parameter(s) are not parameters of {type(module).__name__}.")
    return [names[param] for param in ordered]
