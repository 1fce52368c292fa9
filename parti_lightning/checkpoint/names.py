"""Optimizer state keyed by parameter name (parti) or by position (torch's ``Optimizer.state_dict``).

parti keys optimizer state by the module's parameter names, so that it loads under any plan, whatever
order and grouping of parameters another plan's optimizer holds. Stock Lightning files key it by
position; these functions translate between the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from parti_lightning.parallel.names import optimizer_parameter_names


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
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    saved_count = sum(len(group["params"]) for group in state["param_groups"])
    if saved_count != len(ordered):
        raise ValueError(
            f"the checkpoint's optimizer has {saved_count} parameters but this one has {len(ordered)}:"
            " configure_optimizers must build the same parameter groups to resume."
        )
    return positional_to_named(state, optimizer_parameter_names(module, optimizer))


def positional_to_named(state: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A torch ``Optimizer.state_dict()`` keyed by ``names[position]`` instead of positions."""
    groups, position = [], 0
    for group in state["param_groups"]:
        count = len(group["params"])
        groups.append({**group, "params": list(names[position : position + count])})
        position += count
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def named_to_positional(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`positional_to_named`: positions in the order the groups list the names."""
    position_of: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            position_of[name] = len(position_of)
            params.append(position_of[name])
        groups.append({**group, "params": params})
    return {
        "state": {position_of[name]: v for name, v in state["state"].items() if name in position_of},
        "param_groups": groups,
    }
