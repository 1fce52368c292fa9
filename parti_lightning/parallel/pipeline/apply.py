"""``apply_pipeline``: the trunk split into stages on this rank, and what the strategy sees of it afterwards.

Each rank of the pipeline group keeps the parameters of one contiguous run of blocks (its stage)
and frees the others. Everything else (embeddings, head, loss, logging) runs on every pipeline rank,
unchanged (the storage step then shards its parameters over the pipeline ranks); the trunk runs as one
pipelined operation when the forward calls it (see :mod:`~parti_lightning.parallel.pipeline.runtime`),
after its contract was checked by :func:`~parti_lightning.parallel.pipeline.contract.check_trunk_contract`.

Order with the other techniques: ``apply_pipeline`` first (it frees the blocks other stages own, so
nothing after sees them), then tensor parallel and storage sharding inside the stage, then the
optimizers. A stage's block parameters live on one rank; the parameters outside the trunk get the same
gradient on every pipeline rank by construction, so averaging them over the pipeline axis (FSDP's
reduce-scatter, when they are sharded) leaves it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from parti_lightning.parallel.blocks import find_trunks
from parti_lightning.parallel.norm import clip_grads_with_norm_, total_norm
from parti_lightning.parallel.pipeline.contract import TrunkLayout, trunk_layout
from parti_lightning.parallel.pipeline.cuts import BlockFlops, stage_starts
from parti_lightning.parallel.pipeline.routing import free_block, route_block_calls
from parti_lightning.parallel.pipeline.runtime import PipelinedTrunk
from parti_lightning.plan import check_pipeline_settings

__all__ = ["PipelineParallel", "apply_pipeline"]


def apply_pipeline(
    module: nn.Module,
    group: ProcessGroup,
    *,
    micro_batches: int,
    schedule: str = "gpipe",
    stages_per_rank: int = 1,
    cuts: Sequence[str] | None = None,
    costs: Sequence[float] | None = None,
    device: torch.device,
    run_example: Callable[[], Any] | None = None,
    batch_size: int | None = None,
) -> PipelineParallel:
    """Split ``module``'s trunk into one stage per rank of ``group`` and pipeline it when the forward runs.

    Call with the module on ``device``, before tensor parallel, storage sharding and the optimizers: the
    blocks this rank does not own lose their parameters and buffers here, so nothing after sees them. With
    ``run_example``, the trunk's contract is checked first
    (:func:`~parti_lightning.parallel.pipeline.contract.check_trunk_contract`).

    Args:
        module: the model, modified in place.
        group: the pipeline-axis process group, its ranks in stage order.
        micro_batches: how many micro-batches each trunk call is split into; must divide the batch.
        schedule: ``"gpipe"`` (the forward's activations kept for the backward), ``"1f1b"`` (the backward
            recomputes the trunk under 1F1B) or ``"interleaved-1f1b"`` (the same with ``stages_per_rank``
            stages per rank: rank ``r`` holds stages ``r, r + N, ...``, which shortens the bubble);
            passes without autograd use a forward-only schedule.
        stages_per_rank: stages per rank, for an interleaved schedule.
        cuts: the block names where stages ``1 .. N·stages_per_rank - 1`` start; ``None`` to balance ``costs``.
        costs: a cost per block to balance; ``None`` for the blocks' FLOPs measured in ``run_example``, or
            parameter counts without it.
        device: where this rank's stage runs.
        run_example: runs the module once on a real batch, the same on every rank: the trunk's contract is
            checked on it (the same verdict on every rank) and each block's FLOPs counted, to balance the stages.
        batch_size: the batch each data-parallel rank's step gets, if known: ``micro_batches`` must divide it.

    Returns:
        What the strategy needs afterwards: the owned blocks, norm reduction over stages.

    Raises:
        ValueError: an unknown schedule, fewer blocks than stages, bad cuts, ``micro_batches < 1``,
            no repeated trunk, or a parameter shared between blocks or between a block and the rest.
    """
    trunks = find_trunks(module)
    blocks = [pair for trunk in trunks for pair in trunk]
    if len(blocks) < 2:
        raise ValueError(f"no repeated trunk to pipeline in {type(module).__name__} (found {len(blocks)} block)")
    ranks = dist.get_world_size(group)
    for trunk in trunks:
        check_pipeline_settings(
            len(trunk), ranks, micro_batches=micro_batches, batch_size=batch_size, schedule=schedule,
            stages_per_rank=stages_per_rank,
        )
    if cuts is not None and len(trunks) > 1:
        raise ValueError(
            f"pipeline_cuts with {len(trunks)} trunks ({', '.join(t[0][0].rpartition('.')[0] for t in trunks)}) is not"
            " supported: each trunk is split over the pipeline ranks by its blocks' costs; leave the cuts unset."
        )
    layouts = [TrunkLayout(trunk) for trunk in trunks]
    if run_example is not None:
        # On the real batch, the same verdict (and FLOPs per block: the stages' balance) on every rank.
        flops = BlockFlops(blocks)
        layouts = [
            trunk_layout(module, flops.wrap(run_example) if i == 0 else run_example, trunk)
            for i, trunk in enumerate(trunks)
        ]
        costs = flops.costs(device) if costs is None else costs
    _check_no_shared_parameters(module, blocks)
    if costs is None:
        costs = [sum(p.numel() for p in block.parameters()) for _, block in blocks]
    pipelined = []
    offset = 0
    for trunk, layout in zip(trunks, layouts, strict=True):
        # 1. Cut: where each stage starts (the user's cuts, or balanced costs). Each trunk (an encoder's, a
        #    decoder's) is split over all the pipeline ranks.
        names = [name for name, _ in trunk]
        trunk_costs = list(costs[offset : offset + len(trunk)])
        offset += len(trunk)
        starts = stage_starts(names, ranks * stages_per_rank, cuts=cuts, costs=trunk_costs)
        pipelined.append(PipelinedTrunk(trunk, starts, group, micro_batches, schedule, device, layout=layout))
    for trunk in pipelined:
        # 2. Free: the blocks other ranks hold lose their parameters and buffers, so nothing after this sees them.
        held = set(trunk.held_indices)
        for index, block in enumerate(trunk.blocks):
            if index not in held:
                free_block(block)
        # 3. Intercept: the user's calls of every block now reach the pipelined trunk.
        route_block_calls(trunk)
    return PipelineParallel(pipelined)


class PipelineParallel:
    """A module's pipelined trunks as seen by the strategy (returned by :func:`apply_pipeline`).

    Nothing needs calling per step: each trunk pipelines itself when the forward runs it, with the
    forward-only schedule whenever no backward can follow (``torch.no_grad``/``inference_mode``:
    validate, test, predict) and for the forward pass of training. An encoder-decoder has two trunks, each
    split over all the pipeline ranks: stage ``s`` is the ``s``-th part of each.
    """

    def __init__(self, trunks: list[PipelinedTrunk]) -> None:
        self._trunks = trunks
        self._trunk = trunks[0]  # the ranks, group, device and stage indices are the same for every trunk

    @property
    def group(self) -> ProcessGroup:
        """The pipeline-axis process group; gradient norms are reduced over it."""
        return self._trunk.group

    grad_norm_group = group

    @property
    def stage_index(self) -> int:
        """This rank's place in the pipeline group (its first stage's index)."""
        return self._trunk.rank

    @property
    def stage_indices(self) -> list[int]:
        """The stages this rank holds: one, or several under an interleaved schedule."""
        return self._trunk.stage_indices

    @property
    def num_stages(self) -> int:
        """How many stages the trunk is split into (ranks × stages per rank)."""
        return self._trunk.num_stages

    @property
    def num_ranks(self) -> int:
        """How many ranks the stages are spread over."""
        return self._trunk.ranks

    @property
    def stages(self) -> list[list[str]]:
        """The block names of every stage, in order (of every trunk: the encoder's part, then the decoder's)."""
        per_trunk = [trunk.stage_names() for trunk in self._trunks]
        return [[name for names in per_trunk for name in names[s]] for s in range(self.num_stages)]

    @property
    def owned_blocks(self) -> list[str]:
        """The names of the blocks this rank holds (as in ``module.named_modules()``)."""
        return [name for s in self.stage_indices for name in self.stages[s]]

    @property
    def freed_blocks(self) -> list[str]:
        """The blocks whose parameters live on other ranks; a checkpoint must take them from their stage."""
        held = set(self.stage_indices)
        return [name for s, names in enumerate(self.stages) if s not in held for name in names]

    def is_stage_parameter(self, param: Tensor) -> bool:
        """Whether ``param`` belongs to this rank's stage (rather than to the replicated rest of the model)."""
        return id(param) in self._stage_param_ids()

    def _stage_param_ids(self) -> set[int]:
        # Read now: tensor parallelism and FSDP replace parameter objects after the split.
        return {pid for trunk in self._trunks for pid in trunk.stage_param_ids}

    def grad_norm(self, parameters: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
        """The norm of the gradients of ``parameters`` over the whole model, as one process would compute it.

        Stage parameters' contributions are summed over the pipeline group; replicated parameters
        (the same gradient on every pipeline rank) count once. Every pipeline rank must call this.
        """
        with_grads = [p for p in parameters if p.grad is not None]
        ids = self._stage_param_ids()
        stage = [p.grad for p in with_grads if id(p) in ids]
        rest = [p.grad for p in with_grads if id(p) not in ids]
        return _reduced_norm(stage, rest, float(norm_type), self.group, self._trunk.device)

    def clip_grad_norm_(self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip gradients in place by their norm over all stages; returns that norm (every pipeline rank must call).

        The drop-in for ``torch.nn.utils.clip_grad_norm_`` when the trunk is pipelined: a per-rank
        norm would see only one stage's blocks and clip by a different factor on every stage.
        """
        params = [p for p in parameters if p.grad is not None]
        total = self.grad_norm(params, norm_type)
        clip_grads_with_norm_(params, max_norm, total)
        return total


def _reduced_norm(
    stage: list[Tensor], rest: list[Tensor], p: float, group: ProcessGroup, device: torch.device
) -> Tensor:
    # Sharded (DTensor) gradients count with their whole parameter, reduced over their own mesh.
    stage_norm, rest_norm = total_norm(stage, p, device), total_norm(rest, p, device)
    if p == float("inf"):
        dist.all_reduce(stage_norm, op=dist.ReduceOp.MAX, group=group)
        return torch.maximum(stage_norm, rest_norm)
    powered = stage_norm**p
    dist.all_reduce(powered, group=group)
    return (powered + rest_norm**p) ** (1.0 / p)


def _check_no_shared_parameters(module: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
    owner: dict[int, str] = {}
    for name, block in blocks:
        for pname, p in block.named_parameters(remove_duplicate=False):
            other = owner.setdefault(id(p), name)
            if other != name:
                raise ValueError(
                    f"parameter {name}.{pname} is shared with block {other!r}; blocks that share parameters cannot"
                    " be placed on different pipeline stages"
                )
    for pname, p in module.named_parameters(remove_duplicate=False):
        block = owner.get(id(p))
        if block is not None and not pname.startswith(f"{block}."):
            raise ValueError(
                f"parameter {pname!r} is tied to a parameter of block {block!r}; a trunk block's parameters must not"
                " be used outside it (the block's stage would be the only rank holding them)"
            )
