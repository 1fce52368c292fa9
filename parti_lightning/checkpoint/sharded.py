"""Plan-independent checkpoints: sharded on disk through ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a directory. DCP holds every tensor, keyed by the module's own names:
``model.<param>`` and ``optim.<i>.<param>.<state key>`` (``<i>``: the optimizer's position). Each
rank writes the shards it holds (FSDP's local shards, ZeRO-1's own parameters' optimizer state); a
replicated tensor is written once. ``meta.pt`` (rank 0, plain ``torch.save``) holds everything else:
Lightning's loops, callbacks, schedulers and hyper-parameters, the optimizers' parameter groups by
name, non-tensor state, each rank's RNG states, and the plan and world size that wrote it.

Loading reads into tensors laid out as the *current* plan holds them, and DCP reshards on the fly, so a
checkpoint written under one plan and world size loads under any other. Nothing here imports
Lightning; the strategy adapts these functions to Lightning's hooks (:mod:`parti_lightning.checkpoint.hooks`).

Loading never unpickles code (see :mod:`parti_lightning.checkpoint.safe_load`), and a save replaces an
existing checkpoint only once it is whole (:mod:`parti_lightning.checkpoint.files`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from parti_lightning.checkpoint.files import publish, remove, sibling, write_synced
from parti_lightning.checkpoint.pending import PendingSave
from parti_lightning.checkpoint.safe_load import SafeFileSystemReader, checkpoint_index
from parti_lightning.parallel.names import parameter_names
from parti_lightning.parallel.tensor.region import standard_layout

META_FILE = "meta.pt"
FORMAT = "parti-sharded/1"
MODEL = "model"
OPTIM = "optim"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked, with the reason."""


