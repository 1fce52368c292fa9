"""Plan-independent checkpoint state.

parti keys optimizer state by parameter name (the format of ``torch.distributed.checkpoint``), never
by position in the optimizer, so a checkpoint loads under any plan. A checkpoint written by stock
Lightning or plain torch keys it by position; this module translates that on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.optim import Optimizer


def is_named_optimizer_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` keys parameters by name (parti) rather than by position (torch's ``state_dict``)."""
    groups = state.get("param_groups", [])
    params = [p for group in groups for p in group.get("params", [])]
    return all(isinstance(p, str) for p in params) and all(isinstance(k, str) for k in state.get("state", {}))


def named_optimizer_state(state: Mapping[str, Any], module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``state`` keyed by parameter name, translating a positional (torch ``state_dict``) one if needed.

    Positions are read against ``optimizer``'s parameter groups, which must be built the same way as
    those of the optimizer that wrote ``state`` (the same ``configure_optimizers``).
    """
    if not state or is_named_optimizer_state(state):
        return dict(state)
    names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    saved_count = sum(len(group["params"]) for group in state["param_groups"])
    if saved_count != len(ordered):
        raise ValueError(
            f"the checkpoint's optimizer has {saved_count} parameters but this one has {len(ordered)}:"
            " configure_optimizers must build the same parameter groups to resume."
        )
    try:
        by_position = [names[id(p)] for p in ordered]
    except KeyError as err:
        raise ValueError("an optimizer parameter is not a parameter of the module; cannot key it by name") from err
    groups, position = [], 0
    for group in state["param_groups"]:
        count = len(group["params"])
        groups.append({**group, "params": by_position[position : position + count]})
        position += count
    return {"state": {by_position[i]: v for i, v in state["state"].items()}, "param_groups": groups}
