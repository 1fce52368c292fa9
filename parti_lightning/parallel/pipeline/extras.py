"""Extra block arguments that carry gradients through a pipelined trunk (an encoder's output into a decoder).

Masks and rotary tables are constants; an encoder-decoder's decoder blocks also take the encoder's output,
which requires grad: every block on every stage adds to its gradient. Each stage's run of a micro-batch
gets its own leaf of that argument's micro-batch slice; after the backward, this rank's leaves are summed
(and its micro-batches put back together), then summed over the pipeline ranks, so that every rank
returns the whole gradient, as one process computes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils._pytree import tree_leaves, tree_map_only


class GradExtras:
    """The extras of one trunk call that require grad: detached for splitting, leaves per run, gradients back."""

    def __init__(self, extras: list[Any]) -> None:
        seen: dict[int, Tensor] = {}
        for leaf in tree_leaves(extras):
            if isinstance(leaf, Tensor) and leaf.requires_grad:
                seen.setdefault(id(leaf), leaf)
        self.tensors = list(seen.values())
        self._detached = {id(t): t.detach() for t in self.tensors}
        self._by_detached = {id(d): k for k, d in enumerate(self._detached.values())}  # detached -> argument index
        # micro-batch -> id(slice) -> (argument index, slice); filled as the extras are split
        self._slices: dict[int, dict[int, tuple[int, Tensor]]] = {}
        self._batched: dict[int, bool] = {}
        self.leaves: dict[tuple[int, int], list[Tensor]] | None = None

    def detach(self, extras: Any) -> Any:
        """``extras`` with each gradient-carrying tensor detached (the schedule's runs make their own leaves)."""
        return tree_map_only(Tensor, lambda t: self._detached.get(id(t), t), extras)

    def note_slice(self, micro_batch: int, original: Tensor, piece: Tensor) -> None:
        """Record that ``piece`` is micro-batch ``micro_batch``'s part of a detached gradient-carrying tensor."""
        k = self._by_detached.get(id(original))
        if k is not None:
            self._slices.setdefault(micro_batch, {})[id(piece)] = (k, piece)
            self._batched[k] = piece is not original

    def leafify(self, micro_batch: int, extras: Any) -> Any:
        """``extras`` for one stage run, each gradient-carrying slice replaced by a fresh leaf (when recording)."""
        slices = self._slices.get(micro_batch)
        if self.leaves is None or not slices:
            return extras

        def leaf(t: Tensor) -> Tensor:
            found = slices.get(id(t))
            if found is None:
                return t
            made = t.detach().requires_grad_()
            self.leaves.setdefault((micro_batch, found[0]), []).append(made)  # type: ignore[union-attr]
            return made

        return tree_map_only(Tensor, leaf, extras)

    def gradients(self, micro_batches: int, group: ProcessGroup) -> list[Tensor]:
        """Each gradient-carrying argument's whole gradient, the same on every pipeline rank (a collective)."""
        grads = []
        for k, tensor in enumerate(self.tensors):
            parts = []
            for i in range(micro_batches):
                piece = next(p for key, (j, p) in self._slices.get(i, {}).items() if j == k)
                found = [leaf.grad for leaf in (self.leaves or {}).get((i, k), []) if leaf.grad is not None]
                parts.append(torch.stack(found).sum(0) if found else torch.zeros_like(piece))
            total = torch.cat(parts) if self._batched.get(k) else torch.stack(parts).sum(0)
            dist.all_reduce(total, group=group)
            grads.append(total.to(tensor.dtype))
        self.leaves = None
        return grads
