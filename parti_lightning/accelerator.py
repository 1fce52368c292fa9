"""PartiAccelerator: one device partition per rank, and what each partition can hold.

On CUDA machines a partition is one GPU. On CPU machines ``devices=N`` means N processes, and each
rank gets its own disjoint set of cores with a matching thread count: without that, N processes each
running one intra-op thread per core would oversubscribe the machine N times and fight for cores.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import torch
from lightning.fabric.accelerators.registry import _AcceleratorRegistry
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator
from lightning.pytorch.accelerators.cpu import get_cpu_stats
from typing_extensions import override

DeviceType = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DevicePartition:
    """What one rank owns: its device, its CPU cores and its memory budget in bytes."""

    device: torch.device
    cores: tuple[int, ...]
    memory_bytes: int


# The cores this process could use before any rank was pinned: a second Trainer in the same process
# (fit, then test) must partition the machine, not the single core the first one left it.
_initial_cores: list[int] | None = None


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (respects taskset, cgroups' cpusets and SLURM binding)."""
    if _initial_cores is not None:
        return list(_initial_cores)
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cores_for_rank(local_rank: int, local_world_size: int, cores: list[int]) -> tuple[int, ...]:
    """A contiguous, disjoint block of ``cores`` for ``local_rank``; round-robin when oversubscribed."""
    if local_world_size > len(cores):
        return (cores[local_rank % len(cores)],)
    per_rank = len(cores) // local_world_size
    return tuple(cores[local_rank * per_rank : (local_rank + 1) * per_rank])


def partition_memory_bytes(device: torch.device, local_world_size: int) -> int:
    """One rank's memory budget: its GPU's memory, or on CPU the machine's memory over the node's ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total // max(local_world_size, 1)


def release_freed_memory() -> bool:
    """Have glibc return freed large blocks to the OS at once; False where that is not possible.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which
    such blocks come from the heap and stay resident once freed. Sharded training gathers and frees
    whole units every step, so a ZeRO-3 rank on CPU then holds about twice its tensor bytes, more
    than a replicated one (measured in benchmarks/storage_memory.py). A fixed 128 KiB threshold keeps
    resident memory at the tensor bytes, for some page faults. No library sets this, hence ctypes.
    A threshold the user set (``MALLOC_MMAP_THRESHOLD_``) is left alone.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc
    m_mmap_threshold = -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))


class PartiAccelerator(Accelerator):
    """Device partitions for parti: a GPU per rank on CUDA, a disjoint core set per rank on CPU.

    Args:
        device_type: ``"cuda"``, ``"cpu"``, or ``"auto"`` (CUDA when available).
        oversubscribe: allow more CPU processes than usable cores (each rank then gets one core,
            shared round-robin). Useful for testing wide meshes on a small machine; slow.
        pin_cores: pin each CPU rank to its own cores and set its thread count to match.
    """

    def __init__(self, device_type: DeviceType = "auto", oversubscribe: bool = False, pin_cores: bool = True) -> None:
        super().__init__()
        if device_type == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("PartiAccelerator(device_type='cuda') needs a CUDA GPU, but none is available.")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"PartiAccelerator(device_type={device_type!r}): choose 'auto', 'cpu' or 'cuda'.")
        self.device_type: Literal["cpu", "cuda"] = device_type
        self.oversubscribe = oversubscribe
        self.pin_cores = pin_cores
        self.partition: DevicePartition | None = None
        self._restore: tuple[int, list[int]] | None = None

    def check_devices(self, num_processes: int) -> None:
        """Fail before launch when this machine cannot hold ``num_processes`` partitions."""
        if self.device_type == "cuda":
            available = torch.cuda.device_count()
            if num_processes > available:
                raise ValueError(f"devices={num_processes} but this machine has {available} CUDA GPU(s).")
            return
        available = len(usable_cores())
        if num_processes > available and not self.oversubscribe:
            raise ValueError(
                f"devices={num_processes} but this process may use {available} CPU core(s), one per rank at least:"
                f" use devices<={available}, or accelerator=PartiAccelerator(oversubscribe=True) to share cores."
            )

    def setup_partition(
        self, device: torch.device, local_rank: int, local_world_size: int, sharded: bool = False
    ) -> DevicePartition:
        """Claim this rank's partition: set the CUDA device, or pin the CPU cores and threads.

        ``sharded``: the plan gathers and frees parameters every step; on CPU, freed memory is then
        returned to the OS at once (see :func:`release_freed_memory`).
        """
        if self.device_type == "cuda":
            torch.cuda.set_device(device)
            total = partition_memory_bytes(device, local_world_size)
            self.partition = DevicePartition(device, tuple(usable_cores()), total)
            return self.partition
        global _initial_cores
        if sharded:
            release_freed_memory()
        available = usable_cores()
        cores = cores_for_rank(local_rank, local_world_size, available)
        if self.pin_cores and hasattr(os, "sched_setaffinity"):
            _initial_cores = available
            self._restore = (torch.get_num_threads(), available)
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
        self.partition = DevicePartition(device, cores, partition_memory_bytes(device, local_world_size))
        return self.partition

    @property
    def memory_budget(self) -> int:
        """Bytes this rank's partition may use (the planner's budget)."""
        if self.partition is None:
            raise RuntimeError("PartiAccelerator.memory_budget is known once the strategy set up the partition.")
        return self.partition.memory_bytes

    @override
    def setup_device(self, device: torch.device) -> None:
        if device.type != self.device_type:
            raise ValueError(f"PartiAccelerator({self.device_type!r}) was given device {device}.")
        if device.type == "cuda":
            torch.cuda.set_device(device)

    @override
    def get_device_stats(self, device: _DEVICE) -> dict[str, Any]:
        if self.device_type == "cuda":
            return torch.cuda.memory_stats(device)
        stats: dict[str, Any] = get_cpu_stats()
        stats["rank_rss_bytes"] = psutil.Process().memory_info().rss
        return stats

    @override
    def teardown(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.empty_cache()
        if self._restore is not None:
            # Give the process its cores back, so code after `fit` (or a notebook) is not left on one.
            threads, cores = self._restore
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(threads)
            self._restore = None

    @staticmethod
    @override
    def parse_devices(devices: int | str | list[int]) -> int | list[int]:
        if torch.cuda.is_available():
            return CUDAAccelerator.parse_devices(devices)
        return CPUAccelerator.parse_devices(devices)

    @staticmethod
    @override
    def get_parallel_devices(devices: int | str | list[int]) -> list[torch.device]:
        if torch.cuda.is_available():
            return CUDAAccelerator.get_parallel_devices(devices)
        return CPUAccelerator.get_parallel_devices(devices)

    @staticmethod
    @override
    def auto_device_count() -> int:
        if torch.cuda.is_available():
            return torch.cuda.device_count()
        # One rank per core would leave each rank a single thread; two cores per rank is a better default.
        return max(1, len(usable_cores()) // 2)

    @staticmethod
    @override
    def is_available() -> bool:
        return True

    @staticmethod
    @override
    def name() -> str:
        return "parti"

    @classmethod
    @override
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        accelerator_registry.register(cls.name(), cls, description=cls.__doc__.splitlines()[0] if cls.__doc__ else "")

    @classmethod
    def from_lightning(cls, accelerator: Accelerator) -> Accelerator:
        """Swap Lightning's stock CPU/CUDA accelerator for the matching PartiAccelerator; keep anything else."""
        if type(accelerator) is CPUAccelerator:
            return cls("cpu")
        if type(accelerator) is CUDAAccelerator:
            return cls("cuda")
        return accelerator
