"""``apply_tensor_parallel``: which units to split, by which rules, and the report of what was done.

Units are the repeated blocks and, with rules for them, large layers outside the blocks. Rules come from the
user, a Hugging Face model's ``tp_plan`` or a trace of the block (:mod:`.rules`); each distinct unit's rules
pass the setup check (:mod:`.verify`) on the input the unit really received, then every unit of its kind
becomes a region (:mod:`.region`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._pytree import tree_map

from parti_lightning.parallel.blocks import find_blocks
from parti_lightning.parallel.scratch import CacheTemplates, fresh_caches
from parti_lightning.parallel.tensor.ops import register_cpu_attention_sharding
from parti_lightning.parallel.tensor.random import install_cpu_random_tracker, sync_tensor_random_state
from parti_lightning.parallel.tensor.region import implicit_replication, shard_unit
from parti_lightning.parallel.tensor.rules import (
    REPLICATE,
    hf_tensor_rules,
    match_rules,
    resolve_rules,
    rules_for_unit,
    split_target,
    trace_block_rules,
    validate_tensor_rules,
)
from parti_lightning.parallel.tensor.verify import choose, drop_unsplittable, error_line

__all__ = ["TensorLayerRow", "TensorParallelReport", "apply_tensor_parallel", "tensor_parallel_step"]


@dataclass(frozen=True)
class TensorLayerRow:
    """One row of the plan table: a layer (or a whole unit) and the layout it got."""

    name: str
    layout: str
    source: str
    note: str = ""


@dataclass
class TensorParallelReport:
    """What :func:`apply_tensor_parallel` did: per layer the layout, per unit any fall-back and why.

    Attributes:
        degree: size of the tensor axis.
        source: where the rules came from: ``"explicit"``, ``"hf_tp_plan"`` or ``"auto"``.
        rows: split layers, and units left replicated with the reason.
        fallbacks: ``(unit, reason)`` for each distinct unit whose rules did not pass the setup check.
        notes: what was skipped without changing any layout (a model's own rule that matches nothing here).
    """

    degree: int
    source: str
    rows: list[TensorLayerRow] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def layout_of(self, name: str) -> str:
        """The layout of layer ``name`` (``"replicate"`` when it got no split)."""
        return next((row.layout for row in self.rows if row.name == name), REPLICATE)

    def describe(self) -> str:
        """The plan table as text, one line per split layer or replicated unit."""
        lines = [f"tensor parallel: degree {self.degree}, rules from {self.source}"]
        width = max((len(row.name) for row in self.rows), default=10)
        layout_width = max((len(row.layout) for row in self.rows), default=9)
        for row in self.rows:
            note = f"  ({row.note})" if row.note else ""
            lines.append(f"  {row.name:<{width}}  {row.layout:<{layout_width}}  {row.source}{note}")
        lines.extend(f"  fell back: {unit}: {reason}" for unit, reason in self.fallbacks)
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def apply_tensor_parallel(
    module: nn.Module,
    mesh: DeviceMesh,
    rules: Mapping[str, str] | None = None,
    run_example: Callable[[], Any] | None = None,
    blocks: list[tuple[str, nn.Module]] | None = None,
) -> TensorParallelReport:
    """Split ``module``'s layers across the tensor ranks of ``mesh``, in place.

    Every rank of ``mesh`` must hold the same weights and, in ``run_example``, see the same batch. The
    ranks of ``mesh`` are given one shared random stream (the first rank's state) so that dropout keeps
    replicated activations equal across them; what that matches of a single process is stated in
    :mod:`parti_lightning.parallel.tensor.random`.

    Args:
        module: the model, on its compute device, not yet wrapped by any other parallelism.
        mesh: a 1-D mesh over the ranks of one tensor group.
        rules: ``fnmatch`` pattern over ``named_modules()`` names -> ``"colwise" | "rowwise" | "replicate"``.
            ``None``: a Hugging Face model's own ``tp_plan`` if one is inside ``module``, else rules traced
            from each block.
        run_example: runs ``module`` once on a real sample (no gradients needed). Its block inputs are
            captured to trace automatic rules and to verify every rule set. Without it, explicit and
            Hugging Face rules are applied unverified (said in the report) and automatic rules are none.
        blocks: the repeated blocks to split (named as in ``module``); ``None`` finds them. A pipeline stage
            passes the blocks it holds: once the other stages' blocks are freed, the structure ``find_blocks``
            reads is no longer the model's.

    Returns:
        The report: each split layer's layout, each fall-back and its reason.

    Raises:
        ValueError: ``mesh`` is not 1-D, or explicit ``rules`` fail :func:`validate_tensor_rules`.
    """
    if mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs the 1-D tensor mesh, got a {mesh.ndim}-D mesh.")
    register_cpu_attention_sharding()
    degree = mesh.size()
    unmatched: list[str] = []
    if rules is not None:
        validate_tensor_rules(module, rules, degree)
        source, resolved = "explicit", match_rules(module, rules)
    elif hf_rules := hf_tensor_rules(module):
        # A model's own plan may name layers its configuration leaves out: skipped, and said in the report.
        source, (resolved, unmatched) = "hf_tp_plan", resolve_rules(module, hf_rules)
    else:
        source, resolved = "auto", {}
    report = TensorParallelReport(degree=degree, source=source)
    report.notes.extend(f"tp_plan rule {pattern!r} matches no layer or parameter: skipped" for pattern in unmatched)
    if degree == 1:
        return report
    # Before `run_example`, whose draws (dropout in training mode) must be the same on every tensor rank too.
    sync_tensor_random_state(mesh)
    install_cpu_random_tracker(mesh)
    blocks = find_blocks(module) if blocks is None else blocks
    groups = _unit_groups(module, resolved, auto=source == "auto", blocks=blocks)
    samples = _capture_inputs([members[0][1] for members in groups.values()], run_example, blocks)
    tied = _tied_parameters(module)
    for key, members in groups.items():
        _apply_group(members, key[0] == "layer", resolved, source, samples, tied, mesh, report)
    return report



def tensor_parallel_step() -> AbstractContextManager[None]:
    """Enter around backward passes, ``optimizer.step()`` and gradient clipping when some parameters are DTensors.

    Foreach optimizer kernels and ``clip_grad_norm_`` run one op over many tensors and refuse a mix of
    DTensor and plain tensors; DTensor's implicit replication treats the plain ones as replicated on
    the tensor mesh, which they are. The norm ``clip_grad_norm_`` then computes is the global one: a
    split gradient's norm is reduced across the tensor ranks, a replicated one counted once.
    """
    return implicit_replication()


# ------------------------------------------------------------------------------------ units and groups


def _unit_groups(
    module: nn.Module, resolved: Mapping[str, str], auto: bool, blocks: list[tuple[str, nn.Module]]
) -> dict[Any, list[tuple[str, nn.Module]]]:
    """Units to shard, grouped by what is verified once: same class and same rules (blocks), or alone."""
    groups: dict[Any, list[tuple[str, nn.Module]]] = {}
    for name, block in blocks:
        relative = rules_for_unit(name, block, resolved)
        if auto or any(style != REPLICATE for style in relative.values()):
            # The layout is chosen once per group, so its members must have the same layers: T5's encoder and
            # decoder blocks are one class with different children (a cross-attention in the decoder's).
            structure = tuple((sub, type(layer).__name__) for sub, layer in block.named_modules())
            key = (type(block), structure, tuple(sorted(relative.items())))
            groups.setdefault(key, []).append((name, block))
    block_names = [name for name, _ in blocks]
    outside = [
        name
        for name, style in resolved.items()
        if style != REPLICATE and not any(name == b or name.startswith(f"{b}.") for b in block_names)
    ]
    if auto:
        outside = _large_outside_layers(module, blocks)
    modules = dict(module.named_modules())
    for name in outside:
        layer_name, layer, _ = split_target(module, name, modules)  # a parameter's rule splits it inside its layer
        if any(True for _ in layer.parameters()):  # none: a layer of another pipeline stage's block, freed here
            groups[("layer", layer_name)] = [(layer_name, layer)]
    return groups


def _large_outside_layers(module: nn.Module, blocks: list[tuple[str, nn.Module]]) -> list[str]:
    """Embeddings and linear layers outside the blocks at least as large as one block: worth splitting."""
    if not blocks:
        return []
    block_size = sum(p.numel() for p in blocks[0][1].parameters())
    inside = {id(m) for _, block in blocks for m in block.modules()}
    return [
        name
        for name, layer in module.named_modules()
        if name
        and id(layer) not in inside
        and isinstance(layer, (nn.Embedding, nn.Linear))
        and layer.weight is not None  # None: a layer of another pipeline stage's block, freed here
        and layer.weight.numel() >= block_size
    ]


def _auto_style(layer: nn.Module) -> str:
    # A vocabulary-split embedding and a colwise head both split the vocabulary, the large dimension.
    return "rowwise" if isinstance(layer, nn.Embedding) else "colwise"


def _capture_inputs(
    units: list[nn.Module], run_example: Callable[[], Any] | None, blocks: list[tuple[str, nn.Module]]
) -> dict[int, tuple]:
    """The inputs each of ``units`` received in its first call during ``run_example``, by ``id(unit)``.

    A cache the blocks were handed empty stands in a sample as a :class:`ScratchCache`: each run of the
    sample (trace, setup check) gets its own empty one, as the block got in the example.
    """
    samples: dict[int, tuple] = {}
    if run_example is None:
        return samples
    caches = CacheTemplates()

    def see(_: nn.Module, args: tuple, kwargs: dict) -> None:
        caches.see(args, kwargs)

    def capture(unit: nn.Module, args: tuple, kwargs: dict) -> None:
        caches.see(args, kwargs)
        if id(unit) not in samples:
            samples[id(unit)] = caches.scratch(tree_map(_detached, (args, kwargs)))

    handles = [block.register_forward_pre_hook(see, with_kwargs=True) for _, block in blocks]
    handles += [unit.register_forward_pre_hook(capture, with_kwargs=True) for unit in units]
    try:
        with torch.no_grad():
            run_example()
    finally:
        for handle in handles:
            handle.remove()
    return samples


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _traced_beyond(block: nn.Module, sample: tuple, rules: Mapping[str, str]) -> dict[str, str]:
    """Traced rules for the block's layers that ``rules`` (a model's own plan) does not cover."""
    try:
        traced = trace_block_rules(block, *fresh_caches(sample))[0]
    except Exception:  # noqa: BLE001 - the model's own rules stand alone when the trace cannot run
        return {}

    def covered(name: str) -> bool:
        return any(name == r or name.startswith(f"{r}.") or r.startswith(f"{name}.") for r in rules)

    return {name: style for name, style in traced.items() if not covered(name)}


# A child holding at least this share of a block's parameters and split by no rule is named in the report.
_SIZEABLE = 0.1


def _kept_whole(block: nn.Module, chosen: Mapping[str, str]) -> list[str]:
    """The block's sizeable children that no chosen rule splits, each with its layer types: what stays whole."""
    total = sum(p.numel() for p in block.parameters())
    reasons = []
    for name, child in block.named_children():
        size = sum(p.numel() for p in child.parameters())
        if not total or size < _SIZEABLE * total or any(r == name or r.startswith(f"{name}.") for r in chosen):
            continue
        kinds = sorted({type(m).__name__ for m in child.modules() if any(True for _ in m.parameters(recurse=False))})
        reasons.append(
            f"{name} kept whole ({size / total:.0%} of the block's parameters; {', '.join(kinds)}): no rule splits"
            " it (rules split nn.Linear, nn.Embedding, Conv1D, nn.MultiheadAttention and stacked expert weights)"
        )
    return reasons


def _tied_parameters(module: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: value for key, value in names.items() if len(value) > 1}


# ------------------------------------------------------------------------------------------- apply


def _apply_group(
    members: list[tuple[str, nn.Module]],
    outside: bool,
    resolved: Mapping[str, str],
    source: str,
    samples: dict[int, tuple],
    tied: dict[int, list[str]],
    mesh: DeviceMesh,
    report: TensorParallelReport,
) -> None:
    first_name, first = members[0]
    sample = samples.get(id(first))
    label = f"{type(first).__name__} ({first_name}{', ...' if len(members) > 1 else ''})"
    note = ""
    if source == "auto" and outside:
        proposal = {"": _auto_style(first)}
    elif source == "auto" and sample is not None:
        try:
            proposal = trace_block_rules(first, *fresh_caches(sample))[0]
        except Exception as error:  # a block the trace cannot run is left whole, with the reason: never a crash
            proposal = {}
            report.fallbacks.append((label, f"left unsharded: the trace of the block failed: {error_line(error)}"))
    elif source == "auto":
        proposal, note = {}, "no sample input to trace"
    else:
        proposal = rules_for_unit(first_name, first, resolved)
        if source == "hf_tp_plan" and not outside and sample is not None:
            # A model's plan may leave layers out (Qwen2-MoE's shared expert): the trace proposes rules for those.
            proposal = {**_traced_beyond(first, sample, proposal), **proposal}
    proposal, refused = drop_unsplittable(first_name, first, proposal, tied, mesh.size())
    for reason in refused:
        report.fallbacks.append((label, reason))
    chosen = proposal
    if proposal and sample is not None:
        chosen, reasons = choose(first, proposal, sample, mesh)
        report.fallbacks.extend((label, reason) for reason in reasons)
    elif proposal:
        note = "not verified: no sample input"
    if not outside:
        report.fallbacks.extend((label, reason) for reason in _kept_whole(first, chosen))
    if not chosen:
        report.rows.append(TensorLayerRow(first_name, REPLICATE, source, note or "no split layer"))
        return
    for name, unit in members:
        shard_unit(unit, chosen, mesh)
        for relative, style in chosen.items():
            layer = f"{name}.{relative}" if relative else name
            report.rows.append(TensorLayerRow(layer, style, source, note))
