"""Where to cut a trunk of blocks into contiguous pipeline stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def stage_starts(
    names: Sequence[str],
    num_stages: int,
    *,
    cuts: Sequence[str] | None = None,
    costs: Sequence[float] | None = None,
) -> list[int]:
    """The index of the first block of every stage.

    Args:
        names: the trunk's block names, in order.
        num_stages: how many stages.
        cuts: block names where stages ``1 .. num_stages - 1`` start; ``None`` to balance ``costs``.
        costs: a cost per block (time, memory or parameter count); ``None`` for equal costs.

    Returns:
        ``num_stages`` increasing indices, the first ``0``.

    Raises:
        ValueError: more stages than blocks, or cuts that are unknown, unordered, of the wrong count,
            or at the first block.
    """
    if num_stages < 1:
        raise ValueError(f"pipeline needs at least 1 stage, got {num_stages}")
    if num_stages > len(names):
        raise ValueError(
            f"pipeline={num_stages} stages but the trunk has only {len(names)} blocks ({names[0]!r} ... {names[-1]!r}):"
            " every stage needs at least one block; use at most as many stages as blocks."
        )
    if cuts is not None:
        return [0, *_cut_indices(names, num_stages, cuts)]
    weights = [1.0] * len(names) if costs is None else [float(c) for c in costs]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} block costs given for {len(names)} blocks")
    return _balanced_starts(weights, num_stages)


def _cut_indices(names: Sequence[str], num_stages: int, cuts: Sequence[str]) -> list[int]:
    if len(cuts) != num_stages - 1:
        raise ValueError(
            f"pipeline={num_stages} needs {num_stages - 1} cut(s) (the blocks where stages 1.. start), got"
            f" {len(cuts)}: {list(cuts)}"
        )
    position = {name: i for i, name in enumerate(names)}
    unknown = [c for c in cuts if c not in position]
    if unknown:
        raise ValueError(f"pipeline cut {unknown[0]!r} is not a trunk block; the blocks are {list(names)}")
    indices = [position[c] for c in cuts]
    if indices[0] == 0 or any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError(
            f"pipeline cuts {list(cuts)} must name blocks after the first, in increasing order (stage 0 starts at"
            f" {names[0]!r})"
        )
    return indices


def _balanced_starts(weights: list[float], num_stages: int) -> list[int]:
    # Contiguous partition minimising the most expensive stage (the pipeline runs at the pace of its
    # slowest stage); an exact dynamic programme, cheap for trunks of a few hundred blocks.
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[s][i]: the smallest maximum stage cost splitting blocks[:i] into s stages;
    # start[s][i]: where the last of those stages starts.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    start = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], start[s][i] = cost, j
    starts, i = [], n
    for s in range(num_stages, 0, -1):
        i = start[s][i]
        starts.append(i)
    return starts[::-1]


class BlockFlops:
    """Counts each block's forward FLOPs while an example runs (the stage balance's cost per block).

    Parameter counts stand for compute only when the blocks are alike; a block whose work grows with the
    sequence (attention) or that has no parameters (a pooling, a parameter-free mixer) is weighed by what
    it computes. Counted by torch's ``FlopCounterMode`` (matmuls, convolutions, attention).
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        self._blocks = list(blocks)
        self._flops = [0] * len(self._blocks)
        self._start = [0] * len(self._blocks)
        self._counter: FlopCounterMode | None = None

    def wrap(self, run: Callable[[], Any]) -> Callable[[], Any]:
        """``run``, counting each block's FLOPs while it runs."""

        def counted() -> Any:
            handles = []
            for i, (_, block) in enumerate(self._blocks):
                handles.append(block.register_forward_pre_hook(self._enter(i)))
                handles.append(block.register_forward_hook(self._leave(i), always_call=True))
            self._counter = FlopCounterMode(display=False)
            try:
                with self._counter:
                    return run()
            finally:
                for handle in handles:
                    handle.remove()
                self._counter = None

        return counted

    def costs(self, device: torch.device | None = None) -> list[float] | None:
        """FLOPs per block, summed over every rank of the job (collective once a process group exists);
        ``None`` when nothing was counted (then parameter counts balance the stages).

        Every rank must cut the trunk alike, and ranks that saw batches of other shapes (padding to each
        batch's longest sequence) counted other FLOPs: the sum over the ranks is the same on all of them.
        """
        flops = [float(f) for f in self._flops]
        if dist.is_initialized():
            total = torch.tensor(flops, dtype=torch.float64, device=device)
            dist.all_reduce(total)
            flops = total.tolist()
        return flops if any(flops) else None

    def _enter(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if self._counter is not None:
                self._start[i] = self._counter.get_total_flops()

        return hook

    def _leave(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if self._counter is not None:
                self._flops[i] += self._counter.get_total_flops() - self._start[i]

        return hook
