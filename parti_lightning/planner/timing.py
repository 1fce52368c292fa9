"""One repeated block's real forward and backward, timed on this machine's CPU at the sizes a plan would run it.

FLOPs over one measured matmul rate miss what a transformer block spends outside its matmuls (GELU,
softmax, layer norms: a third of a CPU step of the example) and how much slower small micro-batches
run. The blocks are most of a model's step and all alike, so timing one of them for real, on one
rank's share of the cores, gives the cost model a rate that holds for this model on this machine.
The rest of the profile stays on the meta device: only one block is ever materialized.

The same run counts the block's aten calls: under tensor parallelism each of them goes through
DTensor's dispatch, which on CPU costs about as much as the small matmuls themselves. (The meta
profile counts more: there, attention falls back to its unfused form.)
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map_only

from parti_lightning.accelerator import cores_for_rank, usable_cores
from parti_lightning.parallel.blocks import find_blocks
from parti_lightning.parallel.copies import REAL_COPY_BYTES, module_copy, state_bytes, trial_copy
from parti_lightning.parallel.scratch import CacheTemplates, fresh_caches
from parti_lightning.planner.profile import META, BlockTiming, CallCounter, ModelProfile, meta_copy

# Micro-batch counts a pipeline candidate may use (as the search proposes them).
_MICRO_BATCHES = (1, 2, 4, 8)
# Each size runs _MIN_RUNS times after a warm-up, then on while under _SECONDS_PER_SIZE (at most _MAX_RUNS): the
# median of 2 runs, as a 0.3 s budget gave a large block, moved the plans' predicted ratios by 10% between two
# plannings on a shared VM. A block slower than _SLOW_BLOCK_S is not timed at smaller sizes, and a size above
# _MAX_FLOPS (a few seconds on a CPU core) not at all: the cost model scales the nearest size timed.
_MIN_RUNS = 5
_MAX_RUNS = 15
_SECONDS_PER_SIZE = 0.5
_SLOW_BLOCK_S = 1.0
_MAX_FLOPS = 2e11
# The block runs beside the caller's own memory: at most this share of what is available.
_MEMORY_SHARE = 0.25


class _Captured(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args_, self.kwargs = args, kwargs


def time_blocks(module: nn.Module, batch: Any, profile: ModelProfile, ranks_per_node: int) -> ModelProfile:
    """``profile`` with its first block timed for real on one rank's share of this machine's CPU cores.

    The block's inputs are those it gets in a forward of ``module`` on ``batch`` (shapes found on the meta
    device, then filled with random values). It is timed at the batch's size and at each micro-batch size a
    pipeline candidate would use, and its forward alone at the batch's size (what checkpointing recomputes).
    When anything stops it (no blocks, a block that cannot run apart from its model), the profile is returned
    as it was, with a note: the cost model then uses the matmul rate.
    """
    if not profile.blocks:
        return profile
    try:
        timing = _measure(module, batch, profile, ranks_per_node)
    except Exception as err:  # noqa: BLE001 - the planner must not fail on what it only estimates
        note = f"timing a block failed ({type(err).__name__}: {err}): compute predicted from the matmul rate"
        return dataclasses.replace(profile, notes=(*profile.notes, note))
    return dataclasses.replace(profile, block_timing=timing)


def _measure(module: nn.Module, batch: Any, profile: ModelProfile, ranks_per_node: int) -> BlockTiming:
    first = profile.blocks[0]
    samples = profile.batch_size
    sizes = [samples // m for m in _MICRO_BATCHES if samples and samples % m == 0] or [0]
    flops = first.forward_flops + first.backward_flops
    sizes = [size for size in sizes if not samples or flops * size / samples <= _MAX_FLOPS]
    needed = 4 * first.parameter_bytes + first.activation_bytes
    if not sizes or needed > _MEMORY_SHARE * psutil.virtual_memory().available:
        raise RuntimeError(f"{first.name} is too large to time here ({flops / 1e9:,.0f} GFLOP,"
                           f" {needed / 2**30:.1f} GiB)")
    args, kwargs = _block_inputs(module, batch, first.name)
    block = _real_block(module, first.name)
    with _threads(len(cores_for_rank(0, ranks_per_node, usable_cores()))) as threads:
        operations = _count_operations(block, *_sliced(args, kwargs, samples, sizes[0]))
        measured: list[tuple[int, float]] = []
        for size in sizes:
            seconds = _median_seconds(block, *_sliced(args, kwargs, samples, size))
            measured.append((size, seconds))
            if seconds > _SLOW_BLOCK_S:
                break
        # What activation checkpointing pays again: the forward alone, as recomputed (building its graph).
        forward = _median_seconds(block, *_sliced(args, kwargs, samples, sizes[0]), backward=False)
        optimizer = _optimizer_seconds(block, profile)
    return BlockTiming(seconds=tuple(measured), operations=operations, threads=threads,
                       forward_share=min(forward / measured[0][1], 1.0), optimizer_seconds=optimizer)


def _optimizer_seconds(block: nn.Module, profile: ModelProfile) -> float | None:
    """The median step of the model's optimizer over copies of ``block``'s parameters, gradients set.

    A count of the bytes a step reads and writes misses it on CPU: torch steps there one tensor at a time
    (``foreach`` is CUDA's default), in several passes (AdamW over Llama 4x256's 32 MiB: 26.9 ms measured, 4.2 ms
    by bytes). ``None`` for an optimizer ``torch.optim`` does not have (its defaults are unknown here).
    """
    name = profile.optimizers[0].name if profile.optimizers else ""
    kind = getattr(torch.optim, name, None)
    if not (isinstance(kind, type) and issubclass(kind, torch.optim.Optimizer)):
        return None
    params = [nn.Parameter(p.detach().clone()) for p in block.parameters() if p.requires_grad]
    if not params:
        return None
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = kind(params)
    return _median(optimizer.step)  # its warm-up step allocates the state


def _block_inputs(module: nn.Module, batch: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What the block named ``name`` is called with, as meta tensors: its first call in a meta forward.

    A forward that cannot run on meta tensors (it reads values: Hugging Face's masks) runs on a real copy of a
    module of at most ``REAL_COPY_BYTES``, with gradients as in training (so that the timed backward computes
    the input's gradient too), stopped at the block's first call. A cache the block is handed empty (a Hugging Face
    decoder's, at its defaults) is scratch of one pass: each timed run gets a fresh empty one.
    """
    try:
        return _captured_inputs(meta_copy(module), tree_map_only(Tensor, _as_meta, batch), name)
    except _NoCapture:
        raise
    except Exception:
        if state_bytes(module) > REAL_COPY_BYTES:
            raise
    with torch.random.fork_rng(devices=[]):
        args, kwargs = _captured_inputs(trial_copy(module), batch, name)
    return tree_map_only(Tensor, _as_meta, args), tree_map_only(Tensor, _as_meta, kwargs)


