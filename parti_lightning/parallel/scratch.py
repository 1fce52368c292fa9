"""Key/value caches a model hands its blocks: per-pass scratch when they are empty at the trunk's entry.

Hugging Face decoders at their defaults (``use_cache=True``) make a fresh cache object in every forward,
training included, and pass it to every layer (``past_key_values=``, ``cache=``, GPT-NeoX's
``layer_past=``); each layer appends its keys and values to its own slot and reads them back at once.
Empty when the trunk starts, such a cache is scratch of that one pass: running a block on a fresh empty
cache of the same kind computes the same function. That is what lets a block be run twice (the tensor
parallel setup check) or a trunk be cut into stages and micro-batches (pipeline parallel), each run with
its own cache. A cache that already holds keys and values when the trunk starts (generation's prompt) is
state carried between passes, which only a run that keeps the whole trunk together can use.

Caches are recognised by their class (Hugging Face's ``Cache`` base, by name, so that nothing here
imports transformers) or by the argument they come in as.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

# Keyword arguments through which a block reads or writes a key/value cache.
CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past", "kv_cache")
# Nesting a cache's tensors are searched to (EncoderDecoderCache -> DynamicCache -> layers -> tensors).
_DEPTH = 6


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a key/value cache object (a Hugging Face ``Cache`` or a class named like one)."""
    if value is None or isinstance(value, (torch.Tensor, int, float, bool, str)):
        return False
    names = [cls.__name__ for cls in type(value).__mro__]
    return "Cache" in names or (names[0].endswith("Cache") and callable(getattr(value, "update", None)))


def is_empty(value: Any) -> bool:
    """Whether a cache holds no keys or values: no tensor of one or more dimensions with elements inside it.

    Zero-dimensional tensors are settings, not content (a sliding-window layer keeps its window size as one).
    """
    return not any(t.dim() and t.numel() for t in _tensors_in(value, _DEPTH))


@dataclass(frozen=True)
class ScratchCache:
    """Stands for an empty cache in a recorded call: each use gets its own fresh copy of it."""

    template: Any

    def fresh(self) -> Any:
        return copy.deepcopy(self.template)


def caches_in(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """The caches among a block call's arguments (``args`` with the hidden state first), each with a readable name."""
    found = [
        (repr(key), value)
        for key, value in kwargs.items()
        if is_cache(value) or (key in CACHE_KWARGS and value is not None and not isinstance(value, bool))
    ]
    found += [(f"positional argument {i + 1}", value) for i, value in enumerate(args) if i > 0 and is_cache(value)]
    return found


def filled_caches(args: tuple, kwargs: dict) -> list[str]:
    """Names and sizes of the caches among a block call's arguments that already hold keys or values."""
    found = caches_in(args, kwargs)
    return [f"{name} ({type(value).__name__}, {_length(value)})" for name, value in found if not is_empty(value)]


class CacheTemplates:
    """Empty copies of the caches the blocks of one forward were handed, taken while they were still empty.

    A pre-hook on every block calls :meth:`see`; a cache is copied the first time a block gets it (at the
    trunk's entry it is still empty). :meth:`scratch` then turns any call's arguments into ones that
    stand for fresh empty caches, which is right for every block of that pass, whatever the earlier
    blocks had written by then.
    """

    def __init__(self) -> None:
        # id -> (the cache, kept alive so its id is not reused; its empty copy, or None if it was not empty)
        self._seen: dict[int, tuple[Any, Any]] = {}

    def see(self, args: tuple, kwargs: dict) -> None:
        for _, value in caches_in(args, kwargs):
            if id(value) not in self._seen:
                self._seen[id(value)] = (value, copy.deepcopy(value) if is_empty(value) else None)

    def scratch(self, call: tuple[tuple, dict]) -> tuple[tuple, dict]:
        """A call's ``(args, kwargs)`` with each cache that was empty at first sight as a :class:`ScratchCache`."""

        def swap(value: Any) -> Any:
            seen = self._seen.get(id(value))
            return ScratchCache(seen[1]) if seen is not None and seen[0] is value and seen[1] is not None else value

        args, kwargs = call
        return tuple(swap(value) for value in args), {key: swap(value) for key, value in kwargs.items()}


def fresh_caches(value: Any) -> Any:
    """``value`` with every :class:`ScratchCache` replaced by its own fresh empty cache."""
    return tree_map_only(ScratchCache, ScratchCache.fresh, value)


def _length(cache: Any) -> str:
    length = getattr(cache, "get_seq_length", None)
    try:
        return f"{int(length())} positions" if callable(length) else "not empty"
    except Exception:  # noqa: BLE001 - only a description: a cache whose length cannot be read is "not empty"
        return "not empty"


def _tensors_in(value: Any, depth: int) -> list[torch.Tensor]:
    # Why a walk of attributes by hand: caches are not pytrees and have no common accessor for their
    # tensors (Hugging Face's layers keep them as attributes, older caches in lists of tuples).
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0 or isinstance(value, (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)):
        return []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())
    else:
        return []
    return [t for item in items for t in _tensors_in(item, depth - 1)]
