"""Gradient clipping by the whole model's norm under model parallelism, through Lightning's usual ``gradient_clip_val``.

Lightning clips in its precision plugin with ``torch.nn.utils.clip_grad_norm_`` over the optimizer's
parameters. Under pipeline parallelism each rank holds one stage's blocks: a per-rank norm would miss
the other stages and clip by a different factor on every stage. Under tensor parallelism with sharded
storage the parameters live on several device meshes, which torch's function cannot combine. The
plugin's ``clip_grad_by_norm`` is the one place all of Lightning's clipping
(``Trainer(gradient_clip_val=...)``, ``self.clip_gradients``) goes through, so the strategy points it
at :meth:`~parti_lightning.parallel.Parallelized.clip_grad_norm_`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.optim import Optimizer

ClipFn = Callable[[Iterable[Tensor], float], Tensor]


def clip_by_model_norm(plugin: Precision, clip: ClipFn) -> None:
    """Make ``plugin`` clip by ``clip(parameters, max_norm)`` (``Parallelized.clip_grad_norm_``).

    Collective: every rank clips at the same points, as Lightning's loops make them do.
    """

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: Any) -> None:
        clip(plugin.main_params(optimizer), float(clip_val))

    # An instance attribute shadows the plugin class's method for this run's plugin only; no public
    # hook takes a norm function (checked against Lightning 2.6.6).
    plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]