# ------------------------------------------------------------------------------------ recognizing


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete sharded checkpoint directory (DCP index and parti's metadata)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (tensors and plain containers only)."""
    meta = torch.load(Path(path) / META_FILE, map_location="cpu", weights_only=True)
    if not isinstance(meta, dict) or meta.get("parti", {}).get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a parti sharded checkpoint (format {FORMAT}).")
    return meta


# ------------------------------------------------------------------------------ named state dicts


def sharded_model_state(module: nn.Module) -> dict[str, Any]:
    """The module's state as this rank holds it: FSDP's local shards (``DTensor``) or whole tensors. No copy."""
    return get_model_state_dict(module)


def local_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that holds this rank's state: ZeRO-1's inner one, else ``optimizer`` itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def sharded_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer's state as this rank holds it, keyed by parameter name. No copy, no collective.

    ``{"state": {name: {key: value}}, "param_groups": [{..., "params": [name, ...]}]}``: the groups
    list every parameter (ZeRO-1: from the outer optimizer), the state only what this rank holds.
    Built by hand rather than with DCP's ``get_optimizer_state_dict``, which would first create the
    state of a fresh optimizer with a zero-lr step and so change the training that follows.
    """
    names = parameter_names(module)
    try:
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [names[p] for p in group["params"]]}
            for group in optimizer.param_groups
        ]
    except KeyError as err:
        raise ValueError(f"an optimizer parameter is not a parameter of {type(module).__name__}") from err
    local = local_optimizer(optimizer)
    held = [param for group in local.param_groups for param in group["params"] if local.state.get(param)]
    # A tensor-parallel parameter packed by heads keeps its moments in a layout DCP cannot save: they go
    # as plain shards of the same global tensors (a collective over the tensor ranks, which all save).
    state = {names[param]: {k: standard_layout(v) for k, v in local.state[param].items()} for param in held}
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------- saving


def save_sharded(
    path: str | os.PathLike,
    checkpoint: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    rng: bool = True,
    background: bool = False,
    group: dist.ProcessGroup | None = None,
) -> PendingSave | None:
    """Write a sharded checkpoint to ``path`` atomically. Collective: every rank calls it with the same path.

    Args:
        path: the checkpoint directory to create (replaced if it exists).
        checkpoint: Lightning's checkpoint dict, whose ``"state_dict"`` comes from
            :func:`sharded_model_state` and ``"optimizer_states"`` from :func:`sharded_optimizer_state`.
            The rest is taken from global rank 0.
        meta: what to record about the run (plan, world size), under ``meta["parti"]``.
        rng: record each rank's RNG states (off when converting a file, whose writer's RNG is unknown).
        background: copy the state to host memory, write it in a thread, and return the :class:`PendingSave`
            to wait on (``False``: write it now, and return ``None``).
        group: the process group of the background writer's collectives: one that training does not use at
            the same time (the two would interleave on one group). ``None`` in a single process.

    The checkpoint is written beside ``path`` under a hidden name and renamed to ``path`` only once
    every rank has written its part: a save that is interrupted leaves an existing ``path`` as it was.
    """
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    tensors, small = _split(checkpoint)
    small["rng"] = _rng_state() if rng else None
    gathered = _gather_to_rank0(small)
    staging = sibling(path, "partial")
    if rank == 0:
        remove(staging)  # left by a save that was interrupted
        staging.mkdir(parents=True)
    _barrier()

    def publish_on_rank0() -> None:
        assert gathered is not None
        meta_out = {
            **rest,
            "parti": {
                **meta.get("parti", {}),
                "format": FORMAT,
                "world_size": len(gathered),
                "rng": [g["rng"] for g in gathered] if rng else [],
                "optimizers": _merge_optimizer_metadata(gathered, len(checkpoint.get("optimizer_states", []))),
                "model_extra": {k: v for g in gathered for k, v in g["model_extra"].items()},
            },
        }
        write_synced(staging / META_FILE, meta_out)
        publish(staging, path)

    no_dist = not dist.is_initialized()
    if background:
        with single_process_is_intended():
            future = dcp.async_save(tensors, storage_writer=FileSystemWriter(staging), no_dist=no_dist,
                                    process_group=group)
        return PendingSave(path, future, staging, publish_on_rank0 if rank == 0 else None)
    with single_process_is_intended():
        dcp.save(tensors, storage_writer=FileSystemWriter(staging), no_dist=no_dist)
    if rank == 0:
        publish_on_rank0()
    _barrier()
    return None


def _split(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's part (tensors) and the small rest (non-tensor state, parameter groups) of this rank's state."""
    model = checkpoint.get("state_dict", {})
    tensors: dict[str, Any] = {MODEL: {k: v for k, v in model.items() if isinstance(v, Tensor)}}
    small: dict[str, Any] = {"model_extra": {k: v for k, v in model.items() if not isinstance(v, Tensor)}}
    optim_tensors, optim_small = {}, []
    for index, state in enumerate(checkpoint.get("optimizer_states", [])):
        optim_tensors[str(index)] = {
            name: {k: v for k, v in values.items() if isinstance(v, Tensor)} for name, values in state["state"].items()
        }
        optim_small.append({
            "param_groups": state["param_groups"],
            "state": {
                name: {k: v for k, v in values.items() if not isinstance(v, Tensor)}
                for name, values in state["state"].items()
            },
            "has_state": sorted(state["state"]),
        })
    if optim_tensors:
        tensors[OPTIM] = optim_tensors
    small["optimizers"] = optim_small
    return tensors, small


def _merge_optimizer_metadata(gathered: Sequence[Mapping[str, Any]], count: int) -> list[dict[str, Any]]:
    # Each rank lists the parameters its optimizer holds: all of them where every rank holds the whole
    # model (ZeRO-1's outer groups included), its own part where a rank holds only part of it. State
    # entries are each rank's own or the same everywhere. So the union is the whole, in both cases.
    merged = []
    for index in range(count):
        entries = [g["optimizers"][index] for g in gathered]
        state: dict[str, dict[str, Any]] = {}
        has_state: set[str] = set()
        for entry in entries:
            has_state.update(entry["has_state"])
            for name, values in entry["state"].items():
                state.setdefault(name, {}).update(values)
        groups = [dict(group) for group in entries[0]["param_groups"]]
        for entry in entries[1:]:
            for group, other in zip(groups, entry["param_groups"], strict=True):
                group["params"] = list(dict.fromkeys([*group["params"], *other["params"]]))
        merged.append({"param_groups": groups, "state": state, "has_state": sorted(has_state)})
    return merged


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": (version, list(state), gauss),
        # As a tensor: a numpy array is not among the types a weights-only load accepts.
        "numpy": (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set this process's torch, CUDA, numpy and Python RNGs to ``state`` (one rank's entry of ``meta``)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch.cuda"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


