"""Tier 2: the overlapped gradient averaging gives bit-for-bit what averaging after backward gives.

One 2-rank gloo run trains every case twice from the same weights and the same per-rank batches:
with :class:`GradientSynchronizer` (small buckets, so several start during backward) and with
``PostBackwardAveraging`` below, the averaging parti did before it overlapped backward, kept here as
the reference. With 2 ranks a sum is the same whatever the bucket layout, so results must be equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_utils import run_distributed

# Small enough that every case has several buckets, so some start while backward runs.
BUCKET_BYTES = 256


class PostBackwardAveraging:
    """The reference: agree on the gradients produced, then average them in flat buckets, after backward."""

    def __init__(self, module: nn.Module, group: Any) -> None:
        self.group, self.enabled = group, True
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.produced = torch.zeros(len(self.params), dtype=torch.int32)
        self.handles = [p.register_post_accumulate_grad_hook(self._mark(i)) for i, p in enumerate(self.params)]

    def _mark(self, i: int) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:
            self.produced[i] = 1

        return hook

    def no_sync(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def off() -> Any:
            self.enabled = False
            yield
            self.enabled = True

        return off()

    @torch.no_grad()
    def sync(self) -> None:
        if not self.enabled:
            return
        produced = self.produced.clone()
        dist.all_reduce(produced, op=dist.ReduceOp.MAX, group=self.group)
        self.produced.zero_()
        for i in produced.nonzero().flatten().tolist():
            p = self.params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            flat = grad.reshape(-1).clone()
            dist.all_reduce(flat, group=self.group)
            flat.div_(dist.get_world_size(self.group))
            grad.copy_(flat.view(grad.shape))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Net(nn.Module):
    """An MLP with a branch that some steps (or ranks) skip, optional batch norm, tying, odd layouts."""

    def __init__(self, norm: bool = False, tied: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        if norm:
            from parti_lightning.parallel.batchnorm import DistributedBatchNorm

            # Its backward runs all-reduces on the data-parallel group while buckets are in flight.
            self.trunk.append(DistributedBatchNorm(16, process_group=dist.group.WORLD))
        self.head = nn.Linear(16, 1)
        self.extra = nn.Linear(16, 1)
        self.out = nn.Linear(6, 10, bias=False)
        if tied:
            self.out.weight = self.embed.weight
        # A parameter whose storage is not contiguous (a transposed view), and so is its gradient.
        self.odd = nn.Parameter(torch.randn(16, 6).t()) if transposed else None

    def forward(self, tokens: Tensor, use_extra: bool = True, reentrant: bool = False) -> Tensor:
        x = self.embed(tokens).mean(1)
        if reentrant:
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(self.trunk, x, use_reentrant=True)
        else:
            h = self.trunk(x)
        if self.odd is not None:
            h = h + x @ self.odd
        y = self.head(h)
        if use_extra:
            y = y + self.extra(h)
        return y.pow(2).mean() + self.out(x).logsumexp(-1).mean()


def _batch(rank: int, step: int) -> Tensor:
    return torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(100 * rank + step))


# Each case: (module arguments, what one run does with (net, synchronizer, rank)); returns how many
# buckets were in flight when backward ended (0 for the reference).
def _plain(net: Net, sync: Any, rank: int) -> int:
    in_flight = 0
    for step in range(2):
        net.zero_grad(set_to_none=True)
        net(_batch(rank, step)).backward()
        in_flight += len(getattr(getattr(sync, "_period", None), "inflight", ()))
        sync.sync()
    return in_flight


def _unused_on_one_rank(net: Net, sync: Any, rank: int) -> int:
    net(_batch(rank, 0), use_extra=rank == 0).backward()
    sync.sync()
    return 0


def _two_backward_sync_between(net: Net, sync: Any, rank: int) -> int:
    # Manual optimization: Lightning syncs after each `manual_backward`; the second adds to the first.
    net(_batch(rank, 0), use_extra=False).backward()
    sync.sync()
    net(_batch(rank, 1)).backward()
    sync.sync()
    return 0


def _two_backward_one_sync(net: Net, sync: Any, rank: int) -> int:
    # Gradients change after their bucket started: averaged once, with their final value.
    net(_batch(rank, 0), use_extra=False).backward()
    net(_batch(rank, 1)).backward()
    sync.sync()
    return 0


def _accumulate(net: Net, sync: Any, rank: int) -> int:
    for step in range(2):
        with sync.no_sync():
            net(_batch(rank, step), use_extra=step == 0).backward()
            sync.sync()
    net(_batch(rank, 2), use_extra=False).backward()
    sync.sync()
    return 0


def _reentrant_checkpoint(net: Net, sync: Any, rank: int) -> int:
    # The trunk's gradients arrive in a nested backward, after the agreement on which exist.
    net(_batch(rank, 0), reentrant=True).backward()
    sync.sync()
    return 0


CASES: dict[str, tuple[dict[str, bool], Callable[[Net, Any, int], int]]] = {
    "plain": ({}, _plain),
    "unused_on_one_rank_with_batchnorm": ({"norm": True}, _unused_on_one_rank),
    "two_backward_sync_between": ({}, _two_backward_sync_between),
    "two_backward_one_sync": ({}, _two_backward_one_sync),
    "accumulate_no_sync": ({}, _accumulate),
    "tied_weights": ({"tied": True}, _plain),
    "non_contiguous_parameter": ({"transposed": True}, _plain),
    "reentrant_checkpoint": ({}, _reentrant_checkpoint),
}


def _grads(net: nn.Module) -> dict[str, Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in net.named_parameters()}


def _run_case(name: str, overlapped: bool) -> tuple[dict[str, Tensor | None], int]:
    from parti_lightning.parallel.data import GradientSynchronizer

    kwargs, body = CASES[name]
    torch.manual_seed(0)
    net = Net(**kwargs)
    group = dist.group.WORLD
    sync = GradientSynchronizer(net, group, bucket_bytes=BUCKET_BYTES) if overlapped else PostBackwardAveraging(
        net, group
    )
    in_flight = body(net, sync, dist.get_rank())
    sync.remove()
    return _grads(net), in_flight


def _dtensor_case() -> list[str]:
    """A DTensor parameter (tensor axis of size 1 here) is averaged like its plain twin."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from parti_lightning.parallel.data import GradientSynchronizer

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data", "tensor"))
    torch.manual_seed(0)
    plain = nn.Linear(6, 4)
    sharded = nn.Linear(6, 4)
    sharded.weight = nn.Parameter(distribute_tensor(plain.weight.detach().clone(), mesh["tensor"], [Shard(0)]))
    sharded.bias = nn.Parameter(plain.bias.detach().clone())
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(dist.get_rank()))
    for module, weight in ((plain, plain.weight), (sharded, sharded.weight.to_local())):
        sync = GradientSynchronizer(module, mesh["data"].get_group(), bucket_bytes=BUCKET_BYTES)
        (x @ weight.t() + module.bias).pow(2).mean().backward()
        sync.sync()
        sync.remove()
    assert isinstance(sharded.weight.grad, DTensor)
    errors = []
    if not torch.equal(sharded.weight.grad.to_local(), plain.weight.grad):
        errors.append("dtensor: weight")
    if not torch.equal(sharded.bias.grad, plain.bias.grad):
        errors.append("dtensor: bias")
    return errors


