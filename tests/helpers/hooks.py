"""Record the order in which Lightning calls module and callback hooks under a strategy."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from scenarios import SEED, ToyRegressor, make_dataset

_MODULE_HOOKS = [
    "configure_model", "setup", "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_batch_start",
    "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
    "on_train_batch_end", "on_train_epoch_end", "on_validation_start", "on_validation_epoch_start",
    "on_validation_batch_start", "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end",
    "on_train_end", "on_fit_end", "teardown", "on_save_checkpoint",
]
_CALLBACK_HOOKS = [name for name in dir(L.Callback) if name.startswith("on_") or name in ("setup", "teardown")]


def _recording(name: str, base: Any):  # noqa: ANN202 - builds a method
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(name)
        return getattr(base, name)(self, *args, **kwargs)

    return method


class HookedModule(ToyRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(), batch_size=16)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, _ = self._loss(batch, batch_idx)
        self.log("val_loss", loss, sync_dist=True)


for _name in _MODULE_HOOKS:
    setattr(HookedModule, _name, _recording(_name, ToyRegressor))


class HookedCallback(L.Callback):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls


for _name in _CALLBACK_HOOKS:
    setattr(HookedCallback, _name, _recording(_name, L.Callback))


def record_hooks(strategy: str) -> list[str] | None:
    """Fit 4 steps with a validation run; the module's and a callback's hook calls on rank 0, else None."""
    L.seed_everything(SEED, verbose=False)
    module = HookedModule()
    callback_calls: list[str] = []
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=4, val_check_interval=2, limit_val_batches=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HookedCallback(callback_calls)],
    )
    trainer.fit(module)
    torch.distributed.barrier()
    if not trainer.is_global_zero:
        return None
    return module.calls + ["--- callback ---"] + callback_calls
