"""Lightning features that cannot work under a plan, refused with the reason instead of failing mid-run."""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging, WeightAveraging

from parti_lightning.plan import PartitionPlan

# Callbacks that reach into whole parameters, which ZeRO-2/3 replace with shards (DTensor): pruning's
# masks index them (aten.nonzero has no sharded rule), and the averaging callbacks copy whole tensors
# into a DTensor module (aten.copy_ of mixed tensors). Measured under torch 2.13 / Lightning 2.6.
_NEEDS_WHOLE_PARAMETERS: tuple[type[Callback], ...] = (ModelPruning, StochasticWeightAveraging, WeightAveraging)


def check_callbacks(callbacks: Iterable[Callback], plan: PartitionPlan) -> None:
    """Raise ``NotImplementedError`` naming the callback when ``plan`` shards the parameters it needs whole."""
    if plan.storage not in ("gradients", "parameters") or plan.shard == 1:
        return
    refused = sorted({type(c).__name__ for c in callbacks if isinstance(c, _NEEDS_WHOLE_PARAMETERS)})
    if refused:
        raise NotImplementedError(
            f"{', '.join(refused)} with plan storage={plan.storage!r} (ZeRO-2/3) is not supported: it needs whole"
            " parameters, which this plan shards across ranks. Use plan 'ddp' or 'zero1', which keep them whole."
        )
