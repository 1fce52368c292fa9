"""Gradient clipping by norm over every pipeline stage, through Lightning's usual ``gradient_clip_val``.

Lightning clips in its precision plugin with ``torch.nn.utils.clip_grad_norm_`` over the optimizer's
parameters. Under pipeline parallelism each rank holds one stage's blocks: a per-rank norm would miss
the other stages and clip by a different factor on every stage. The plugin's ``clip_grad_by_norm`` is
the one place all of Lightning's clipping (``Trainer(gradient_clip_val=...)``, ``self.clip_gradients``)
goes through, so the strategy points it at a norm reduced over the stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.optim import Optimizer

ClipFn = Callable[[Iterable[Tensor], float], Tensor]


def clip_norm_over_stages(plugin: Precision, clip: ClipFn) -> None:
    """Make ``plugin`` clip by ``clip(parameters, max_norm)`` (e.g. ``PipelineParallel.clip_grad_norm_``).

    Collective: every pipeline rank clips at the same points, as Lightning's loops make them do.
    """

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: Any) -> None:
        clip(plugin.main_params(optimizer), float(clip_val))

    # An instance attribute shadows the plugin class's method for this run's plugin only; no public
    # hook takes a norm function (checked against Lightning 2.6.6).
    plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]
