"""The example batch the planner profiles with, found the way the strategy would find it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def example_batch(module: nn.Module, source: Any = None) -> Any:
    """One batch for profiling ``module``.

    Args:
        module: the model.
        source: a dataloader (any iterable of batches) or a ``LightningDataModule``; ``None`` uses
            ``module.example_input_array``.

    Returns:
        the first batch of ``source`` (a datamodule is set up for fitting first), else the module's
        ``example_input_array``.

    Raises:
        ValueError: there is neither, or the dataloader is empty.
    """
    if source is not None:
        if hasattr(source, "train_dataloader") and hasattr(source, "setup"):
            source.setup("fit")
            source = source.train_dataloader()
        if not isinstance(source, Iterable):
            raise ValueError(f"example_batch: {type(source).__name__} is neither a dataloader nor a datamodule.")
        for batch in source:
            return batch
        raise ValueError("example_batch: the dataloader yielded no batch to profile with.")
    example = getattr(module, "example_input_array", None)
    if example is None:
        raise ValueError(
            f"the planner needs one example batch to profile {type(module).__name__}: pass a dataloader or"
            " datamodule, or set `self.example_input_array` in the module."
        )
    return example
