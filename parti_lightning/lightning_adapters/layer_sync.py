"""Lightning's ``sync_batchnorm=True`` for parti: the adapter from Lightning's ``LayerSync`` to the plain functions."""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import LayerSync, _BatchNormXd
from torch import nn
from torch.distributed import ProcessGroup
from typing_extensions import override

from parti_lightning.parallel.batchnorm import convert_batchnorm, revert_batchnorm


class PartiSyncBatchNorm(LayerSync):
    """Batch norm statistics over the data-parallel group, on CPU and CUDA.

    Lightning's ``TorchSyncBatchNorm`` refuses CPU tensors and syncs over the whole world, which would
    count tensor- or pipeline-parallel replicas of a batch more than once.

    Args:
        group: the data-parallel process group (``None``: the whole world).
        use_torch: use torch's fused ``SyncBatchNorm`` (CUDA training only).
    """

    def __init__(self, group: ProcessGroup | None = None, use_torch: bool = False) -> None:
        self.group = group
        self.use_torch = use_torch

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        if self.use_torch:
            return nn.SyncBatchNorm.convert_sync_batchnorm(model, self.group)
        return convert_batchnorm(model, self.group)

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        return revert_batchnorm(model, fallback=_BatchNormXd)
