"""Checkpoints of a model whose ranks each hold part of it (the stages of one pipeline).

A pipeline rank holds its own stage's blocks and a shard of the rest (made whole before its part is
gathered). To write one whole state, each rank's name-keyed part is gathered on the first rank and ordered
as the whole module orders its names; to load a whole state, each rank keeps the entries its part holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import nn

from parti_lightning.parallel.names import parameter_names


def module_order(module: nn.Module) -> list[str]:
    """Every parameter and buffer name of the whole model in module order, those of freed blocks included.

    A pipeline stage frees the other stages' blocks by setting their tensors to ``None``: the names stay
    registered, so each rank can order the union of all ranks' names as one process would.
    """
    return [
        f"{prefix}.{key}" if prefix else key
        for prefix, submodule in module.named_modules()
        for key in (*submodule._parameters, *submodule._buffers)
    ]


def _gather_to_first(obj: Any, group: dist.ProcessGroup) -> list[Any] | None:
    """Every rank's ``obj`` on the group's first rank (``None`` elsewhere). Collective."""
    first = dist.get_group_rank(group, dist.get_rank()) == 0
    out: list[Any] | None = [None] * dist.get_world_size(group) if first else None
    dist.gather_object(obj, out, group=group, group_dst=0)
    return out


def gather_parts(module: nn.Module, part: Mapping[str, Any], group: dist.ProcessGroup) -> dict[str, Any]:
    """The union of every rank's name-keyed ``part`` over ``group``, in module order, on global rank 0. Collective.

    Other ranks get ``{}``, as a gathered state does. For ranks that each hold part of the model (the
    stages of one pipeline): each part is that rank's names, replicated ones alike on every rank.
    """
    parts = _gather_to_first(dict(part), group)
    if parts is None or dist.get_rank() != 0:
        return {}
    merged = {name: value for one in parts for name, value in one.items()}
    order = {name: i for i, name in enumerate(module_order(module))}
    return dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order))))


def gather_optimizer_parts(module: nn.Module, part: Mapping[str, Any], group: dist.ProcessGroup) -> dict[str, Any]:
    """:func:`gather_parts` for a name-keyed optimizer state: states united, each group's names united in order."""
    parts = _gather_to_first(dict(part), group)
    if parts is None or dist.get_rank() != 0:
        return {}
    order = {name: i for i, name in enumerate(module_order(module))}
    groups = []
    for index, group_0 in enumerate(parts[0]["param_groups"]):
        names = {name for one in parts for name in one["param_groups"][index]["params"]}
        groups.append({**group_0, "params": sorted(names, key=lambda n: order.get(n, len(order)))})
    state = {name: value for one in parts for name, value in one["state"].items()}
    return {"state": dict(sorted(state.items(), key=lambda item: order.get(item[0], len(order)))),
            "param_groups": groups}


def restrict_to_module(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a whole model's state dict that this rank's (partial) module holds."""
    held = module.state_dict().keys()
    return {key: value for key, value in state_dict.items() if key in held}


def restrict_optimizer_to_module(module: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state cut down to the parameters this rank's (partial) module holds."""
    held = set(parameter_names(module).values())
    return {
        "state": {name: value for name, value in state.get("state", {}).items() if name in held},
        "param_groups": [
            {**group, "params": [name for name in group["params"] if name in held]}
            for group in state.get("param_groups", [])
        ],
    }
