"""How the user's calls of the trunk's blocks reach the pipelined trunk, and the blocks other ranks hold.

A block of another stage keeps its attributes but loses its tensors (:func:`free_block`); every block's
class is swapped for a subclass whose ``__call__`` hands the call to its trunk (:func:`route_block_calls`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from torch import nn

if TYPE_CHECKING:
    from parti_lightning.parallel.pipeline.runtime import PipelinedTrunk

# block -> (trunk, index): how a block's call finds the pipelined trunk it belongs to. Weak, and not
# an attribute, so the user's modules carry no reference to process groups (deepcopy, pickling).
_ROUTES: WeakKeyDictionary[nn.Module, tuple[PipelinedTrunk, int]] = WeakKeyDictionary()
_INTERCEPTING_CLASSES: dict[type, type] = {}



def free_block(block: nn.Module) -> None:
    """Release ``block``'s parameters and buffers: another pipeline rank holds them."""
    # Parameters and buffers set to None stay declared (attribute access keeps working for code that
    # reads e.g. a block's config) but hold no memory and vanish from parameters() and state_dict().
    for sub in block.modules():
        for name in list(sub._parameters):
            sub._parameters[name] = None
        for name in list(sub._buffers):
            sub._buffers[name] = None


def route_block_calls(trunk: PipelinedTrunk) -> None:
    """Make every call of a trunk block from the user's forward go to ``trunk`` (the stage runs the blocks itself)."""
    for index, block in enumerate(trunk.blocks):
        _intercept(block)
        _ROUTES[block] = (trunk, index)


def _intercept(block: nn.Module) -> None:
    """Swap ``block``'s class for a subclass whose ``__call__`` routes the user's calls to the pipelined trunk.

    A subclass rather than a patched ``forward``: the stage must still run the block through its
    own ``__call__`` with all hooks (FSDP's unshard, activation checkpointing), and Python looks
    ``__call__`` up on the class. FSDP swaps classes the same way, and composes with this one.
    """
    cls = type(block)
    if cls in _INTERCEPTING_CLASSES.values():
        return
    sub = _INTERCEPTING_CLASSES.get(cls)
    if sub is None:

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
            route = _ROUTES.get(self)
            if route is None or route[0].running:
                return super(sub, self).__call__(*args, **kwargs)
            trunk, index = route
            return trunk.intercept(index, args, kwargs)

        sub = type(f"Pipelined{cls.__name__}", (cls,), {"__call__": __call__, "__module__": cls.__module__})
        _INTERCEPTING_CLASSES[cls] = sub
    block.__class__ = sub
