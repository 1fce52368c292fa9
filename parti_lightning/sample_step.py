"""One real training step on one batch, for techniques that check themselves before training.

Tensor parallelism runs each block with its rules and without them on the inputs the block really
gets, and compares; pipeline parallelism checks that the trunk's blocks are called as a chain. Both
run this: the user's own ``training_step`` on the first
training batch, the same batch on every rank, with no gradients and nothing logged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils._pytree import tree_flatten
from torchmetrics import Metric

from parti_lightning.autoplan import training_batch


class SampleStep:
    """Runs ``module.training_step`` once on the first training batch when called. Collective to build.

    Global rank 0 draws the batch (as ``plan="auto"`` does) and sends it to every rank, so every rank
    runs the same step whatever its sampler would give it.
    """

    def __init__(self, trainer: Trainer, module: LightningModule, device: torch.device) -> None:
        box = [training_batch(trainer, module) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        self.module = module
        self.batch = move_data_to_device(box[0], device)

    @property
    def batch_size(self) -> int | None:
        """The length of the batch's first tensor, the batch size a data-parallel rank's step gets."""
        first = next((t for t in tree_flatten(self.batch)[0] if isinstance(t, torch.Tensor) and t.dim()), None)
        return None if first is None else int(first.shape[0])

    def __call__(self) -> Any:
        module = self.module
        with torch.no_grad(), isolate_rng(), _nothing_logged(module), _state_restored(module):
            try:
                return module.training_step(self.batch, 0)
            except Exception as err:
                raise RuntimeError(
                    f"parti checks how it splits {type(module).__name__} by running its training_step on the first"
                    f" training batch before training, which failed: {type(err).__name__}: {err}"
                ) from err


@contextmanager
def _nothing_logged(module: LightningModule) -> Iterator[None]:
    # Outside the fit loop Lightning has no result collection to log into, and this step is not part of
    # training anyway: `self.log` and `self.log_dict` do nothing for its duration (instance attributes
    # shadow the methods; deleting them restores the methods).
    module.log = module.log_dict = _ignore  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


@contextmanager
def _state_restored(module: LightningModule) -> Iterator[None]:
    """What a training step changes besides parameters comes back as it was: buffers (batch norm's running
    statistics) and torchmetrics' accumulated state, so that training starts as it would have without
    this step. (Other side effects of the user's code, such as counters it keeps itself, are not undone.)"""
    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    metrics = [(m, _metric_state(m)) for m in module.modules() if isinstance(m, Metric)]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        for metric, state in metrics:
            for key, value in state.items():
                setattr(metric, key, value)


def _metric_state(metric: Metric) -> dict[str, Any]:
    # torchmetrics keeps a metric's accumulated state in the attributes its `add_state` registered
    # (listed in `_defaults`), plus its update count and cached result; no public API snapshots and
    # restores them (checked against torchmetrics 1.9).
    names = [*metric._defaults, "_update_count", "_computed"]
    return {name: copy.deepcopy(getattr(metric, name)) for name in names}


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
