"""Tensor parallelism for modules parti has never seen: rules per block, verified before training.

Design (the "region" design of MODEL_PARALLEL.md). Each repeated block, and each large layer
outside the blocks that gets a rule, becomes a *region*: a forward pre-hook turns its tensor inputs
into replicated DTensors on the tensor mesh, its split layers hold ``Shard(0)``/``Shard(1)``
DTensor parameters and every other parameter and buffer a ``Replicate`` one, and a forward hook
returns plain, replicated tensors. Inside a region every intermediate is a DTensor with *global*
semantics, so user code such as ``view(B, T, self.n_head, C // self.n_head)`` or
``qkv.split(C, dim=2)`` computes the same function as on one device: where a layout does not
suit an op, DTensor redistributes (costing a collective, never a wrong value). Outside the regions
everything stays plain, so losses, ``self.log(sync_dist=True)`` and metrics need no change. A fused
q/k/v layer whose output the block splits is *packed*: each rank holds ``[q_r; k_r; v_r]`` (whole
heads; a strided shard, saved in the plain layout), and the split is cut locally, so every block runs
Megatron's two all-reduces forward and two backward.

Before a rule set is used it is verified: each distinct block (class and rules) runs on the input
it really received in one example step, with its rules and unsharded, forward and backward, on
every tensor rank; a set that errors or differs falls back to a correct subset of its layers (each
layer verified as it is added), and then to leaving the block untouched. The report says which.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_map

from parti_lightning.parallel.blocks import find_blocks
from parti_lightning.parallel.tensor_ops import register_cpu_attention_sharding
from parti_lightning.parallel.tensor_random import install_cpu_random_tracker, sync_tensor_random_state
from parti_lightning.parallel.tensor_region import shard_unit, standard_layout
from parti_lightning.parallel.tensor_rules import (
    COLWISE,
    REPLICATE,
    hf_tensor_rules,
    match_rules,
    packed_parts,
    rules_for_unit,
    split_dim,
    trace_block_rules,
    validate_tensor_rules,
)

__all__ = [
    "TensorParallelReport",
    "TensorLayerRow",
    "apply_tensor_parallel",
    "standard_layout",
    "sync_tensor_random_state",
    "tensor_parallel_step",
    "validate_tensor_rules",
]

# Largest elementwise difference accepted by the setup check, relative to the reference's largest
# magnitude. Splitting a matmul only reorders its sums (about 1e-7 relative in fp32); a wrong
# layout changes values at order one.
_VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# A tensor is compared against at least this fraction of the largest magnitude among all tensors of its kind
# (outputs, or gradients) in the check. A gradient that is zero in exact arithmetic (a key projection's bias:
# softmax ignores a shift shared by every key) is pure rounding noise of terms as large as the other
# gradients; measured against its own largest value it differs at order one under any change of summation
# order, and the check would refuse every correct split of that layer.
_SCALE_FLOOR = 1e-2
_REASON_CHARS = 200


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
    """

    degree: int
    source: str
    rows: list[TensorLayerRow] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)

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
    :mod:`parti_lightning.parallel.tensor_random`.

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
    if rules is not None:
        validate_tensor_rules(module, rules, degree)
        source, resolved = "explicit", match_rules(module, rules)
    else:
        hf_rules = hf_tensor_rules(module)
        source, resolved = ("hf_tp_plan", match_rules(module, hf_rules)) if hf_rules else ("auto", {})
    report = TensorParallelReport(degree=degree, source=source)
    if degree == 1:
        return report
    # Before `run_example`, whose draws (dropout in training mode) must be the same on every tensor rank too.
    sync_tensor_random_state(mesh)
    install_cpu_random_tracker(mesh)
    groups = _unit_groups(module, resolved, auto=source == "auto", blocks=blocks)
    samples = _capture_inputs([members[0][1] for members in groups.values()], run_example)
    tied = _tied_parameters(module)
    for key, members in groups.items():
        _apply_group(members, key[0] == "layer", resolved, source, samples, tied, mesh, report)
    return report


@contextlib.contextmanager
def tensor_parallel_step() -> Iterator[None]:
    """Enter around backward passes, ``optimizer.step()`` and gradient clipping when some parameters are DTensors.

    Foreach optimizer kernels and ``clip_grad_norm_`` run one op over many tensors and refuse a mix of
    DTensor and plain tensors; DTensor's implicit replication treats the plain ones as replicated on
    the tensor mesh, which they are. The norm ``clip_grad_norm_`` then computes is the global one: a
    split gradient's norm is reduced across the tensor ranks, a replicated one counted once.
    """
    # Why the flag itself rather than torch's `implicit_replication()`: that one resets the flag to False on
    # exit, which would end an enclosing implicit replication early.
    dispatcher = DTensor._op_dispatcher
    before = dispatcher._allow_implicit_replication
    dispatcher._allow_implicit_replication = True
    try:
        yield
    finally:
        dispatcher._allow_implicit_replication = before


