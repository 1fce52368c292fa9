"""A pipelined trunk call's arguments and results: split per micro-batch, handed values, output structure.

Pure functions over a call's ``(args, kwargs)``; :mod:`.runtime` uses them to run the trunk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from parti_lightning.parallel.scratch import ScratchCache, is_cache


def handed_in(extras: Any, handed: dict[int, tuple[int, int]], produced: dict[tuple[int, int], Tensor]) -> Any:
    """A block's extra arguments with each stand-in for an earlier block's output replaced by that output."""
    if not handed:
        return extras
    return torch.utils._pytree.tree_map_only(
        Tensor, lambda t: produced[handed[id(t)]] if id(t) in handed else t, extras
    )


def leaves(value: Any) -> list[Any]:
    """The leaves of a call's arguments (torch's pytree order)."""
    return torch.utils._pytree.tree_leaves(value)


def split_extras(extras: Any, batch: int, parts: int, index: int) -> Any:
    """Micro-batch ``index`` of ``parts`` of a block's extra arguments."""
    # Batch-sized tensors (a padding mask) are split like the hidden state; others (a causal mask,
    # rotary tables, position ids of batch 1) are the same for every micro-batch.
    size = batch // parts

    def split(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
            return value.narrow(0, index * size, size)
        return value

    return torch.utils._pytree.tree_map(split, extras)


def template_key(extras: Any) -> str:
    """A key for the structure blocks return on these arguments."""
    # The non-tensor arguments (flags like output_attentions) decide a block's output structure; a cache
    # object (a new one each forward) by its kind.
    return repr([_leaf_key(leaf) for leaf in torch.utils._pytree.tree_leaves(extras)])


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, ScratchCache):
        leaf = leaf.template
    return "T" if isinstance(leaf, Tensor) else type(leaf).__name__ if is_cache(leaf) else leaf


def shaped_like(template: Any, hidden: Tensor) -> Any:
    """The trunk's output in the structure the blocks return; elements other than the first are ``None``."""
    if template is None:
        return hidden
    kind, length = template
    return kind([hidden, *([None] * (length - 1))])


def crossing_values(
    extras: list[Any], handed: dict[int, tuple[int, int]], starts: list[int], num_blocks: int
) -> list[list[tuple[int, int]]]:
    """For each stage boundary, the handed values made by a block before it and taken by a block after it.

    Args:
        extras: each block's extra arguments, in block order.
        handed: the stand-ins the blocks were given, by id -> (making block, output position).
        starts: the first block of each stage.
        num_blocks: how many blocks the trunk has.
    """
    if not handed:
        return []
    ends = [*starts[1:], num_blocks]
    stage_of = [s for s, (a, b) in enumerate(zip(starts, ends, strict=True)) for _ in range(a, b)]
    taken = [(handed[id(t)], g) for g, e in enumerate(extras) for t in leaves(e) if id(t) in handed]
    boundaries = [
        sorted({ref for ref, g in taken if stage_of[ref[0]] <= b < stage_of[g]}) for b in range(len(starts) - 1)
    ]
    if len({len(refs) for refs in boundaries}) > 1:
        raise NotImplementedError(
            "pipelined trunk: a different number of values handed between blocks crosses each stage boundary"
            f" ({[len(refs) for refs in boundaries]}); cut the stages where the same values cross."
        )
    return boundaries
