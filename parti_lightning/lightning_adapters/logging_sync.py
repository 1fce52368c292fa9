"""``self.log(..., sync_dist=True)`` safety: every rank must sync the same metric at the same point.

Lightning's result collection reduces logged values in the order each rank logs them, so ranks that
log different names would pair unrelated values, or wait forever for a partner. The strategy's
``reduce`` reads which metric it is reducing (:func:`logged_name`) and compares it across ranks
(:func:`check_same_logged_name`) before reducing. Both, and torchmetrics (:func:`sync_metrics_over`),
reduce over the data-parallel ranks only.
"""

from __future__ import annotations

import zlib
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric


def sync_metrics_over(module: nn.Module, group: Any) -> None:
    """Make the module's torchmetrics sync over ``group`` (the data-parallel ranks) instead of every rank.

    A metric syncs over its own ``process_group``, the whole world by default: with tensor- or
    pipeline-parallel replicas of a batch, the world holds each batch more than once, so sums and counts
    would be multiplied. A metric given its own group by the user keeps it.
    """
    for submodule in module.modules():
        if isinstance(submodule, Metric) and submodule.process_group is None:
            submodule.process_group = group


def check_same_logged_name(name: str, group: Any, device: torch.device, rank: int) -> None:
    """Fail on every rank, rather than hang or add unrelated values, when ranks sync different metrics.

    One small all-reduce compares a hash of the names (max of h and of -h: equal iff all agree).

    Args:
        name: the metric this rank is about to reduce.
        group: the group the value is reduced over.
        device: where the group's tensors live.
        rank: this process's global rank, for the message.
    """
    digest = zlib.crc32(name.encode())
    pair = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=group)
    if pair[0].item() != -pair[1].item():
        raise RuntimeError(
            f"rank {rank} logged {name!r} with sync_dist=True while another rank logged a different"
            " name at the same point: every rank must log the same metrics, in the same order, when they are"
            " synced (sync_dist=True). Log rank-specific values without sync_dist, or under the same name."
        )


def logged_name(frame: FrameType | None) -> str | None:
    """The ``hook.name`` of the metric whose ``self.log(sync_dist=True)`` called ``reduce``, if that is the caller.

    Lightning's result collection calls ``strategy.reduce`` from a ``_ResultMetric`` method and passes
    no name; reading it off the calling frame costs a few attribute lookups per synced value.
    """
    for _ in range(3):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        meta = getattr(caller, "meta", None)
        if type(caller).__name__ == "_ResultMetric" and meta is not None:
            return f"{meta.fx}.{meta.name}"
    return None