def _all_cases() -> dict[str, Any]:
    mismatches: list[str] = []
    in_flight = {}
    for name in CASES:
        got, in_flight[name] = _run_case(name, overlapped=True)
        want, _ = _run_case(name, overlapped=False)
        for key, value in want.items():
            if value is None or got[key] is None:
                if (value is None) != (got[key] is None):
                    mismatches.append(f"{name}: {key} has a gradient in one run only")
            elif not torch.equal(got[key], value):
                diff = (got[key] - value).abs().max().item()
                mismatches.append(f"{name}: {key} differs by {diff:.3g}")
        moved = [k for k, v in want.items() if v is not None and v.abs().sum() > 0]
        if not moved:
            mismatches.append(f"{name}: no gradient at all")
    mismatches += _dtensor_case()
    # The reference's replicas agree after averaging; so must ours (checked on the last case's grads).
    return {"mismatches": mismatches, "in_flight": in_flight}


@pytest.mark.timeout(180)
def test_overlapped_averaging_is_bit_identical_to_averaging_after_backward() -> None:
    results = run_distributed(_all_cases, 2, timeout=150)
    for rank, result in enumerate(results):
        assert not result["mismatches"], f"rank {rank}: " + "; ".join(result["mismatches"])
        # The overlap happened: buckets were in flight when backward returned (the last one starts in `sync`).
        assert result["in_flight"]["plain"] > 0, result["in_flight"]