def _as_meta(tensor: Tensor) -> Tensor:
    return torch.empty_like(tensor, device=META).requires_grad_(tensor.requires_grad)


class _NoCapture(RuntimeError):
    """The forward ran but never called the block."""


def _captured_inputs(copy: nn.Module, batch: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    block = dict(find_blocks(copy))[name]
    templates = CacheTemplates()

    def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        templates.see(args, kwargs)
        raise _Captured(*templates.scratch((args, kwargs)))

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        step = getattr(copy, "training_step", None)
        try:
            step(batch, 0) if step is not None else copy(batch)
        except _Captured as found:
            return found.args_, found.kwargs
        except Exception:  # noqa: BLE001,S110 - as the profile: a step that cannot run here falls back to forward
            pass
        try:
            copy(*batch) if isinstance(batch, (tuple, list)) else copy(batch)
        except _Captured as found:
            return found.args_, found.kwargs
    finally:
        handle.remove()
    raise _NoCapture(f"the model's forward never called its block {name!r}")


def _real_block(module: nn.Module, name: str) -> nn.Module:
    """A CPU copy of the block: the module's own weights when it has them, else random ones."""
    block = dict(find_blocks(module))[name]
    tensors = [*block.parameters(), *block.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module_copy(block).train()
    real = module_copy(meta_copy(block)).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*real.parameters(), *real.buffers()]:
            _fill(tensor)
    return real.train()


def _fill(tensor: Tensor) -> Tensor:
    # Values only have to be ordinary numbers (no denormals, which are slow on CPU); masks all "keep".
    if tensor.is_floating_point():
        return tensor.normal_(0.0, 0.02)
    return tensor.fill_(1 if tensor.dtype == torch.bool else 0)


def _sliced(args: tuple[Any, ...], kwargs: dict[str, Any], samples: int, size: int) -> tuple[Any, Any]:
    """Real CPU tensors for the meta ``args``/``kwargs``, cut from ``samples`` to ``size`` along the batch dimension."""

    def real(t: Tensor) -> Tensor:
        shape = (size, *t.shape[1:]) if size and t.dim() and t.shape[0] == samples else t.shape
        out = _fill(torch.empty(shape, dtype=t.dtype))
        if t.is_floating_point():
            out = (out * 50).requires_grad_(t.requires_grad)  # unit scale, as activations are
        return out

    return tree_map_only(Tensor, real, args), tree_map_only(Tensor, real, kwargs)


def _run(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], backward: bool = True) -> None:
    block.zero_grad(set_to_none=True)  # as Lightning leaves a step: its gradients are new memory each time
    args, kwargs = fresh_caches(args), fresh_caches(kwargs)
    outputs = [t for t in tree_flatten(block(*args, **kwargs))[0] if isinstance(t, Tensor) and t.requires_grad]
    if backward:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _median_seconds(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], backward: bool = True) -> float:
    return _median(lambda: _run(block, args, kwargs, backward))


def _median(call: Callable[[], object]) -> float:
    """The median seconds of ``call`` after one warm-up call (first-call allocations, kernel selection)."""
    call()
    times: list[float] = []
    while len(times) < _MIN_RUNS or (sum(times) < _SECONDS_PER_SIZE and len(times) < _MAX_RUNS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _count_operations(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    with CallCounter() as calls:
        _run(block, args, kwargs)
    return calls.count


@contextmanager
def _threads(count: int) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)
