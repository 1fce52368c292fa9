"""What tensor parallelism pays beyond its kernels and the bytes it all-reduces, measured between ranks.

Two costs, measured in the hardware workers (``hardware._allreduce_worker``, every rank of a gloo group):

- DTensor's dispatch per operator call and per AdamW parameter, on two tiny reference transformer blocks
  (``ReferenceBlock``) split by parti's own tensor parallelism;
- the collective skew: what a collective waits for the slowest rank, as a fraction of the compute before it.

``reference_blocks()`` also serves the hardware profile's fixed-memory step (``hardware._reference_step``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F  # noqa: N812

from parti_lightning.planner.hardware import timed

REFERENCE_INPUT_SHAPE = (2, 8, 16)


@dataclass(frozen=True)
class TensorOverhead:
    """One rank's measured tensor-parallel overheads; the fields are ``HardwareProfile``'s of the same names."""

    dtensor_call_s: float
    dtensor_optimizer_parameter_s: float
    collective_skew: float


def measure_tensor_overhead(world_size: int) -> TensorOverhead:
    """The skew, then DTensor's costs, on the current (gloo) process group; every rank calls it."""
    skew = collective_skew(world_size)
    per_call, per_parameter = dtensor_costs(world_size)
    return TensorOverhead(dtensor_call_s=per_call, dtensor_optimizer_parameter_s=per_parameter, collective_skew=skew)


def collective_skew(world_size: int, segments: int = 25, rounds: int = 5) -> float:
    """The ranks' wait at a collective for the slowest of them, over the compute before it: every rank runs the
    same matmuls (a few ms, as a tensor-parallel block's compute between two all-reduces) with no collective,
    then with a one-element all-reduce after each, then the all-reduces alone. The second's time beyond the
    other two is the skew. The median of a few rounds (one round varies by 3x on a shared VM), averaged over
    the ranks."""
    matrix = torch.randn(384, 384)
    one = torch.ones(1)

    def segment() -> None:
        for _ in range(4):
            matrix @ matrix

    skews = []
    for _ in range(rounds):
        dist.barrier()
        alone = timed(segment, segments, False)
        dist.barrier()
        synced = timed(lambda: (segment(), dist.all_reduce(one)), segments, False)
        bare = timed(lambda: dist.all_reduce(one), segments, False)
        skews.append(max(synced - alone - bare, 0.0) / alone)
    skew = torch.tensor([statistics.median(skews)])
    dist.all_reduce(skew)
    return skew.item() / world_size


class ReferenceBlock(nn.Module):
    """A tiny pre-norm transformer block written as most models write one (separate query, key and value
    projections, heads from ``view`` and ``transpose``, fused attention, a GELU MLP): the operator mix whose
    DTensor dispatch ``dtensor_costs`` measures. Why a block and not one layer: DTensor's cost per call
    depends on the operator (views and attention propagate shardings at about twice the cost of a linear
    layer's), and a single column-split layer measured 43 µs a call where the example's blocks pay about 100."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.fc, self.proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (layer(h).view(b, t, self.heads, -1).transpose(1, 2) for layer in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.out(y)
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


def reference_blocks() -> nn.Sequential:
    """Two reference blocks: repeated, so that parti finds them as blocks."""
    return nn.Sequential(ReferenceBlock(), ReferenceBlock())


def dtensor_costs(world_size: int) -> tuple[float, float]:
    """Seconds DTensor adds per operator call and per parameter of an AdamW step, on tiny tensors (so that the
    kernels cost next to nothing): two reference blocks split by parti's own tensor parallelism, forward and
    backward, less the same blocks unsplit, over the number of DTensor calls the split ones make."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from parti_lightning.parallel.tensor import apply_tensor_parallel, tensor_parallel_step
    from parti_lightning.planner.profile import CallCounter

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tensor",))
    torch.manual_seed(0)  # every rank builds the same weights, as tensor parallelism requires
    split, plain = reference_blocks(), reference_blocks()
    inputs = torch.randn(REFERENCE_INPUT_SHAPE)
    apply_tensor_parallel(split, mesh, run_example=lambda: split(inputs))

    def step(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with tensor_parallel_step():
                model(inputs).sum().backward()
        return run

    with CallCounter(DTensor) as calls:
        step(split)()
    per_call = max(timed(step(split), 20, False) - timed(step(plain), 20, False), 0.0) / max(calls.count, 1)
    dtensors = [p for p in split.parameters() if isinstance(p, DTensor)]
    optimizer = torch.optim.AdamW(dtensors)
    with tensor_parallel_step():
        per_parameter = timed(optimizer.step, 20, False) / max(len(dtensors), 1)
    return per_call, per_parameter
