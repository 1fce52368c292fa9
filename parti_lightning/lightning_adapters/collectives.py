"""The collectives Lightning asks a strategy for, over the groups a plan needs.

Reductions and gathers (``self.log(sync_dist=True)``, ``all_gather``) run over the data-parallel group,
so tensor- and pipeline-parallel replicas of a batch are not counted twice; barriers and broadcasts run
over every process, since model-parallel replicas must wait and learn decisions too.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _distributed_is_initialized,
    _sync_ddp_if_available,
)
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor
from torch.distributed import ProcessGroup
from typing_extensions import override

from parti_lightning.lightning_adapters.logging_sync import check_same_logged_name, logged_name


class Collectives(ParallelStrategy):
    """Lightning's collective hooks for :class:`~parti_lightning.PartiStrategy`."""

    data_parallel_group: ProcessGroup | None  # the strategy's: the ranks whose batches differ

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any | None = "mean"
    ) -> Tensor | Any:
        if isinstance(tensor, Tensor):
            group = group or self.data_parallel_group
            name = logged_name(inspect.currentframe())
            if name is not None and _distributed_is_initialized():
                check_same_logged_name(name, group, tensor.device, self.global_rank)
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        return _all_gather_ddp_if_available(tensor, group=group or self.data_parallel_group, sync_grads=sync_grads)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        # Over every process, not just the data-parallel group: a barrier synchronizes processes
        # (checkpoint writes, teardown), and model-parallel replicas must wait too.
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        # Over every process for the same reason as `barrier`: a broadcast value (a checkpoint path,
        # a decision) must reach model-parallel replicas as well.
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]