# ------------------------------------------------------------------------------------ units and groups


def _unit_groups(
    module: nn.Module, resolved: Mapping[str, str], auto: bool, blocks: list[tuple[str, nn.Module]] | None = None
) -> dict[Any, list[tuple[str, nn.Module]]]:
    """Units to shard, grouped by what is verified once: same class and same rules (blocks), or alone."""
    blocks = find_blocks(module) if blocks is None else blocks
    groups: dict[Any, list[tuple[str, nn.Module]]] = {}
    for name, block in blocks:
        relative = rules_for_unit(name, block, resolved)
        if auto or any(style != REPLICATE for style in relative.values()):
            key = (type(block), tuple(sorted(relative.items())))
            groups.setdefault(key, []).append((name, block))
    block_names = [name for name, _ in blocks]
    modules = dict(module.named_modules())
    outside = [
        name
        for name, style in resolved.items()
        if style != REPLICATE and not any(name == b or name.startswith(f"{b}.") for b in block_names)
    ]
    if auto:
        outside = _large_outside_layers(module, blocks)
    for name in outside:
        groups[("layer", name)] = [(name, modules[name])]
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


def _capture_inputs(units: list[nn.Module], run_example: Callable[[], Any] | None) -> dict[int, tuple]:
    """The inputs each of ``units`` received in its first call during ``run_example``, by ``id(unit)``."""
    samples: dict[int, tuple] = {}
    if run_example is None:
        return samples

    def capture(unit: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(unit) not in samples:
            samples[id(unit)] = tree_map(_detached, (args, kwargs))

    handles = [unit.register_forward_pre_hook(capture, with_kwargs=True) for unit in units]
    try:
        with torch.no_grad():
            run_example()
    finally:
        for handle in handles:
            handle.remove()
    return samples


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _tied_parameters(module: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: value for key, value in names.items() if len(value) > 1}


# --------------------------------------------------------------------------- choose, verify, apply


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
    note = ""
    if source == "auto" and outside:
        proposal = {"": _auto_style(first)}
    elif source == "auto":
        proposal = trace_block_rules(first, *sample)[0] if sample is not None else {}
        note = "" if sample is not None else "no sample input to trace"
    else:
        proposal = rules_for_unit(first_name, first, resolved)
    proposal, refused = _drop_unsplittable(first_name, first, proposal, tied, mesh.size())
    label = f"{type(first).__name__} ({first_name}{', ...' if len(members) > 1 else ''})"
    for reason in refused:
        report.fallbacks.append((label, reason))
    chosen = proposal
    if proposal and sample is not None:
        chosen, reasons = _choose(first, proposal, sample, mesh)
        report.fallbacks.extend((label, reason) for reason in reasons)
    elif proposal:
        note = "not verified: no sample input"
    if not chosen:
        report.rows.append(TensorLayerRow(first_name, REPLICATE, source, note or "no split layer"))
        return
    for name, unit in members:
        shard_unit(unit, chosen, mesh)
        for relative, style in chosen.items():
            layer = f"{name}.{relative}" if relative else name
            report.rows.append(TensorLayerRow(layer, style, source, note))


def _drop_unsplittable(
    unit_name: str, unit: nn.Module, proposal: Mapping[str, str], tied: dict[int, list[str]], degree: int
) -> tuple[dict[str, str], list[str]]:
    """Keep the split rules that can apply: a splittable, untied layer whose split dimension ``degree`` divides."""
    modules = dict(unit.named_modules())
    kept: dict[str, str] = {}
    refused: list[str] = []
    for name, style in proposal.items():
        if style == REPLICATE:
            continue
        layer = modules[name]
        full = f"{unit_name}.{name}" if name else unit_name
        dim = split_dim(layer, style)
        if dim is None:
            refused.append(f"{full}: a {type(layer).__name__} cannot be split {style}")
        elif id(layer.weight) in tied:
            refused.append(f"{full}: weight tied with {', '.join(tied[id(layer.weight)])}; kept replicated")
        elif layer.weight.shape[dim] % (degree * (packed_parts(style) or 1)):
            parts = f" in {packed_parts(style)} packed parts" if packed_parts(style) else ""
            refused.append(f"{full}: size {layer.weight.shape[dim]}{parts} not divisible by tensor={degree}")
        else:
            kept[name] = style
    return kept, refused


def _choose(
    unit: nn.Module, proposal: dict[str, str], sample: tuple, mesh: DeviceMesh
) -> tuple[dict[str, str], list[str]]:
    """The proposal if it verifies, else the largest correct subset found layer by layer, else ``{}``."""
    failure = _verify(unit, proposal, sample, mesh)
    if failure is None:
        return proposal, []
    reasons = [f"rules {_short(proposal)} failed the setup check: {failure}"]
    unpacked = {name: COLWISE if packed_parts(style) else style for name, style in proposal.items()}
    if unpacked != proposal:
        # The slower correct layout of a packed layer: plain colwise, its output gathered where it is cut.
        failure = _verify(unit, unpacked, sample, mesh)
        if failure is None:
            return unpacked, reasons
        reasons.append(f"rules {_short(unpacked)} failed the setup check: {failure}")
        proposal = unpacked
    # Whether the block runs on DTensors at all, before trying its layers one by one.
    failure = _verify(unit, {}, sample, mesh)
    if failure is not None:
        return {}, [*reasons, f"left unsharded: the block does not run on DTensors: {failure}"]
    chosen: dict[str, str] = {}
    for name, style in proposal.items():
        candidate = {**chosen, name: style}
        failure = _verify(unit, candidate, sample, mesh)
        if failure is None:
            chosen = candidate
        else:
            reasons.append(f"{name or type(unit).__name__} kept replicated: {failure}")
    return chosen, reasons


def _verify(unit: nn.Module, rules: Mapping[str, str], sample: tuple, mesh: DeviceMesh) -> str | None:
    """Run ``unit`` sharded by ``rules`` and unsharded on ``sample``; ``None`` if they agree on every rank."""
    failure: str | None
    try:
        failure = _compare(unit, rules, sample, mesh)
    except Exception as error:  # any error means: not this layout (the next candidate is tried)
        failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    # Every tensor rank must take the same layout: one rank's failure fails it for all.
    flag = torch.tensor([0 if failure is None else 1], device=_mesh_device(mesh))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group())
    if failure is None and flag.item():
        failure = "failed the setup check on another tensor rank"
    return None if failure is None else failure[:_REASON_CHARS]


