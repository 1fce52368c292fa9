"""One real training step on one batch, for techniques that check themselves before training.

Tensor parallelism runs each block with its rules and without them on the inputs the block really
gets, and compares. Those inputs come from here: the user's own ``training_step`` on the first
training batch, the same batch on every rank, with no gradients and nothing logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng

from parti_lightning.autoplan import training_batch


def sample_step(trainer: Trainer, module: LightningModule, device: torch.device) -> Callable[[], Any]:
    """A callable that runs ``module.training_step`` once on the first training batch. Collective to build.

    Global rank 0 draws the batch (as ``plan="auto"`` does) and sends it to every rank, so every rank
    runs the same step whatever its sampler would give it.
    """
    box = [training_batch(trainer, module) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    batch = move_data_to_device(box[0], device)

    def run() -> Any:
        with torch.no_grad(), isolate_rng(), _nothing_logged(module):
            try:
                return module.training_step(batch, 0)
            except Exception as err:
                raise RuntimeError(
                    f"parti checks its tensor-parallel rules by running {type(module).__name__}.training_step on"
                    f" the first training batch before training, which failed: {type(err).__name__}: {err}"
                ) from err

    return run


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


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
