"""Where Lightning's step and backward hooks go.

Backward passes run in the plan's step context and end with its gradient averaging; accumulation steps
skip that averaging.

Steps go through the module's ``__call__`` when FSDP sharded the root.

FSDP gathers a unit's parameters in hooks around its ``forward``, but Lightning calls ``training_step``
and the other steps directly. When the root module itself is a sharded unit (ZeRO-2/3 with automatic
optimization), its parameters would then never be gathered; the steps are routed through the module's
``__call__`` instead, with Lightning's own forward redirection (the module as its own wrapper).
Whether to route is read from the module (:func:`~parti_lightning.parallel.steps_through_root`), so it
still holds after ``fit`` (``validate`` on a module left sharded).
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager, nullcontext
from typing import Any

from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from parti_lightning.parallel import Parallelized, steps_through_root


class StepRouting(ParallelStrategy):
    """Lightning's step and backward hooks for :class:`~parti_lightning.PartiStrategy`."""

    _parallel: Parallelized | None  # what `parallelize` returned for this fit (set by the strategy's setup)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        with self._parallel.step_context() if self._parallel is not None else nullcontext():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        if self._parallel is not None:
            self._parallel.sync_gradients()

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        if self._parallel is None:
            yield
            return
        with self._parallel.no_sync():
            yield

    def _step(self, method: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        if self.lightning_module is None or not steps_through_root(self.lightning_module):
            return getattr(super(), method)(*args, **kwargs)
        # FSDP gathers a unit's parameters in hooks around its `forward`, but Lightning calls
        # `training_step` & co. directly: route them through the module's `__call__` so the root's
        # hooks run (Lightning's forward redirection, with the module as its own wrapper).
        module = self.lightning_module
        assert module is not None
        with context():
            return self._forward_redirection(module, module, method, *args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("training_step", self.precision_plugin.train_step_context, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)