@contextlib.contextmanager
def single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it "assumes the intent" of a single process: without a process group, it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        yield


def gathered_rng_states() -> list[dict[str, Any]] | None:
    """Every rank's RNG states, in rank order, on global rank 0 (``None`` elsewhere). Collective."""
    return _gather_to_rank0(_rng_state())


def _gather_to_rank0(obj: Any) -> list[Any] | None:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -------------------------------------------------------------------------------------- loading


def load_sharded(
    path: str | os.PathLike,
    module: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a sharded checkpoint into ``module`` and ``optimizers`` as they are partitioned now. Collective.

    Each rank reads only what it holds under the current plan (its shards, or whole tensors where the
    plan replicates), whatever plan and world size wrote the checkpoint.

    Args:
        path: the checkpoint directory.
        module: the model, already sharded (or not) by the current plan.
        optimizers: the optimizers, built from the current plan's parameters, in the order they were
            saved; empty to load the weights only.
        strict: every parameter and buffer of ``module`` must be in the checkpoint and vice versa.

    Returns:
        the checkpoint's non-tensor part (:func:`read_meta`), without the optimizer details.
    """
    meta = read_meta(path)
    index = checkpoint_index(path)
    saved_optimizers = meta["parti"].get("optimizers", [])
    if optimizers and len(saved_optimizers) != len(optimizers):
        raise CheckpointError(
            f"{path} holds the state of {len(saved_optimizers)} optimizer(s) but {len(optimizers)} are configured:"
            " configure_optimizers must return the same optimizers to resume."
        )
    model_target = {k: v for k, v in sharded_model_state(module).items() if isinstance(v, Tensor)}
    saved_model = {k[len(MODEL) + 1 :] for k in index if k.startswith(f"{MODEL}.")}
    # A rank may hold part of the module (a pipeline stage): the ranks together must hold all of it.
    _check_model_keys(path, _union_over_ranks(set(model_target)), saved_model, strict)
    model_target = {k: v for k, v in model_target.items() if f"{MODEL}.{k}" in index}
    targets: dict[str, Any] = {MODEL: model_target}
    optim_targets = {str(i): _optimizer_target(module, opt, i, index) for i, opt in enumerate(optimizers)}
    if optim_targets:
        targets[OPTIM] = optim_targets
    with single_process_is_intended():
        dcp.load(targets, storage_reader=SafeFileSystemReader(path), no_dist=not dist.is_initialized())
    extras = meta["parti"].get("model_extra", {})
    set_model_state_dict(module, {**model_target, **extras}, options=StateDictOptions(strict=False))
    for i, optimizer in enumerate(optimizers):
        _load_optimizer(module, optimizer, optim_targets[str(i)], saved_optimizers[i])
    return meta


def _union_over_ranks(names: set[str]) -> set[str]:
    if not dist.is_initialized():
        return names
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(names))
    return {name for part in gathered for name in part}


def _check_model_keys(path: Any, expected: set[str], saved: set[str], strict: bool) -> None:
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not match the module: missing {missing[:5]}{' ...' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} (strict loading;"
            " set `LightningModule.strict_loading = False` to load the common part)."
        )


def optimizer_entries(entries: Mapping[str, Any], index: int) -> dict[str, dict[str, Any]]:
    """The ``optim.<index>.<param>.<key>`` entries of a flat DCP mapping, as ``{param: {key: entry}}``.

    Parameter names contain dots, optimizer state keys (``exp_avg``, ``step``) do not.
    """
    prefix = f"{OPTIM}.{index}."
    out: dict[str, dict[str, Any]] = {}
    for key, entry in entries.items():
        if key.startswith(prefix):
            name, state_key = key[len(prefix) :].rsplit(".", 1)
            out.setdefault(name, {})[state_key] = entry
    return out


def _optimizer_target(
    module: nn.Module, optimizer: Optimizer, index: int, saved: Mapping[str, TensorStorageMetadata]
) -> dict[str, dict[str, Tensor]]:
    """Empty tensors for the saved state of the parameters this rank's optimizer holds, laid out as it would.

    A state tensor shaped like its parameter (Adam's moments) is laid out like the parameter now is
    (an FSDP shard, or whole); anything else (step counters) is read whole.
    """
    names = parameter_names(module)
    entries = optimizer_entries(saved, index)
    local = local_optimizer(optimizer)
    target: dict[str, dict[str, Tensor]] = {}
    for group in local.param_groups:
        for param in group["params"]:
            name = names[param]
            for key, entry in entries.get(name, {}).items():
                dtype, shape = entry.properties.dtype, tuple(entry.size)
                like_param = shape == tuple(param.shape)
                tensor = (
                    standard_layout(torch.empty_like(param, dtype=dtype)) if like_param
                    else torch.empty(shape, dtype=dtype)
                )
                target.setdefault(name, {})[key] = tensor
    return target


def _load_optimizer(
    module: nn.Module, optimizer: Optimizer, loaded: Mapping[str, Mapping[str, Tensor]], saved: Mapping[str, Any]
) -> None:
    """Load name-keyed state into ``optimizer`` (its local part under ZeRO-1) through its own ``load_state_dict``."""
    names = parameter_names(module)
    saved_groups = saved["param_groups"]
    group_of = {name: i for i, group in enumerate(saved_groups) for name in group["params"]}
    _check_groups(optimizer, names, saved_groups)
    # The outer groups carry the hyper-parameters (a scheduler's lr): ZeRO-1 copies them to its inner
    # optimizer at every step.
    for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update(_hyper(saved_group))
    local = local_optimizer(optimizer)
    ordered = [names[p] for group in local.param_groups for p in group["params"]]
    has_state = set(saved["has_state"])
    params = {names[p]: p for group in local.param_groups for p in group["params"]}
    state = {
        position: {**_in_parameter_layout(loaded.get(name, {}), params[name]), **saved["state"].get(name, {})}
        for position, name in enumerate(ordered)
        if name in has_state
    }
    groups, position = [], 0
    for group in local.param_groups:
        count = len(group["params"])
        first = names[group["params"][0]] if count else None
        hyper = _hyper(saved_groups[group_of[first]]) if first is not None else {}
        groups.append({**_hyper(group), **hyper, "params": list(range(position, position + count))})
        position += count
    local.load_state_dict({"state": state, "param_groups": groups})


def _in_parameter_layout(state: Mapping[str, Tensor], param: Tensor) -> dict[str, Tensor]:
    """Loaded moments back in their parameter's layout where it is one DCP does not save (packed by heads)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, DTensor) and isinstance(param, DTensor) and value.placements != param.placements:
            like = torch.empty_like(param, dtype=value.dtype)
            like.copy_(value)  # DTensor redistributes into the packed layout
            value = like
        out[key] = value
    return out


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _check_groups(optimizer: Optimizer, names: Mapping[Any, str], saved_groups: Sequence[Mapping[str, Any]]) -> None:
    # A rank may hold part of the module (a pipeline stage): the ranks' groups together must be the saved ones.
    current = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
    if dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, current)
        current = [list(dict.fromkeys(n for part in parts for n in part)) for parts in zip(*gathered, strict=True)]
    if [sorted(g) for g in current] != [sorted(g["params"]) for g in saved_groups]:
        raise CheckpointError(
            f"the optimizer's parameter groups ({[len(g) for g in current]} parameters) differ from the"
            f" checkpoint's ({[len(g['params']) for g in saved_groups]}): configure_optimizers must build the same"
            " groups over the same parameters to resume."
        )


# ------------------------------------------------------------------------------- which kind to write


def checkpoint_kind(requested: str, plan: Any) -> str:
    """What ``state_dict_type=requested`` writes under ``plan`` (a resolved ``PartitionPlan``): "sharded" or "full".

    ``"auto"`` writes one plain Lightning file where a single rank holds the whole model anyway (replicated,
    ZeRO-1: gathering costs at most the optimizer state, once, on rank 0), so every tool that reads Lightning
    checkpoints reads it; and a directory where gathering would cost memory no rank may have (sharded
    parameters: ZeRO-2/3, hybrid; tensor or pipeline parallel).
    """
    if requested != "auto":
        return requested
    sharded_parameters = plan.storage in ("gradients", "parameters") and plan.shard > 1
    return "sharded" if sharded_parameters or plan.tensor > 1 or plan.pipeline > 1 else "full"
