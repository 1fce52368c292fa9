"""Pipeline parallelism for an unmodified ``forward``: the trunk of repeated blocks split into stages.

Each rank of the pipeline group keeps the parameters of its stages' blocks and frees the others;
everything else (embeddings, head, loss, logging) runs on every pipeline rank, its parameters sharded over
them by FSDP (the storage step of ``parallelize``: each rank holds one shard, gathered for the step). The
trunk runs as one pipelined operation, on ``torch.distributed.pipelining``, when the user's forward calls
its first block (or its last, when the blocks' arguments differ by layer).

Files:

- ``apply.py``: :func:`apply_pipeline` (checks, then cut, free, intercept, in that order) and
  :class:`PipelineParallel`, what the strategy sees of the trunk (its stages, the gradient norm over them);
- ``cuts.py``: where stages start: the plan's ``pipeline_cuts``, or blocks balanced by measured FLOPs;
- ``contract.py``: what the forward must do with the trunk to be pipelined (a chain of blocks), checked by
  a dry run that names what breaks;
- ``runtime.py``: the trunk at run time: one autograd operation over the stages, the schedules, the stages'
  runs of the blocks;
- ``routing.py``: the user's block calls routed to the trunk; the blocks of other stages freed;
- ``arguments.py``: a trunk call's arguments split per micro-batch, values handed between blocks, the
  structure blocks return;
- ``extras.py``: extra block arguments that require grad (an encoder's output), their gradient summed back;
- ``phases.py``: GPipe with its forward and backward phases run apart, so the user's loss runs in between.

An encoder-decoder has two trunks (one per container of blocks), each split over all the pipeline ranks.

The settings' rules (micro-batches, schedule, stages per rank) are :func:`parti_lightning.plan.check_pipeline_settings`,
which a plan runs on itself before launch and :func:`apply_pipeline` again once it knows the trunk and the batch.
"""

from parti_lightning.parallel.pipeline.apply import PipelineParallel, apply_pipeline
from parti_lightning.parallel.pipeline.contract import check_trunk_contract
from parti_lightning.parallel.pipeline.cuts import BlockFlops, stage_starts
from parti_lightning.parallel.pipeline.runtime import INTERLEAVED, SCHEDULES
from parti_lightning.plan import check_pipeline_settings

__all__ = [
    "INTERLEAVED",
    "SCHEDULES",
    "BlockFlops",
    "PipelineParallel",
    "apply_pipeline",
    "check_pipeline_settings",
    "check_trunk_contract",
    "stage_starts",
]
