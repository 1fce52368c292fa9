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

from parti_lightning.lightning_adapters.autoplan import training_batch


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
        quiet = (_nothing_logged(module), _state_restored(module), _inert_optimization(module))
        with torch.no_grad(), isolate_rng(), quiet[0], quiet[1], quiet[2]:
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
def _inert_optimization(module: LightningModule) -> Iterator[None]:
    """Under manual optimization, a ``training_step`` that drives its own optimizers runs without changing them.

    The optimizers do not exist yet (they are built over the parameters the plan leaves), so
    ``self.optimizers()`` and ``self.lr_schedulers()`` give stand-ins of the ones ``configure_optimizers``
    returns, in the same number and order: their ``step`` runs the closure it is given and changes nothing
    else; ``manual_backward`` and ``clip_gradients`` do nothing (no gradients flow in this step).
    """
    if module.automatic_optimization:
        yield
        return
    # Lightning's own parser of what configure_optimizers returns (private; checked against 2.6.6).
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
    inert_optimizers = [_InertOptimizer(optimizer) for optimizer in optimizers]
    inert_schedulers = [_InertScheduler(config.scheduler) for config in schedulers]
    replaced = {
        "optimizers": lambda use_pl_optimizer=True: _one_or_list(inert_optimizers),
        "lr_schedulers": lambda: _one_or_list(inert_schedulers) if inert_schedulers else None,
        "manual_backward": _ignore,
        "clip_gradients": _ignore,
        "toggle_optimizer": _ignore,
        "untoggle_optimizer": _ignore,
    }
    for name, value in replaced.items():
        setattr(module, name, value)  # instance attributes shadow the methods, as in `_nothing_logged`
    try:
        yield
    finally:
        for name in replaced:
            delattr(module, name)


class _InertOptimizer:
    """An optimizer's stand-in in the sample step: the same parameter groups, a ``step`` that only runs its closure."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    @contextmanager
    def toggle_model(self, sync_grad: bool = True) -> Iterator[None]:
        yield


class _InertScheduler:
    """Stands in for an LR scheduler in the sample step: ``step`` does nothing."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def step(self, *args: Any, **kwargs: Any) -> None:
        return None

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.scheduler.optimizer.param_groups]


def _one_or_list(items: list[Any]) -> Any:
    # As LightningModule.optimizers() and lr_schedulers() return them: the object itself when there is one.
    return items[0] if len(items) == 1 else items


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
