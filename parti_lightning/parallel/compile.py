"""Compiling a partitioned model: each block on its own, after the plan is applied, as torchtitan does.

A whole training step compiled in one graph would have to trace parti's own machinery (pipeline
interception, tensor-parallel regions, FSDP's hooks), which is not what the user asked to speed up and
which dynamo cannot always follow. Each repeated block's ``forward`` compiled after partitioning
compiles what the user wrote, on the tensors the plan gives it (a stage's blocks, DTensors inside a
tensor-parallel region, FSDP's unsharded parameters); the hooks around it stay eager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from parti_lightning.parallel.tensor.region import is_tensor_region

# Set on a block whose forward is compiled, so that a second fit or an evaluation does not compile it again.
_COMPILED = "_parti_compiled_forward"
# Why tensor-parallel blocks stay eager (measured with torch 2.13 on CPU, the example's CharGPT): dynamo breaks the
# graph at the region's per-layer hooks (a cache keyed by id()), the pieces compiled around them expect gradients
# for outputs kept by the hooks ("Expected a DTensor tangent but got a plain Tensor"), and with the hooks left
# eager AOT autograd refuses DTensor views ("as_strided not supported with DTensor").
TENSOR_PARALLEL_EAGER = "tensor-parallel blocks run eagerly: torch 2.13 cannot compile their DTensor regions"


def compile_blocks(
    blocks: Sequence[tuple[str, nn.Module]], compiler: Callable[[Callable[..., Any]], Any]
) -> list[str]:
    """Wrap each block's ``forward`` with ``compiler`` (e.g. the ``dynamo_ctx`` of ``torch.compile(model)``).

    The same mechanism as Lightning's ``from_compiled``, which wraps a LightningModule's ``forward`` and
    steps, applied to the blocks instead. Blocks split by tensor parallelism are left eager
    (:data:`TENSOR_PARALLEL_EAGER`).

    Returns:
        the names of the blocks left eager because tensor parallelism split them.
    """
    eager = []
    for name, block in blocks:
        if getattr(block, _COMPILED, False):
            continue
        if is_tensor_region(block):
            eager.append(name)
            continue
        block.forward = compiler(block.forward)
        setattr(block, _COMPILED, True)
    return eager
