"""Tier 1: how PartiAccelerator splits a machine into device partitions (no process group)."""

from __future__ import annotations

import os

import pytest
import torch

from parti_lightning import PartiAccelerator
from parti_lightning.accelerator import cores_for_rank, usable_cores


@pytest.mark.parametrize(
    ("world", "cores", "expected"),
    [
        (2, [0, 1, 2, 3], [(0, 1), (2, 3)]),
        (3, [0, 1, 2, 3, 4, 5, 6], [(0, 1), (2, 3), (4, 5)]),
        (1, [4, 5], [(4, 5)]),
        (4, [0, 1], [(0,), (1,), (0,), (1,)]),  # oversubscribed: round-robin, one core each
    ],
)
def test_cores_are_split_into_disjoint_blocks(world: int, cores: list[int], expected: list[tuple[int, ...]]) -> None:
    assert [cores_for_rank(rank, world, cores) for rank in range(world)] == expected


def test_more_ranks_than_cores_is_refused_unless_asked_for() -> None:
    too_many = len(usable_cores()) + 1
    with pytest.raises(ValueError, match=f"devices={too_many} but this process may use"):
        PartiAccelerator("cpu").check_devices(too_many)
    PartiAccelerator("cpu", oversubscribe=True).check_devices(too_many)


def test_partition_pins_cores_sets_threads_and_restores_them() -> None:
    before_cores, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    accelerator = PartiAccelerator("cpu")
    partition = accelerator.setup_partition(torch.device("cpu"), local_rank=0, local_world_size=1)
    try:
        assert set(partition.cores) == before_cores
        assert os.sched_getaffinity(0) == set(partition.cores)
        assert torch.get_num_threads() == len(partition.cores)
        assert 0 < accelerator.memory_budget <= __import__("psutil").virtual_memory().total
    finally:
        accelerator.teardown()
    assert os.sched_getaffinity(0) == before_cores
    assert torch.get_num_threads() == before_threads


def test_cuda_is_refused_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: nothing to refuse")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        PartiAccelerator("cuda")


def test_freed_memory_release_respects_a_user_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from parti_lightning.accelerator import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert release_freed_memory() is True
