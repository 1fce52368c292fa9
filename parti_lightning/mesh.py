"""The four-axis device mesh of a resolved plan, and every process group a technique needs.

One :class:`ParallelMesh` per run owns the axes, their process groups and their timeouts; nothing
else in parti creates groups. Techniques receive the part of it they work on: the ``(data, shard)``
sub-mesh for storage sharding, the ``tensor`` sub-mesh for tensor parallelism, the ``pipeline`` group
for pipeline stages (and ``pipeline × data × shard`` for the parameters outside the trunk), and the
data-parallel group (``data × shard``) for gradient averaging and for everything Lightning reduces
(logged values, metrics, the sampler).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parti_lightning.plan import MeshAxis, ResolvedPlan

# Outermost first. The order follows the links each axis needs on a cluster: consecutive ranks
# share a node, so the innermost axis gets the fastest links. `tensor` collectives run inside every
# layer, so it is innermost; `shard` and `data` exchange a step's parameters and gradients;
# `pipeline` only passes activations between neighbouring stages, the least traffic, and may
# cross nodes, so it is outermost.
MESH_ORDER: tuple[MeshAxis, ...] = (MeshAxis.PIPELINE, MeshAxis.DATA, MeshAxis.SHARD, MeshAxis.TENSOR)
MESH_DIM_NAMES: tuple[str, ...] = tuple(str(axis) for axis in MESH_ORDER)


@dataclass(frozen=True)
class MeshCoordinates:
    """Where one global rank sits on the mesh of a plan; pure arithmetic, no process group."""

    pipeline: int
    data: int
    shard: int
    tensor: int
    data_parallel_rank: int

    @classmethod
    def of(cls, rank: int, plan: ResolvedPlan) -> MeshCoordinates:
        """The coordinates of global ``rank`` on the mesh of ``plan``.

        Raises:
            ValueError: ``rank`` is not a rank of the plan's world.
        """
        world = plan.pipeline * plan.data * plan.shard * plan.tensor
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the mesh {plan.mesh_description()} of {world} ranks.")
        coords = {}
        rest = rank
        for axis in reversed(MESH_ORDER):  # innermost varies fastest
            size = getattr(plan, axis.value)
            coords[axis.value] = rest % size
            rest //= size
        # Ranks that differ only in their tensor or pipeline coordinate see the same batch.
        return cls(**coords, data_parallel_rank=coords["data"] * plan.shard + coords["shard"])


class ParallelMesh:
    """The device mesh of a resolved plan: axes ``(pipeline, data, shard, tensor)``, outermost first.

    Building it is collective: every rank of the default process group constructs it, with the same plan.

    Args:
        plan: the resolved plan; its degrees must multiply to the world size.
        device_type: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, plan: ResolvedPlan, device_type: str) -> None:
        self.plan = plan
        self.device_mesh: DeviceMesh = init_device_mesh(
            device_type, tuple(getattr(plan, axis.value) for axis in MESH_ORDER), mesh_dim_names=MESH_DIM_NAMES
        )
        self.coordinates = MeshCoordinates.of(dist.get_rank(), plan)
        self.data_parallel_group: ProcessGroup = _flattened_group(self.device_mesh, plan)
        # Replicated gradient averaging starts its all-reduces during backward, at moments that differ
        # between ranks: on a group of its own they never pair with other collectives of the data group.
        self.gradient_group: ProcessGroup | None = (
            twin_group(self.data_parallel_group) if plan.data_parallel_size > 1 else None
        )

    # ------------------------------------------------------------------ what is on

    @property
    def data_parallel_enabled(self) -> bool:
        return self.plan.data_parallel_size > 1

    @property
    def shard_enabled(self) -> bool:
        return self.plan.shard > 1

    @property
    def tensor_enabled(self) -> bool:
        return self.plan.tensor > 1

    @property
    def pipeline_enabled(self) -> bool:
        return self.plan.pipeline > 1

    # ------------------------------------------------------------------ ranks

    @property
    def data_parallel_rank(self) -> int:
        """This rank's index among the ranks that see different batches (the sampler's rank)."""
        return self.coordinates.data_parallel_rank

    @property
    def data_parallel_size(self) -> int:
        """How many different batches a step sees (the sampler's number of replicas)."""
        return self.plan.data_parallel_size

    # ------------------------------------------------------------------ what techniques get

    @property
    def storage_mesh(self) -> DeviceMesh:
        """The 2-D ``(data, shard)`` sub-mesh that storage sharding works on."""
        return self.device_mesh[str(MeshAxis.DATA), str(MeshAxis.SHARD)]

    @property
    def tensor_mesh(self) -> DeviceMesh:
        """The 1-D ``tensor`` sub-mesh: the ranks that split each layer."""
        return self.device_mesh[str(MeshAxis.TENSOR)]

    @property
    def shard_group(self) -> ProcessGroup:
        return self.device_mesh.get_group(str(MeshAxis.SHARD))

    @property
    def tensor_group(self) -> ProcessGroup:
        return self.device_mesh.get_group(str(MeshAxis.TENSOR))

    @property
    def pipeline_group(self) -> ProcessGroup:
        """The ranks of one pipeline, in stage order."""
        return self.device_mesh.get_group(str(MeshAxis.PIPELINE))

    @functools.cached_property
    def outside_trunk_mesh(self) -> DeviceMesh:
        """The 1-D mesh of every rank with this rank's tensor coordinate: ``pipeline × data × shard``.

        Under pipeline parallelism the parameters outside the trunk (embeddings, head) are the same on every
        rank of it; they are sharded over it. Collective the first time (``_flatten`` builds a group): every
        rank reads it at the same point.
        """
        axes = [str(axis) for axis in (MeshAxis.PIPELINE, MeshAxis.DATA, MeshAxis.SHARD)]
        if self.plan.data == 1 and self.plan.shard == 1:
            return self.device_mesh[str(MeshAxis.PIPELINE)]
        # As in `_flattened_group`: torch 2.13's only way to merge mesh axes into one.
        return self.device_mesh[tuple(axes)]._flatten("outside_trunk")

    def groups(self) -> list[ProcessGroup]:
        """Every process group of the run (the world's included), each once."""
        found = [dist.group.WORLD, self.data_parallel_group, self.gradient_group, *self.device_mesh.get_all_groups()]
        unique = {id(group): group for group in found if group is not None}
        return list(unique.values())

    def set_timeout(self, timeout: timedelta) -> None:
        """How long a collective on any of the run's groups may wait for the other ranks."""
        for group in self.groups():
            _set_group_timeout(group, timeout)

    def __repr__(self) -> str:
        return f"ParallelMesh({self.plan.mesh_description()}, rank coordinates {self.coordinates})"


