"""The pipeline trunk's contract, checked in the launching process before any rank starts.

A pipelined plan needs the user's forward to treat the trunk of repeated blocks as a chain
(:func:`~parti_lightning.parallel.pipeline.contract.check_trunk_contract`). That check needs one
batch and one run of ``training_step``; here it runs on a meta copy of the module (no memory, no
compute) on the first batch of a ``DataLoader`` passed to ``fit`` (no worker processes, the caller's
RNG left as it was), else on ``example_input_array`` through ``forward``. Some code cannot run on meta
tensors (it reads values, as Hugging Face's mask and loss code do): then a module of at most
``REAL_COPY_BYTES`` runs on a real copy, without gradients. A datamodule is not set up here
(``prepare_data`` has not run), and larger modules are not copied: then the check runs at setup, on the
first real batch, before any step, as it always does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils._pytree import tree_map_only
from torch.utils.data import DataLoader

from parti_lightning.parallel.copies import REAL_COPY_BYTES, state_bytes, trial_copy
from parti_lightning.parallel.pipeline.contract import check_trunk_contract
from parti_lightning.planner.profile import meta_copy


class _DryRunUnavailable(Exception):
    """The example could not run on meta tensors: not a verdict on the contract."""


def check_trunk_before_launch(module: LightningModule, fit_args: tuple[Any, ...]) -> str:
    """Check the trunk contract on a meta copy of ``module``; returns what was checked, in words.

    Args:
        module: the user's module.
        fit_args: what ``Trainer.fit`` hands its launcher: ``(model, train_dataloaders, ...)``.

    Raises:
        ValueError: the forward breaks the trunk contract, or there is no repeated trunk (the message
            names what broke).
    """
    loader = fit_args[1] if len(fit_args) > 1 else None
    if isinstance(loader, DataLoader) and loader.num_workers == 0:
        with isolate_rng():  # a shuffling sampler draws from the global generator
            batch = next(iter(loader), None)
        if batch is None:
            return "not checked before launch (the loader is empty)"
        how, example = "training_step on the first batch of the loader", lambda m, b: m.training_step(b, 0)
    elif getattr(module, "example_input_array", None) is not None:
        batch = module.example_input_array
        how = "forward on example_input_array"

        def example(m: LightningModule, b: Any) -> Any:
            return m(*b) if isinstance(b, tuple) else m(b)
    else:
        return "checked at setup (no DataLoader passed to fit and no example_input_array)"
    meta_batch = tree_map_only(Tensor, lambda t: torch.empty_like(t, device="meta"), batch)
    try:
        _dry_run(meta_copy(module), example, meta_batch)
    except _DryRunUnavailable as err:
        if state_bytes(module) > REAL_COPY_BYTES:
            return f"checked at setup ({how} cannot run on meta tensors: {str(err)[:200]})"
        try:
            with torch.no_grad(), isolate_rng():
                _dry_run(trial_copy(module), example, batch)
        except _DryRunUnavailable as real_err:
            return f"checked at setup ({how} cannot run before launch: {str(real_err)[:200]})"
        return f"checked before launch ({how}, on a copy of the module: it cannot run on meta tensors)"
    return f"checked before launch ({how}, on meta tensors)"


def _dry_run(copy: LightningModule, example: Any, batch: Any) -> None:
    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # self.log without a Trainer
                example(copy, batch)
        except Exception as err:  # noqa: BLE001 - any failure of the example defers the check to setup
            raise _DryRunUnavailable(f"{type(err).__name__}: {err}") from err

    check_trunk_contract(copy, run)
