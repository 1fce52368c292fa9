"""Which submodules are the units of sharding and activation checkpointing.

A transformer is a stem, a trunk of repeated blocks and a head. Sharding each block as its own
unit (one all-gather / reduce-scatter per block) is what keeps only one block's parameters
unsharded at a time; checkpointing each block keeps one block's activations. These functions
only walk the module tree (no parameter data is read), so they run on a meta-device model
before anything is launched.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence

from torch import nn

# Containers whose same-class children are taken as repeated blocks. ModuleDict is left out on
# purpose: it usually holds heterogeneous parts (nanoGPT keeps its two embeddings, one of them
# tied to the head, in one), which are not blocks.
_CONTAINERS = (nn.ModuleList, nn.Sequential)
# How many valid names an unknown-unit error lists.
_NAMES_IN_ERROR = 8


def find_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``module``, found from its structure.

    A block is a child of an ``nn.ModuleList`` or ``nn.Sequential`` whose class at least one other
    child of that container shares, and that holds parameters. The search stops at the first
    (outermost) repeated level: blocks are not searched for blocks of their own, so a list of
    stages that each hold a list of layers yields the stages.

    Args:
        module: the model; may live on the meta device.

    Returns:
        ``(name, block)`` pairs, names as in ``module.named_modules()``, in module order. Empty when
        nothing repeats.
    """
    blocks: list[tuple[str, nn.Module]] = []
    _collect_blocks(module, "", blocks, seen=set())
    return blocks


def find_trunks(module: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """The repeated blocks of ``module`` grouped by the container that holds them: one trunk per container.

    An encoder-decoder has two (the encoder's layers, the decoder's); a decoder-only model one.
    """
    trunks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, block in find_blocks(module):
        trunks.setdefault(name.rpartition(".")[0], []).append((name, block))
    return list(trunks.values())


def resolve_units(module: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The units named by ``names``, or the automatically found blocks when ``names`` is ``None``.

    Args:
        module: the model; may live on the meta device.
        names: submodule names as in ``module.named_modules()`` (e.g. ``"layers.0"``), typically
            ``plan.sharding_units``. Duplicates are dropped; the order is kept.

    Returns:
        ``(name, submodule)`` pairs.

    Raises:
        ValueError: a name is not a submodule of ``module`` (the message lists close or a few valid
            names), or names the root module, which is always its own unit.
    """
    if names is None:
        return find_blocks(module)
    modules = dict(module.named_modules())
    units = []
    for name in dict.fromkeys(names):
        if name == "":
            raise ValueError(
                "sharding unit '' names the root module, which is always sharded as the last unit: drop it from"
                " the list of units."
            )
        if name not in modules:
            raise ValueError(_unknown_unit_message(module, name, modules))
        units.append((name, modules[name]))
    return units


def _collect_blocks(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]], seen: set[int]) -> None:
    repeated = _repeated_child_names(module) if isinstance(module, _CONTAINERS) else set()
    for name, child in module.named_children():
        # Why `seen`: one module instance registered under two names must be listed (and sharded) once.
        if id(child) in seen:
            continue
        seen.add(id(child))
        path = f"{prefix}{name}"
        if name in repeated:
            out.append((path, child))
        else:
            _collect_blocks(child, f"{path}.", out, seen)


def _repeated_child_names(container: nn.Module) -> set[str]:
    children = [(name, child) for name, child in container.named_children() if _has_parameters(child)]
    counts = Counter(type(child) for _, child in children)
    return {name for name, child in children if counts[type(child)] >= 2}


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _unknown_unit_message(module: nn.Module, name: str, modules: dict[str, nn.Module]) -> str:
    candidates = [n for n in modules if n]
    close = difflib.get_close_matches(name, candidates, n=3)
    shown = close or [n for n, _ in find_blocks(module)][:_NAMES_IN_ERROR] or candidates[:_NAMES_IN_ERROR]
    label = "close matches" if close else "valid names include"
    return (
        f"sharding unit {name!r} is not a submodule of {type(module).__name__}; {label}: "
        f"{', '.join(map(repr, shown))} ({len(candidates)} submodules in all, as in model.named_modules())."
    )
