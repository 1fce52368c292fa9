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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F  # noqa: N812

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
    return f"v8|{device_type}|{_device_name(device_type)}|{len(usable_cores())} cores|{ranks_per_node} ranks"


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
    gloo = _gloo_allreduce(max(2, ranks_per_node))
    return HardwareProfile(
        memory_bytes=psutil.virtual_memory().total // ranks_per_node, flops_per_s=flops,
        bandwidth_bytes_per_s=gloo["bandwidth"], small_message_bandwidth_bytes_per_s=gloo["small"],
        memory_bandwidth_bytes_per_s=copy, fresh_memory_bandwidth_bytes_per_s=fresh, process_overhead_bytes=gloo["rss"],
        step_fixed_bytes=gloo["step_fixed"],
        collective_latency_s=gloo["latency"], step_overhead_s=gloo["step_overhead"],
        dtensor_call_s=gloo["dtensor_call"], dtensor_optimizer_parameter_s=gloo["dtensor_optimizer"],
        collective_skew=gloo["skew"],
        device_type="cpu", device_name=_device_name("cpu"),
        bandwidth_source=f"gloo all-reduce of {_ALLREDUCE_BYTES >> 20} MiB, {max(2, ranks_per_node)} local processes",
    )


def _timed(fn: object, repeats: int, sync: bool) -> float:
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
    seconds = _timed(lambda: a @ b, 5, device.type == "cuda")
    return 2 * _MATMUL_SIZE**3 / seconds


def _copy_rate(device: torch.device) -> float:
    src = torch.empty(_COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), 5, device.type == "cuda")
    return 2 * _COPY_BYTES / seconds  # read + write


def _fresh_copy_rate() -> float:
    # Above glibc's largest mmap threshold (32 MiB) every allocation is a new mapping, as every large one
    # is in a ZeRO-2/3 CPU rank: the copy pays the first touch of each page.
    src = torch.empty(_COPY_BYTES // 4)
    seconds = _timed(lambda: torch.empty_like(src).copy_(src), 5, False)
    return 2 * _COPY_BYTES / seconds


def _gloo_allreduce(world_size: int) -> dict[str, float]:
    """Bus bandwidth (32 MiB and 1 MiB messages) and latency of gloo all-reduces between local processes, a rank's
    RSS after joining, DTensor's cost per call and per optimizer parameter on a mesh of them, and Lightning's
    per-step overhead (measured in rank 0's process, after the collectives)."""
    with tempfile.TemporaryDirectory() as tmp:
        # Why fresh interpreters and not multiprocessing's spawn: spawn re-runs the caller's __main__,
        # which in a training script without a main guard would start the training again.
        code = "import sys; from parti_lightning.planner.hardware import _allreduce_worker as w; w(*sys.argv[1:])"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(world_size), tmp])
                 for rank in range(world_size)]
        if any(proc.wait() for proc in procs):
            raise RuntimeError("measuring the gloo all-reduce bandwidth failed (see the output above).")
        return json.loads(Path(tmp, "result.json").read_text())


def _allreduce_worker(rank_arg: str, world_arg: str, tmp: str) -> None:
    rank, world_size = int(rank_arg), int(world_arg)
    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(tmp, "store")), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        tensor = torch.ones(_ALLREDUCE_BYTES // 4)
        dist.barrier()
        seconds = _timed(lambda: dist.all_reduce(tensor), 3, False)
        one = torch.ones(1)
        latency = _timed(lambda: dist.all_reduce(one), 20, False)
        small = torch.ones(_SMALL_ALLREDUCE_BYTES // 4)
        small_seconds = _timed(lambda: dist.all_reduce(small), 10, False)
        before = psutil.Process().memory_info().rss
        rss = before - _ALLREDUCE_BYTES  # before DTensor's own imports
        if rank == 0:
            # What a first training step adds whatever the model: kernels' code paged in, Lightning's loop.
            _reference_step()
            step = _lightning_step_seconds()
            step_fixed = psutil.Process().memory_info().rss - before
        skew = _collective_skew(world_size)
        dtensor_call, dtensor_optimizer = _dtensor_costs(world_size)
        if rank == 0:
            bus = 2 * (world_size - 1) / world_size * _ALLREDUCE_BYTES / seconds
            moved = 2 * (world_size - 1) / world_size * _SMALL_ALLREDUCE_BYTES
            small_bus = moved / max(small_seconds - latency, moved / bus)  # never above the large messages' rate
            result = {"bandwidth": bus, "small": small_bus, "latency": latency, "rss": rss, "step_overhead": step,
                      "step_fixed": step_fixed,
                      "dtensor_call": dtensor_call, "dtensor_optimizer": dtensor_optimizer, "skew": skew}
            Path(tmp, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _collective_skew(world_size: int, segments: int = 25, rounds: int = 5) -> float:
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
        alone = _timed(segment, segments, False)
        dist.barrier()
        synced = _timed(lambda: (segment(), dist.all_reduce(one)), segments, False)
        bare = _timed(lambda: dist.all_reduce(one), segments, False)
        skews.append(max(synced - alone - bare, 0.0) / alone)
    skew = torch.tensor([statistics.median(skews)])
    dist.all_reduce(skew)
    return skew.item() / world_size


class _ReferenceBlock(nn.Module):
    """A tiny pre-norm transformer block written as most models write one (separate query, key and value
    projections, heads from ``view`` and ``transpose``, fused attention, a GELU MLP): the operator mix whose
    DTensor dispatch ``_dtensor_costs`` measures. Why a block and not one layer: DTensor's cost per call
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


def _reference_blocks() -> nn.Sequential:
    """Two reference blocks: repeated, so that parti finds them as blocks."""
    return nn.Sequential(_ReferenceBlock(), _ReferenceBlock())


_REFERENCE_INPUT_SHAPE = (2, 8, 16)


def _reference_step() -> None:
    """One training step of the reference blocks (forward, backward, AdamW), unsplit."""
    blocks = _reference_blocks()
    optimizer = torch.optim.AdamW(blocks.parameters())
    blocks(torch.randn(_REFERENCE_INPUT_SHAPE)).sum().backward()
    optimizer.step()


def _dtensor_costs(world_size: int) -> tuple[float, float]:
    """Seconds DTensor adds per operator call and per parameter of an AdamW step, on tiny tensors (so that the
    kernels cost next to nothing): two reference blocks split by parti's own tensor parallelism, forward and
    backward, less the same blocks unsplit, over the number of DTensor calls the split ones make."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from parti_lightning.parallel.tensor import apply_tensor_parallel, tensor_parallel_step
    from parti_lightning.planner.profile import CallCounter

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tensor",))
    torch.manual_seed(0)  # every rank builds the same weights, as tensor parallelism requires
    split, plain = _reference_blocks(), _reference_blocks()
    inputs = torch.randn(_REFERENCE_INPUT_SHAPE)
    apply_tensor_parallel(split, mesh, run_example=lambda: split(inputs))

    def step(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with tensor_parallel_step():
                model(inputs).sum().backward()
        return run

    with CallCounter(DTensor) as calls:
        step(split)()
    per_call = max(_timed(step(split), 20, False) - _timed(step(plain), 20, False), 0.0) / max(calls.count, 1)
    dtensors = [p for p in split.parameters() if isinstance(p, DTensor)]
    optimizer = torch.optim.AdamW(dtensors)
    with tensor_parallel_step():
        per_parameter = _timed(optimizer.step, 20, False) / max(len(dtensors), 1)
    return per_call, per_parameter


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
