"""What one rank's device partition can hold and how fast it computes and communicates.

Measured once per machine shape (device, core count, ranks per node) and cached as JSON under
``$XDG_CACHE_HOME/parti-lightning/`` (or ``~/.cache/parti-lightning/``). Tests build a
``HardwareProfile`` directly and never benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
import torch
import torch.distributed as dist

from parti_lightning.accelerator import cores_for_rank, usable_cores

CACHE_FILE = "hardware.json"
_MATMUL_SIZE = 1024
_COPY_BYTES = 64 * 1024**2
_ALLREDUCE_BYTES = 32 * 1024**2
_SMALL_ALLREDUCE_BYTES = 1024**2  # a block's activations at moderate sizes: what tensor parallelism all-reduces


@dataclass(frozen=True)
class HardwareProfile:
    """One rank's share of a node.

    Args:
        memory_bytes: memory budget of one rank (CPU: the node's RAM over its ranks; CUDA: the GPU's memory).
        flops_per_s: fp32 matmul rate of one rank (CPU: on its share of the cores).
        bandwidth_bytes_per_s: bus bandwidth of collectives between the ranks of a node: an all-reduce
            of ``B`` bytes over ``N`` ranks takes ``2 (N-1)/N B / bandwidth``.
        memory_bandwidth_bytes_per_s: copy rate of one rank's memory (bounds the optimizer step).
        fresh_memory_bandwidth_bytes_per_s: copy rate into newly mapped memory, page faults included: what
            ZeRO-2/3 pays on CPU, where parti returns freed memory to the OS at once (so every gathered unit
            and gradient buffer is fresh memory); ``None``: as ``memory_bandwidth_bytes_per_s``.
        internode_bandwidth_bytes_per_s: the same across nodes; ``None``: assumed equal to ``bandwidth_bytes_per_s``.
        small_message_bandwidth_bytes_per_s: the bus bandwidth of a 1 MiB all-reduce between the ranks of a node,
            its latency taken out (small messages move slower); ``None``: as ``bandwidth_bytes_per_s``.
        all_gather_bandwidth_bytes_per_s: the bus bandwidth of an all-gather (32 MiB gathered) between the ranks of
            a node: gathering ``B`` bytes over ``N`` ranks takes ``(N-1)/N B / bandwidth``. ZeRO-2/3 gathers every
            unit this way. Not half an all-reduce: on CPU gloo, 2 ranks, it measured 1.4× an all-reduce of the
            same bytes. ``None``: as ``bandwidth_bytes_per_s``.
        reduce_scatter_bandwidth_bytes_per_s: the same for a reduce-scatter (ZeRO-2/3's gradients); on CPU gloo it
            measured 1.75× an all-reduce of the same bytes. ``None``: as ``bandwidth_bytes_per_s``.
        process_overhead_bytes: memory a rank uses before the model exists (interpreter, torch, process group).
        step_fixed_bytes: memory a rank adds on its first training step whatever the model's size: the code of
            the kernels it runs, paged in, and Lightning's loop (measured: two tiny transformer blocks' step,
            then a one-parameter model's fit).
        collective_latency_s: time of a one-element all-reduce (paid once per collective call).
        step_overhead_s: what Lightning's training loop adds to every step whatever the model (hooks,
            batch transfer, logging, the optimizer call), measured on a one-parameter model.
        dtensor_call_s: what DTensor's dispatch adds to one operator call on a tensor-parallel weight or
            activation (sharding propagation and unwrapping, in Python), measured on two tiny transformer blocks
            split by parti's tensor parallelism.
        dtensor_optimizer_parameter_s: what one DTensor parameter adds to an AdamW step (its foreach kernels
            run once per DTensor).
        collective_skew: what a collective between ranks that computed the same work waits for the slowest of
            them, as a fraction of that work's time (CPU ranks sharing a machine are preempted at different
            times; tensor parallelism pays it at every all-reduce). 0 where not measured (CUDA).
        device_type: ``"cpu"`` or ``"cuda"``.
        device_name: e.g. the CPU model or the GPU name.
        bandwidth_source: how ``bandwidth_bytes_per_s`` was found.
    """

    memory_bytes: int
    flops_per_s: float
    bandwidth_bytes_per_s: float
    memory_bandwidth_bytes_per_s: float = 10e9
    fresh_memory_bandwidth_bytes_per_s: float | None = None
    internode_bandwidth_bytes_per_s: float | None = None
    small_message_bandwidth_bytes_per_s: float | None = None
    all_gather_bandwidth_bytes_per_s: float | None = None
    reduce_scatter_bandwidth_bytes_per_s: float | None = None
    process_overhead_bytes: int = 0
    step_fixed_bytes: int = 0
    collective_latency_s: float = 0.0
    step_overhead_s: float = 0.0
    dtensor_call_s: float = 0.0
    dtensor_optimizer_parameter_s: float = 0.0
    collective_skew: float = 0.0
    device_type: str = "cpu"
    device_name: str = "given"
    bandwidth_source: str = "given"

    @property
    def internode_bandwidth(self) -> float:
        return self.internode_bandwidth_bytes_per_s or self.bandwidth_bytes_per_s

    def bandwidth_at(self, size: float) -> float:
        """Bus bandwidth of an all-reduce of ``size`` bytes within a node: interpolated (log-log) between the
        1 MiB and the 32 MiB measurements, held at either end beyond them."""
        small = self.small_message_bandwidth_bytes_per_s
        if small is None or size >= _ALLREDUCE_BYTES:
            return self.bandwidth_bytes_per_s
        if size <= _SMALL_ALLREDUCE_BYTES:
            return small
        where = math.log(size / _SMALL_ALLREDUCE_BYTES) / math.log(_ALLREDUCE_BYTES / _SMALL_ALLREDUCE_BYTES)
        return math.exp(math.log(small) + where * (math.log(self.bandwidth_bytes_per_s) - math.log(small)))

    @classmethod
    def measure(
        cls,
        device_type: Literal["cpu", "cuda"] = "cpu",
        ranks_per_node: int = 1,
        *,
        cache_dir: str | Path | None = None,
        refresh: bool = False,
    ) -> HardwareProfile:
        """This machine's profile for ``ranks_per_node`` ranks: from the cache, else measured (seconds) and cached.

        The collective bandwidth is that of a gloo all-reduce between ``max(2, ranks_per_node)`` local
        processes on CPU; on CUDA, a device-to-device copy stands in for it (NVLink/PCIe peers are not
        measured yet), and ``bandwidth_source`` says so.

        Args:
            device_type: ``"cpu"`` or ``"cuda"``.
            ranks_per_node: processes that share this node.
            cache_dir: where the JSON cache lives; default ``$XDG_CACHE_HOME/parti-lightning``.
            refresh: measure again even if the cache has this machine shape.
        """
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={ranks_per_node} is invalid: use a positive integer.")
        path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
        key = cache_key(device_type, ranks_per_node)
        cached = read_cache(path)
        if key in cached and not refresh:
            return cls(**cached[key])
        profile = _measure(device_type, ranks_per_node)
        cached[key] = dataclasses.asdict(profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=2))
        return profile


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "parti-lightning"


def cache_key(device_type: str, ranks_per_node: int) -> str:
    """Key of a machine shape: device type and name, usable cores, ranks per node (and what is measured)."""
    return f"v9|{device_type}|{_device_name(device_type)}|{len(usable_cores())} cores|{ranks_per_node} ranks"


def read_cache(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again


def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        return found.group(1).strip() if found else "cpu"
    except OSError:
        return "cpu"


# ------------------------------------------------------------------------------------ measurement


def _measure(device_type: str, ranks_per_node: int) -> HardwareProfile:
    if device_type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        flops = _matmul_rate(device)
        copy = _copy_rate(device)
        return HardwareProfile(
            memory_bytes=torch.cuda.get_device_properties(device).total_memory, flops_per_s=flops,
            bandwidth_bytes_per_s=copy, memory_bandwidth_bytes_per_s=copy, device_type="cuda",
            device_name=_device_name("cuda"), bandwidth_source="device memcpy (proxy; peer links not measured)",
        )
    cores = cores_for_rank(0, ranks_per_node, usable_cores())
    threads = torch.get_num_threads()
    torch.set_num_threads(len(cores))  # one rank's share, as PartiAccelerator pins it
    try:
        flops, copy = _matmul_rate(torch.device("cpu")), _copy_rate(torch.device("cpu"))
        fresh = _fresh_copy_rate()
    finally:
        torch.set_num_threads(threads)
    between_ranks = _gloo_allreduce(max(2, ranks_per_node))
    return HardwareProfile(
        memory_bytes=psutil.virtual_memory().total // ranks_per_node, flops_per_s=flops,
        memory_bandwidth_bytes_per_s=copy, fresh_memory_bandwidth_bytes_per_s=fresh,
        **dataclasses.asdict(between_ranks), device_type="cpu", device_name=_device_name("cpu"),
        bandwidth_source=f"gloo all-reduce of {_ALLREDUCE_BYTES >> 20} MiB, {max(2, ranks_per_node)} local processes",
    )


def timed(fn: object, repeats: int, sync: bool) -> float:
    fn()  # type: ignore[operator]  # warm-up
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()  # type: ignore[operator]
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _matmul_rate(device: torch.device) -> float:
    a = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, device=device)
    b = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, device=device)
    seconds = timed(lambda: a @ b, 5, device.type == "cuda")
    return 2 * _MATMUL_SIZE**3 / seconds


def _copy_rate(device: torch.device) -> float:
    src = torch.empty(_COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 5, device.type == "cuda")
    return 2 * _COPY_BYTES / seconds  # read + write


def _fresh_copy_rate() -> float:
    # Above glibc's largest mmap threshold (32 MiB) every allocation is a new mapping, as every large one
    # is in a ZeRO-2/3 CPU rank: the copy pays the first touch of each page.
    src = torch.empty(_COPY_BYTES // 4)
    seconds = timed(lambda: torch.empty_like(src).copy_(src), 5, False)
    return 2 * _COPY_BYTES / seconds


@dataclass(frozen=True)
class _RankMeasurements:
    """What the hardware workers measure between ranks: ``HardwareProfile``'s fields of the same names."""

    bandwidth_bytes_per_s: float
    small_message_bandwidth_bytes_per_s: float
    all_gather_bandwidth_bytes_per_s: float
    reduce_scatter_bandwidth_bytes_per_s: float
    collective_latency_s: float
    process_overhead_bytes: int
    step_fixed_bytes: int
    step_overhead_s: float
    dtensor_call_s: float
    dtensor_optimizer_parameter_s: float
    collective_skew: float


