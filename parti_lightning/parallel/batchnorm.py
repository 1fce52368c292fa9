"""Batch norm with statistics over the whole data-parallel batch, on any device.

torch's ``SyncBatchNorm`` refuses CPU tensors (its kernels are CUDA-only), so ``Trainer(sync_batchnorm=True)``
fails on CPU with Lightning's own strategies. On CUDA we use torch's; elsewhere this module computes the
same statistics with differentiable all-reduces (``torch.distributed.nn.functional``), whose backward
sums the gradient of the statistics over ranks exactly as ``SyncBatchNorm`` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override


class DistributedBatchNorm(_BatchNorm):
    """``BatchNorm{1,2,3}d`` whose training statistics span every rank of ``process_group``."""

    def __init__(self, *args, process_group: ProcessGroup | None = None, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    @override
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @override
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or not dist.is_initialized():
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_count = input.numel() // input.size(1)
        # Two passes (mean, then squared deviations) rather than E[x²] - E[x]²: the same precision
        # as the single-process kernel, which the parity tests hold us to.
        sums = torch.cat([input.sum(dims), input.new_tensor([float(local_count)])])
        sums = dist_fn.all_reduce(sums, group=group)
        count = sums[-1]
        mean = sums[:-1] / count
        centered = input - mean.reshape(shape)
        var = dist_fn.all_reduce(centered.pow(2).sum(dims), group=group) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        out = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def convert_batchnorm(module: nn.Module, group: ProcessGroup | None) -> nn.Module:
    """``module`` with every batch norm replaced by a :class:`DistributedBatchNorm` over ``group``.

    The new layers hold the same parameter and buffer objects; returns the new root when ``module``
    itself is a batch norm.
    """
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (DistributedBatchNorm, nn.SyncBatchNorm)):
        converted = DistributedBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group=group,
        )
        _share_tensors(module, converted)
        converted.train(module.training)
        converted._parti_original_class = type(module)  # type: ignore[assignment]
    for name, child in module.named_children():
        converted.add_module(name, convert_batchnorm(child, group))
    return converted


def revert_batchnorm(module: nn.Module, fallback: type[_BatchNorm]) -> nn.Module:
    """Undo :func:`convert_batchnorm` (or torch's ``convert_sync_batchnorm``), keeping the tensors.

    Args:
        module: the converted model.
        fallback: the class of a layer whose original class was not recorded (torch's conversion).
    """
    converted = module
    if isinstance(module, (DistributedBatchNorm, nn.SyncBatchNorm)):
        original = getattr(module, "_parti_original_class", fallback)
        converted = original(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        _share_tensors(module, converted)
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, revert_batchnorm(child, fallback))
    return converted


def _share_tensors(source: nn.Module, target: nn.Module) -> None:
    """Move ``source``'s own parameters and buffers, as objects, onto ``target``.

    The same ``Parameter`` objects, not copies: an optimizer built on the converted model must still
    hold the model's parameters after ``revert`` (for checkpoints written after ``fit``).
    """
    for name, param in source.named_parameters(recurse=False):
        setattr(target, name, param)
    for name, buffer in source.named_buffers(recurse=False):
        target.register_buffer(name, buffer)