def _compare(unit: nn.Module, rules: Mapping[str, str], sample: tuple, mesh: DeviceMesh) -> str | None:
    reference = copy.deepcopy(unit).eval()
    sharded = copy.deepcopy(unit).eval()
    shard_unit(sharded, rules, mesh)
    results = []
    for model in (reference, sharded):
        args, kwargs = tree_map(_fresh_input, sample)
        with torch.enable_grad():
            output = model(*args, **kwargs)
            outputs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
            differentiable = [t for t in outputs if t.requires_grad]
            if differentiable:
                generator = torch.Generator().manual_seed(0)
                cotangents = [
                    torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in differentiable
                ]
                with tensor_parallel_step():  # as the strategy runs backward passes (see Parallelized.step_context)
                    torch.autograd.backward(differentiable, cotangents)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = [t.grad for t in inputs] + [p.grad for _, p in sorted(model.named_parameters())]
        results.append(([t.detach() for t in outputs], grads))
    for what, expected, actual in (
        ("output", results[0][0], results[1][0]),
        ("gradient", results[0][1], results[1][1]),
    ):
        if len(expected) != len(actual):
            return f"{what}s differ in number: {len(actual)} instead of {len(expected)}"
        floor = _SCALE_FLOOR * max((_largest(t) for t in expected if t is not None), default=0.0)
        for ref, got in zip(expected, actual, strict=True):
            difference = _difference(ref, got, floor)
            if difference is not None:
                return f"{what} differs from the unsharded block: {difference}"
    return None


def _fresh_input(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().clone()
    return value.requires_grad_(True) if value.is_floating_point() else value


def _largest(tensor: torch.Tensor) -> float:
    return tensor.abs().max().item() if tensor.numel() else 0.0


def _difference(expected: torch.Tensor | None, actual: torch.Tensor | None, floor: float = 0.0) -> str | None:
    if expected is None or actual is None:
        return None if expected is None and actual is None else "a gradient is missing on one side"
    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    if expected.shape != actual.shape:
        return f"shape {tuple(actual.shape)} instead of {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (expected - actual).abs().max().item() if expected.numel() else 0.0
    tolerance = _VERIFY_RTOL.get(expected.dtype, 1e-4) * max(scale, floor, 1e-6)
    return None if error <= tolerance else f"max difference {error:.3g} (largest value {scale:.3g})"


def _short(rules: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{name or '<unit>'}: {style}" for name, style in rules.items()) + "}"


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    return (
        torch.device("cpu")
        if mesh.device_type == "cpu"
        else torch.device(mesh.device_type, torch.accelerator.current_device_index())
    )
