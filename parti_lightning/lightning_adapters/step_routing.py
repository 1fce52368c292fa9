"""Where Lightning's step and backward hooks go.

Backward passes run in the plan's step context (entered in ``pre_backward``, left in ``post_backward``) and
end with its gradient averaging; accumulation steps skip that averaging.

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
from contextlib import ExitStack, contextmanager
from typing import Any

from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor
from typing_extensions import override

from parti_lightning.parallel import Parallelized, steps_through_root


class StepRouting(ParallelStrategy):
    """Lightning's step and backward hooks for :class:`~parti_lightning.PartiStrategy`."""

    _parallel: Parallelized | None  # what `parallelize` returned for this fit (set by the strategy's setup)
    _backward_context: ExitStack  # the step context of the backward pass under way (set by the strategy)

    # Lightning's hooks around its own `backward` rather than an override of it: code that wraps
    # `Strategy.backward` (a profiler, a test's mock that calls the strategy's bound `backward`) then wraps
    # parti's backward too, where an override calling `super().backward` would call the wrapper back forever.
    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self._parallel is not None:
            self._backward_context.enter_context(self._parallel.step_context())

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        try:
            if self._parallel is not None:
                self._parallel.sync_gradients()
        finally:
            self._backward_context.close()

    def _leave_backward_context(self) -> None:
        """End the step context a backward pass entered and did not leave (it raised before `post_backward`)."""
        self._backward_context.close()

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