def _flattened_group(mesh: DeviceMesh, plan: ResolvedPlan) -> ProcessGroup:
    """The data-parallel group: the ranks of ``data × shard`` with the same pipeline and tensor coordinate."""
    if plan.shard == 1:
        return mesh.get_group(str(MeshAxis.DATA))
    if plan.data == 1:
        return mesh.get_group(str(MeshAxis.SHARD))
    # torch 2.13 has no public way to merge two mesh axes into one group; `_flatten` is DeviceMesh's own
    # (checked against 2.13.0), and it registers the merged axis with the mesh so DTensor can find it.
    return mesh[str(MeshAxis.DATA), str(MeshAxis.SHARD)]._flatten("data_shard").get_group()


def _set_group_timeout(group: ProcessGroup, timeout: timedelta) -> None:
    # torch fixes a group's timeout when the group is created; this private setter (checked against
    # 2.13.0) is the only way to tighten it once every rank has joined.
    dist.distributed_c10d._set_pg_timeout(timeout, group)


def twin_group(group: ProcessGroup) -> ProcessGroup:
    """A process group of the same ranks, for the gradient all-reduces alone.

    Own group, so that buckets started at different moments on different ranks never pair with other
    collectives on ``group`` (batch-norm statistics, metric syncs). torch creates a group with every
    process of the job taking part (a group named after its ranks alone, as local creation does, would
    clash with an earlier group of the same ranks), so each process says which ranks its group has and
    every process creates all of them, in one order.
    """
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        backend = "cpu:gloo,cuda:nccl"  # the small agreement masks stay on the host
    ranks = tuple(dist.get_process_group_ranks(group))
    everyone: list[tuple[int, ...] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ranks)
    twin = None
    for members in sorted({r for r in everyone if r is not None}):
        created = dist.new_group(list(members), backend=backend, timeout=_timeout(group), group_desc="parti_gradients")
        if members == ranks:
            twin = created
    assert twin is not None
    return twin


def _timeout(group: ProcessGroup) -> timedelta | None:
    for device in (torch.device("cpu"), torch.device("cuda")):
        try:
            return group._get_backend(device).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None
