"""How many bytes of state an optimizer keeps per parameter, read from its class and defaults.

Nothing here steps an optimizer: the state is predicted from what torch's optimizers are known to
allocate on their first step, so it can be read from an optimizer built over meta parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim import Optimizer

# Tensors the same shape as the parameter that each optimizer allocates on its first step.
_STATE_TENSORS: dict[type[Optimizer], int] = {
    torch.optim.Adam: 2,
    torch.optim.AdamW: 2,
    torch.optim.NAdam: 2,
    torch.optim.RAdam: 2,
    torch.optim.Adamax: 2,
    torch.optim.Adadelta: 2,
    torch.optim.Adagrad: 1,
    torch.optim.Rprop: 2,
    torch.optim.ASGD: 1,
}
# Optimizers that keep a zero-dim ``step`` tensor per parameter (``rank_state_bytes``' "scalars").
_STEP_SCALAR = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax,
                torch.optim.Adadelta, torch.optim.Adagrad, torch.optim.Rprop, torch.optim.ASGD)
# What an optimizer of an unknown class is assumed to keep: Adam's two moments.
UNKNOWN_STATE_TENSORS = 2


@dataclass(frozen=True)
class OptimizerState:
    """Predicted state of one optimizer.

    Attributes:
        name: the optimizer's class name.
        tensors_per_parameter: parameter-shaped state tensors per parameter (Adam: 2, SGD with momentum: 1).
        state_bytes: bytes of those tensors over all the optimizer's parameters.
        scalar_bytes: bytes of zero-dim state (Adam's ``step`` counters), which no ZeRO stage shards.
        note: how the count was found, when it is an assumption.
    """

    name: str
    tensors_per_parameter: int
    state_bytes: int
    scalar_bytes: int
    note: str = ""


def optimizer_state(optimizer: Optimizer) -> OptimizerState:
    """The state ``optimizer`` will hold after its first step, from its class and ``defaults``."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    count, note = _tensors_per_parameter(optimizer)
    # Why per class and not isinstance: a subclass may keep more state than its base.
    scalar = 4 * len(params) if type(optimizer) in _STEP_SCALAR else 0
    return OptimizerState(type(optimizer).__name__, count, count * param_bytes, scalar, note)


def _tensors_per_parameter(optimizer: Optimizer) -> tuple[int, str]:
    kind, defaults = type(optimizer), optimizer.defaults
    if kind in (torch.optim.Adam, torch.optim.AdamW) and defaults.get("amsgrad"):
        return 3, ""
    if kind is torch.optim.SGD:
        return (1 if defaults.get("momentum", 0) else 0), ""
    if kind is torch.optim.RMSprop:
        return 1 + bool(defaults.get("momentum", 0)) + bool(defaults.get("centered")), ""
    if kind in _STATE_TENSORS:
        return _STATE_TENSORS[kind], ""
    return UNKNOWN_STATE_TENSORS, (
        f"unknown optimizer {kind.__name__}: assumed {UNKNOWN_STATE_TENSORS} state tensors per parameter, as Adam"
    )
