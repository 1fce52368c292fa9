"""Replicated data parallel: identical replicas, gradients averaged over the data-parallel group.

Written by hand on purpose. torch's ``DistributedDataParallel`` reducer assumes exactly one backward
per forward over a fixed set of used parameters, which is what trips Lightning's ``ddp`` strategy on
manual optimization with several optimizers (two backward passes, each touching part of the model)
and on parameters that are unused in some steps (``find_unused_parameters`` must then be set by the
user). Averaging the gradients that a backward actually produced, after that backward, has neither
limit, needs no flag and no wrapper around the user's module, and is bit-for-bit the same math.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

# Gradients are averaged in flat buckets of about this size: few collectives, bounded extra memory.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


class GradientSynchronizer:
    """Averages gradients over a process group after each backward pass.

    Only the parameters whose gradient a backward (or, with accumulation, the backward passes since
    the last synchronization) produced are averaged. Ranks agree on that set with one small
    all-reduce first, so a parameter used on some ranks but not others is averaged with zeros on the
    ranks that did not use it, exactly as in single-process training over the whole global batch.

    Args:
        module: the module whose gradients to average. Its parameters must already be identical
            on every rank (as after Lightning's ``_sync_module_states``).
        group: the data-parallel process group.
        bucket_bytes: size of the flat buckets gradients are averaged in.
    """

    def __init__(self, module: nn.Module, group: ProcessGroup, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.bucket_bytes = bucket_bytes
        self.enabled = True
        # `parameters()` skips shared parameters' repeats, so tied weights are averaged once.
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._produced = torch.zeros(len(self._params), dtype=torch.uint8)
        self._handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._mark(i)) for i, p in enumerate(self._params)
        ]

    def _mark(self, index: int):  # noqa: ANN202 - a hook factory
        def hook(_: Tensor) -> None:
            self._produced[index] = 1

        return hook

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate local gradients without averaging (gradient accumulation steps)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @torch.no_grad()
    def sync(self) -> None:
        """Average the gradients produced since the last call over the group."""
        if not self.enabled or not self._params:
            return
        produced = self._produced.to(self._params[0].device, dtype=torch.int32)
        dist.all_reduce(produced, op=dist.ReduceOp.MAX, group=self.group)
        indices = produced.nonzero().flatten().tolist()
        self._produced.zero_()
        params = [self._params[i] for i in indices]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in self._buckets(params):
            self._average(bucket)

    def _buckets(self, params: list[nn.Parameter]) -> Iterator[list[Tensor]]:
        bucket: list[Tensor] = []
        size = 0
        for p in params:
            grad = p.grad
            assert grad is not None
            if bucket and (grad.dtype != bucket[0].dtype or grad.device != bucket[0].device
                           or size + grad.nbytes > self.bucket_bytes):
                yield bucket
                bucket, size = [], 0
            bucket.append(grad)
            size += grad.nbytes
        if bucket:
            yield bucket

    def _average(self, grads: list[Tensor]) -> None:
        if any(g.is_sparse for g in grads):
            raise NotImplementedError("parti data parallel does not average sparse gradients yet.")
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)

    def remove(self) -> None:
        """Remove the hooks from the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
