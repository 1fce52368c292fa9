"""Randomness under tensor parallel: what the ranks of one tensor group share.

The rule: **every rank of a tensor group draws from one shared random stream**, and a random op on a
*split* activation gives each shard its own stream derived from it.

- At :func:`~parti_lightning.parallel.tensor.apply_tensor_parallel`, :func:`sync_tensor_random_state`
  copies the default generator's state (CPU, and the accelerator's on GPU meshes) from the first rank of
  the tensor group to the others. From then on the tensor ranks run the same code on the same batch, so
  they draw the same numbers: dropout outside the blocks (on plain tensors, e.g. after the embedding)
  and dropout on a *replicated* activation inside a block (e.g. after the rowwise projection, on the
  residual stream) get the same mask on every tensor rank, and replicated activations and parameters
  never diverge between tensor ranks.
- Dropout on a *split* activation (attention probabilities of the heads a rank holds, the widened MLP
  hidden state) must not reuse one mask for every shard (head ``h`` and head ``h + H/N`` would be
  dropped together). On CPU, where DTensor's own random-state tracker refuses to run, the tracker here
  draws one seed from the shared stream and runs the op with ``seed + shard index``: shards get
  independent masks, and the shared stream advances by the same single draw on every rank, whatever the
  shard sizes. On CUDA, DTensor's own ``OffsetBasedRNGTracker`` is left in charge (each shard takes its
  slice of one Philox stream).

What matches a single process (same seed, same batches): every mask drawn before the first random op
on a split activation, so a model whose dropout acts only on replicated or plain tensors (embedding,
residual and MLP-output dropout) trains exactly as on one process. Masks on split activations do not
match a single process (one process draws the whole tensor from one stream), and on CPU every mask
drawn after the first such op differs too (the shared stream advanced differently); the statistics
(independent Bernoulli masks at the same rate) are the same. Gradient checkpointing stays exact: it
restores the shared state before recomputing, so the same seed is drawn again.

Data-parallel ranks are not touched: their streams are whatever the user's seeding made them. User code
that reseeds the generator differently per rank *after* setup breaks the sharing, which parti cannot see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import _random as dtensor_random
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from parti_lightning.parallel.tensor.region import mesh_device

# An odd 64-bit constant (2^64 / golden ratio): seeds of neighbouring shards land far apart.
_SHARD_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_RANGE = 2**62  # drawn with torch.randint, whose bounds are int64


def sync_tensor_random_state(mesh: DeviceMesh) -> None:
    """Give every rank of the 1-D tensor ``mesh`` the random state of its first rank.

    Copies the CPU default generator's state, and on an accelerator mesh that device's generator state too.
    """
    device = mesh_device(mesh)
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device.type).get_rng_state())
    synced = []
    for state in states:
        # Why through the device: a GPU mesh's group is NCCL, which only moves device tensors.
        buffer = state.to(device)
        dist.broadcast(buffer, group=mesh.get_group(), group_src=0)
        synced.append(buffer.cpu())
    torch.set_rng_state(synced[0])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(synced[1])


def install_cpu_random_tracker(mesh: DeviceMesh) -> None:
    """Make random ops on CPU DTensors draw per the rule above (once per process; GPU meshes untouched)."""
    if mesh.device_type == "cpu" and dtensor_random._rng_tracker is None:
        # Why a private hook: DTensor's dispatcher hands every random op on a DTensor to this one tracker
        # object, and the only tracker torch ships refuses CPU devices; nothing public takes its place.
        dtensor_random._rng_tracker = _SharedStreamTracker()


class _SharedStreamTracker(dtensor_random._RNGStateTracker):
    """DTensor's random-op hook for CPU: the shared stream for whole tensors, a derived one per shard."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))

    @contextlib.contextmanager
    def _distribute_region(self, spec: DTensorSpec, generator: torch.Generator | None = None) -> Iterator[None]:
        # DTensor removes a user's generator from the op's arguments: the op draws from the default generator,
        # which is therefore set to the stream the op must use.
        source = generator if generator is not None else torch.default_generator
        shard = _shard_index(spec)
        with torch.random.fork_rng(devices=[]):
            if shard is None:
                torch.default_generator.set_state(source.get_state())
                yield
                after = torch.default_generator.get_state()
            else:
                seed = int(torch.randint(0, _SEED_RANGE, (), generator=source))
                after = source.get_state()
                torch.default_generator.manual_seed((seed + shard * _SHARD_SEED_STRIDE) % 2**64)
                yield
        source.set_state(after)


def _shard_index(spec: DTensorSpec) -> int | None:
    """Which shard of the tensor this rank holds (``None`` when it holds the whole tensor)."""
    index, sharded = 0, False
    coordinate = spec.mesh.get_coordinate() or []
    for mesh_dim, placement in enumerate(spec.placements):
        if placement.is_shard():
            sharded = True
            index = index * spec.mesh.size(mesh_dim) + coordinate[mesh_dim]
    return index if sharded else None

