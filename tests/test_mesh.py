"""The four-axis mesh: coordinates (pure), and the groups it builds for meshes with every axis > 1.

Groups are built on torch's fake process group (one process stands for any rank of a 16-rank world:
collectives are no-ops, but group membership is real), so a 2 × 2 × 2 × 2 mesh needs no 16 processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from parti_lightning.mesh import MESH_DIM_NAMES, MeshCoordinates, ParallelMesh
from parti_lightning.plan import PartitionPlan, ResolvedPlan

ALL_TWO = ResolvedPlan(pipeline=2, data=2, shard=2, tensor=2, storage="parameters")


def test_axis_order_is_pipeline_outermost_tensor_innermost() -> None:
    assert MESH_DIM_NAMES == ("pipeline", "data", "shard", "tensor")


def test_coordinates_cover_the_mesh_once_with_tensor_fastest() -> None:
    coords = [MeshCoordinates.of(rank, ALL_TWO) for rank in range(16)]
    assert len({(c.pipeline, c.data, c.shard, c.tensor) for c in coords}) == 16
    assert [c.tensor for c in coords[:4]] == [0, 1, 0, 1]  # neighbours split each layer
    assert [c.pipeline for c in coords] == [0] * 8 + [1] * 8  # stages are the farthest apart
    # Ranks that differ only in tensor or pipeline coordinate see the same batch.
    assert [c.data_parallel_rank for c in coords] == [0, 0, 1, 1, 2, 2, 3, 3] * 2


def test_coordinates_refuse_a_rank_outside_the_mesh() -> None:
    with pytest.raises(ValueError, match="rank 16 is outside the mesh"):
        MeshCoordinates.of(16, ALL_TWO)


def test_resolved_plan_has_integer_degrees() -> None:
    resolved = PartitionPlan(storage="optimizer").resolve(4)
    assert isinstance(resolved, ResolvedPlan) and (resolved.data, resolved.shard) == (1, 4)
    assert resolved.resolve(4) == resolved


@contextmanager
def _fake_world(rank: int, world_size: int) -> Iterator[None]:
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ranks(group: dist.ProcessGroup) -> list[int]:
    return dist.get_process_group_ranks(group)


@pytest.mark.parametrize("rank", [0, 5, 10, 15])
def test_groups_of_a_mesh_with_every_axis_two(rank: int) -> None:
    with _fake_world(rank, 16):
        mesh = ParallelMesh(ALL_TWO, "cpu")
        c = mesh.coordinates
        assert c == MeshCoordinates.of(rank, ALL_TWO)
        # rank = ((pipeline * 2 + data) * 2 + shard) * 2 + tensor
        base = rank - c.tensor
        assert _ranks(mesh.tensor_group) == [base, base + 1]
        base = rank - 2 * c.shard
        assert _ranks(mesh.shard_group) == [base, base + 2]
        base = rank - 8 * c.pipeline
        assert _ranks(mesh.pipeline_group) == [base, base + 8]
        # data × shard: the 4 ranks with this rank's pipeline and tensor coordinates.
        first = 8 * c.pipeline + c.tensor
        assert _ranks(mesh.data_parallel_group) == [first, first + 2, first + 4, first + 6]
        assert (mesh.data_parallel_rank, mesh.data_parallel_size) == (c.data_parallel_rank, 4)
        assert mesh.storage_mesh.mesh_dim_names == ("data", "shard") and tuple(mesh.storage_mesh.shape) == (2, 2)
        assert mesh.tensor_mesh.mesh_dim_names == ("tensor",)
        assert all([mesh.data_parallel_enabled, mesh.shard_enabled, mesh.tensor_enabled, mesh.pipeline_enabled])


def test_data_parallel_group_of_one_axis_meshes() -> None:
    with _fake_world(3, 4):
        mesh = ParallelMesh(PartitionPlan().resolve(4), "cpu")
        assert _ranks(mesh.data_parallel_group) == [0, 1, 2, 3]
        assert not mesh.shard_enabled and not mesh.tensor_enabled and not mesh.pipeline_enabled
    with _fake_world(3, 4):
        mesh = ParallelMesh(PartitionPlan(storage="parameters").resolve(4), "cpu")
        assert _ranks(mesh.data_parallel_group) == _ranks(mesh.shard_group) == [0, 1, 2, 3]