def _gloo_allreduce(world_size: int) -> _RankMeasurements:
    """Bus bandwidth (32 MiB and 1 MiB messages) and latency of gloo all-reduces between local processes, a rank's
    RSS after joining, DTensor's cost per call and per optimizer parameter on a mesh of them and the collective
    skew (``tensor_overhead``), and Lightning's per-step overhead (measured in rank 0's process, after the
    collectives)."""
    with tempfile.TemporaryDirectory() as tmp:
        # Why fresh interpreters and not multiprocessing's spawn: spawn re-runs the caller's __main__,
        # which in a training script without a main guard would start the training again.
        code = "import sys; from parti_lightning.planner.hardware import _allreduce_worker as w; w(*sys.argv[1:])"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(world_size), tmp])
                 for rank in range(world_size)]
        if any(proc.wait() for proc in procs):
            raise RuntimeError("measuring the gloo all-reduce bandwidth failed (see the output above).")
        return _RankMeasurements(**json.loads(Path(tmp, "result.json").read_text()))


def _allreduce_worker(rank_arg: str, world_arg: str, tmp: str) -> None:
    # Imported here: tensor_overhead uses this module's ``timed``.
    from parti_lightning.planner.tensor_overhead import measure_tensor_overhead

    rank, world_size = int(rank_arg), int(world_arg)
    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(tmp, "store")), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        tensor = torch.ones(_ALLREDUCE_BYTES // 4)
        dist.barrier()
        seconds = timed(lambda: dist.all_reduce(tensor), 3, False)
        one = torch.ones(1)
        latency = timed(lambda: dist.all_reduce(one), 20, False)
        small = torch.ones(_SMALL_ALLREDUCE_BYTES // 4)
        small_seconds = timed(lambda: dist.all_reduce(small), 10, False)
        # ZeRO-2/3's collectives, on the same bytes: gloo runs them at rates of their own (not half an all-reduce).
        shard = torch.ones(_ALLREDUCE_BYTES // 4 // world_size)
        gather_seconds = timed(lambda: dist.all_gather_single(tensor, shard), 3, False)
        scatter_seconds = timed(lambda: dist.reduce_scatter_single(shard, tensor), 3, False)
        before = psutil.Process().memory_info().rss
        rss = before - _ALLREDUCE_BYTES  # before DTensor's own imports
        if rank == 0:
            # What a first training step adds whatever the model: kernels' code paged in, Lightning's loop.
            _reference_step()
            step = _lightning_step_seconds()
            step_fixed = psutil.Process().memory_info().rss - before
        overhead = measure_tensor_overhead(world_size)  # the skew, then DTensor's costs
        if rank == 0:
            bus = 2 * (world_size - 1) / world_size * _ALLREDUCE_BYTES / seconds
            moved = 2 * (world_size - 1) / world_size * _SMALL_ALLREDUCE_BYTES
            small_bus = moved / max(small_seconds - latency, moved / bus)  # never above the large messages' rate
            one_way = (world_size - 1) / world_size * _ALLREDUCE_BYTES
            result = _RankMeasurements(
                bandwidth_bytes_per_s=bus, small_message_bandwidth_bytes_per_s=small_bus,
                all_gather_bandwidth_bytes_per_s=one_way / gather_seconds,
                reduce_scatter_bandwidth_bytes_per_s=one_way / scatter_seconds,
                collective_latency_s=latency, process_overhead_bytes=rss, step_fixed_bytes=step_fixed,
                step_overhead_s=step, **dataclasses.asdict(overhead))
            Path(tmp, "result.json").write_text(json.dumps(dataclasses.asdict(result)))
    finally:
        dist.destroy_process_group()


def _reference_step() -> None:
    """One training step of the reference blocks (forward, backward, AdamW), unsplit."""
    from parti_lightning.planner.tensor_overhead import REFERENCE_INPUT_SHAPE, reference_blocks

    blocks = reference_blocks()
    optimizer = torch.optim.AdamW(blocks.parameters())
    blocks(torch.randn(REFERENCE_INPUT_SHAPE)).sum().backward()
    optimizer.step()


def _lightning_step_seconds(steps: int = 40, warmup: int = 10) -> float:
    """Median seconds per training step of a one-parameter model under Lightning: the loop's own cost."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class _Clock(Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, *args: object) -> None:
            self.stamps.append(time.perf_counter())

    class _OneParameter(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = (self.weight * batch).sum()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

    clock = _Clock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=[clock],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.zeros(steps, 1), batch_size=1)
    trainer.fit(_OneParameter(), loader)
    stamps = clock.stamps[warmup:]
    intervals = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return intervals[len(intervals) // 2]
