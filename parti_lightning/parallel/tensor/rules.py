"""Where tensor-parallel rules come from, and what each rule does to a layer's parameters.

A rule names a layout for one layer: ``colwise`` splits its output features across the tensor
ranks, ``rowwise`` its input features, ``replicate`` keeps it whole. A rule may also name a parameter
rather than a layer: mixture-of-experts models keep their experts as stacked matrices, one parameter of
shape ``[experts, out, in]`` (Hugging Face's fused ``gate_up_proj`` / ``down_proj``), which a rule splits along
the same feature dimensions, every expert alike. Rules come, in this order,
from the user (patterns over ``named_modules()`` names), from a Hugging Face model's own
``tp_plan``, or from a trace of one block (:func:`trace_block_rules`). Everything here is pure
module-tree logic except the trace, which runs one block once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.overrides import TorchFunctionMode

from parti_lightning.parallel.copies import module_copy
from parti_lightning.parallel.tensor.ops import equal_parts

COLWISE, ROWWISE, REPLICATE = "colwise", "rowwise", "replicate"
STYLES = (COLWISE, ROWWISE, REPLICATE)
# A colwise layer whose output packs ``k`` tensors side by side (a fused q/k/v: ``k = 3``), which the block's
# code splits into ``k`` equal parts: each rank holds its share of every part. Found by the trace only.
_PACKED = "packed_colwise:"


def packed_colwise(parts: int) -> str:
    """The rule for a colwise layer whose output packs ``parts`` equal tensors (a fused q/k/v: 3)."""
    return f"{_PACKED}{parts}"


def packed_parts(style: str) -> int | None:
    """How many tensors a :func:`packed_colwise` rule's layer packs; ``None`` for any other rule."""
    return int(style[len(_PACKED) :]) if style.startswith(_PACKED) else None

# Hugging Face `tp_plan` values (transformers 5) by the layout they give the weight. Under parti's
# region design every layer keeps global (DTensor) semantics, so "gather the output", "local" and
# "packed" variants all reduce to where the weight is split; values not listed stay replicated.
_HF_STYLES = {
    "colwise": COLWISE,
    "colwise_gather_output": COLWISE,
    "local_colwise": COLWISE,
    # Gate and up projections side by side (Hugging Face's fused MLP and experts): packed in 2 parts.
    "packed_colwise": f"{_PACKED}2",
    "rowwise": ROWWISE,
    "rowwise_split_input": ROWWISE,
    "local_rowwise": ROWWISE,
    "local_packed_rowwise": ROWWISE,
    "embedding_rowwise": ROWWISE,
}


@dataclass(frozen=True)
class _Kind:
    """How a layer type stores its matrix: the weight dimension that holds output / input features."""

    name: str
    out_dim: int
    in_dim: int
    has_bias_per_output: bool


_LINEAR = _Kind("Linear", out_dim=0, in_dim=1, has_bias_per_output=True)
# Hugging Face's GPT-2 `Conv1D`: a linear layer with its weight stored transposed, (in, out).
_CONV1D = _Kind("Conv1D", out_dim=1, in_dim=0, has_bias_per_output=True)
# An embedding's "output features" are its embedding dimension, its "input features" the vocabulary.
_EMBEDDING = _Kind("Embedding", out_dim=1, in_dim=0, has_bias_per_output=False)


def layer_kind(module: nn.Module) -> _Kind | None:
    """The matrix layout of ``module`` when a tensor-parallel split applies to it, else ``None``."""
    if isinstance(module, nn.Linear):
        return _LINEAR
    if isinstance(module, nn.Embedding):
        return _EMBEDDING
    # Duck-typed so that transformers stays an optional (test-only) dependency.
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor):
        return _CONV1D if weight.dim() == 2 else None
    return None


def split_dim(module: nn.Module, style: str, parameter: str | None = None) -> int | None:
    """The dimension ``style`` splits of ``module``'s weight, or of its ``parameter`` (``None``: cannot split)."""
    if style == REPLICATE:
        return None
    if parameter is not None:
        return _parameter_dim(module, parameter, style)
    kind = layer_kind(module)
    if kind is None:
        return None
    return kind.in_dim if style == ROWWISE else kind.out_dim


def _parameter_dim(owner: nn.Module, parameter: str, style: str) -> int | None:
    # Stacked matrices as F.linear takes them, (..., out, in), or transposed (..., in, out) where the module
    # says so (Hugging Face experts' ``is_transposed``).
    value = getattr(owner, parameter, None)
    if isinstance(value, torch.Tensor) and value.dim() == 1 and "bias" in parameter:
        return None if style == ROWWISE else 0  # a bias of output features (a packed q/k/v's)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    out_dim, in_dim = value.dim() - 2, value.dim() - 1
    if getattr(owner, "is_transposed", False):
        out_dim, in_dim = in_dim, out_dim
    return in_dim if style == ROWWISE else out_dim


def split_target(
    unit: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None
) -> tuple[str, nn.Module, str | None]:
    """What a rule named ``name`` (relative to ``unit``) splits: ``(layer name, layer, parameter or None)``.

    A name that is a submodule is a layer rule; otherwise it names a parameter of the submodule before its last dot.
    ``modules``: ``dict(unit.named_modules())``, for callers that resolve many names.
    """
    modules = dict(unit.named_modules()) if modules is None else modules
    if name in modules:
        return name, modules[name], None
    owner, _, parameter = name.rpartition(".")
    return owner, modules[owner], parameter


def parameter_placements(
    module: nn.Module, style: str, parameter_styles: Mapping[str, str] | None = None
) -> dict[str, Placement]:
    """Placement of each of ``module``'s own parameters under ``style``.

    Plain ``Shard``/``Replicate``, except a :func:`packed_colwise` layer's weight and bias: a strided shard (each
    rank holds its share of each packed part), which distributed checkpoints refuse; the region saves those
    in the plain ``Shard`` layout (:func:`~parti_lightning.parallel.tensor.region.shard_unit`).
    """
    dim = split_dim(module, style)
    placements: dict[str, Placement] = {name: Replicate() for name, _ in module.named_parameters(recurse=False)}
    for parameter, parameter_style in (parameter_styles or {}).items():
        parameter_dim = split_dim(module, parameter_style, parameter)
        if parameter_dim is not None:
            parts = packed_parts(parameter_style)
            split = Shard(parameter_dim) if parts is None else _StridedShard(parameter_dim, split_factor=parts)
            placements[parameter] = split
    if dim is None:
        return placements
    parts = packed_parts(style)
    placements["weight"] = Shard(dim) if parts is None else _StridedShard(dim, split_factor=parts)
    kind = layer_kind(module)
    # A colwise layer's bias belongs to its (split) outputs; a rowwise layer's is added once, after the sum.
    if "bias" in placements and style != ROWWISE and kind is not None and kind.has_bias_per_output:
        placements["bias"] = Shard(0) if parts is None else _StridedShard(0, split_factor=parts)
    return placements


def match_rules(module: nn.Module, rules: Mapping[str, str]) -> dict[str, str]:
    """Resolve ``pattern -> style`` to ``module or parameter name -> style``; the last matching pattern wins.

    A pattern names submodules; one that matches none may name parameters (stacked expert weights).

    Raises:
        ValueError: an unknown style, or a pattern that matches no submodule and no parameter.
    """
    resolved, unmatched = resolve_rules(module, rules)
    if unmatched:
        names = [name for name, _ in module.named_modules() if name]
        raise ValueError(
            f"tensor rule {unmatched[0]!r} matches no submodule or parameter of {type(module).__name__}; patterns are"
            f" fnmatch patterns over model.named_modules() names such as {', '.join(map(repr, names[:6]))}."
        )
    return resolved


def resolve_rules(module: nn.Module, rules: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """:func:`match_rules` that returns the patterns matching nothing instead of raising (a model's own plan
    may name layers a configuration leaves out)."""
    modules = [name for name, _ in module.named_modules() if name]
    parameters = [name for name, _ in module.named_parameters()]
    resolved: dict[str, str] = {}
    unmatched: list[str] = []
    for pattern, style in rules.items():
        if style not in STYLES and packed_parts(style) is None:
            raise ValueError(f"tensor rule {pattern!r}: {style!r} is not one of {', '.join(STYLES)}.")
        matched = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
        matched = matched or [name for name in parameters if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            unmatched.append(pattern)
        resolved.update(dict.fromkeys(matched, style))
    return resolved, unmatched


def validate_tensor_rules(module: nn.Module, rules: Mapping[str, str], degree: int) -> None:
    """Check explicit tensor-parallel rules before anything is launched.

    Works on a meta-device model (only shapes are read).

    Args:
        module: the model the patterns are matched against.
        rules: ``fnmatch`` pattern over ``named_modules()`` names -> ``"colwise" | "rowwise" | "replicate"``.
        degree: the size of the tensor axis.

    Raises:
        ValueError: a pattern that matches nothing, an unknown style, a split rule on a module type that
            cannot take it, or a dimension the degree does not divide (the message names the layer, the
            size and the degrees that would work).
    """
    if degree < 1:
        raise ValueError(f"tensor degree must be at least 1, got {degree}.")
    modules = dict(module.named_modules())
    for name, style in match_rules(module, rules).items():
        if style == REPLICATE:
            continue
        _, layer, parameter = split_target(module, name, modules)
        dim = split_dim(layer, style, parameter)
        if dim is None and parameter is not None:
            raise ValueError(
                f"tensor rule {style!r} matches parameter {name!r}, which is not a matrix or a stack of matrices."
            )
        if dim is None:
            raise ValueError(
                f"tensor rule {style!r} matches {name!r}, a {type(layer).__name__}: only nn.Linear, nn.Embedding and"
                " transposed-weight Conv1D layers can be split; use 'replicate' or a pattern for its linear layers."
            )
        size = (getattr(layer, parameter) if parameter else layer.weight).shape[dim] // (packed_parts(style) or 1)
        if size % degree:
            working = [d for d in range(2, size + 1) if size % d == 0 and d <= 64]
            raise ValueError(
                f"tensor rule {style!r} on {name!r} splits a dimension of size {size}, which tensor={degree} does"
                f" not divide; degrees that would: {', '.join(map(str, working)) or 'none'} (or 'replicate' it)."
            )


def hf_tensor_rules(module: nn.Module) -> dict[str, str]:
    """Rules from the Hugging Face models inside ``module`` (their ``tp_plan``), keys prefixed with their path.

    Returns an empty mapping when no submodule carries a plan. Nested models are read once, at their
    outermost level (a causal-LM's plan already covers its base model).
    """
    rules: dict[str, str] = {}
    taken: list[str] = []
    for path, sub in module.named_modules():
        plan = getattr(sub, "tp_plan", None) if hasattr(sub, "config") else None
        if not isinstance(plan, Mapping) or not plan or any(_inside(path, outer) for outer in taken):
            continue
        taken.append(path)
        prefix = f"{path}." if path else ""
        for key, value in plan.items():
            rules[prefix + key] = _HF_STYLES.get(value, REPLICATE)
    return rules


def _inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(f"{outer}.")


def rules_for_unit(unit_name: str, unit: nn.Module, resolved: Mapping[str, str]) -> dict[str, str]:
    """The resolved rules that fall inside ``unit``, keyed relative to it ("" is the unit itself)."""
    relative: dict[str, str] = {}
    names = [name for name, _ in unit.named_modules()] + [name for name, _ in unit.named_parameters()]
    for name in names:
        full = f"{unit_name}.{name}" if name else unit_name
        if full in resolved:
            relative[name] = resolved[full]
    return relative


def trace_block_rules(block: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, str], list[str]]:
    """Automatic rules for one block, from the order and widths of its linear layers in one real call.

    The Megatron pattern is read off the trace: a linear layer that reads the block's width opens a
    group (colwise); layers that read the very same input tensor join it (q/k/v, gate/up, and a fused
    qkv is one such layer); the next layer that writes the block's width closes it (rowwise), its
    output returning to the residual stream. Groups that never close, and layers in no group, stay
    replicated. A colwise layer whose output the block cuts into ``k`` equal parts along its features
    (a fused qkv's ``split(C, dim=2)``) is packed (:func:`packed_colwise`): split by whole heads. The
    result is a proposal: :func:`~parti_lightning.parallel.tensor.apply_tensor_parallel` verifies it
    numerically before using it.

    Args:
        block: one block (not modified: a copy is run, in eval mode, without gradients).
        args: its captured positional inputs.
        kwargs: its captured keyword inputs.

    Returns:
        ``(rules, groups)``: rules keyed by names relative to the block, and one readable line per group.
    """
    width = _block_width(args, kwargs)
    calls, packed = _record_linear_calls(block, args, kwargs)
    rules: dict[str, str] = {}
    groups: list[str] = []
    members: list[str] = []
    group_inputs: list[torch.Tensor] = []
    for name, inp, in_features, out_features in calls:
        if members and any(inp is seen for seen in group_inputs):
            members.append(name)
        elif members and out_features == width:
            rules.update({m: packed_colwise(packed[m]) if m in packed else COLWISE for m in members})
            rules[name] = ROWWISE
            groups.append(f"{', '.join(members)} colwise -> {name} rowwise")
            members, group_inputs = [], []
        elif in_features == width:
            members, group_inputs = [name], [inp]
        else:
            members, group_inputs = [], []
    for name, attention in _torch_attention(block):
        # nn.MultiheadAttention computes q/k/v from one raw parameter (F.linear on in_proj_weight): packed by
        # whole heads; its output projection closes the pair. Neither is a layer call the trace sees.
        rules[f"{name}.in_proj_weight"] = packed_colwise(3)
        if attention.in_proj_bias is not None:
            rules[f"{name}.in_proj_bias"] = packed_colwise(3)
        rules[f"{name}.out_proj"] = ROWWISE
        groups.append(f"{name}.in_proj (q, k, v packed) colwise -> {name}.out_proj rowwise")
    return rules, groups


def _torch_attention(block: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """The block's ``nn.MultiheadAttention`` layers whose q/k/v projection is one packed parameter."""
    return [
        (name, layer)
        for name, layer in block.named_modules()
        if isinstance(layer, nn.MultiheadAttention) and layer._qkv_same_embed_dim and layer.in_proj_weight is not None
    ]


def _block_width(args: Iterable, kwargs: Mapping) -> int | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return value.shape[-1]
    return None


def _record_linear_calls(
    block: nn.Module, args: tuple, kwargs: dict
) -> tuple[list[tuple[str, torch.Tensor, int, int]], dict[str, int]]:
    """Each linear layer's first call (name, input, in and out features), and the layers whose output was cut
    into equal parts along its features (name -> parts)."""
    probe = module_copy(block).eval()
    calls: list[tuple[str, torch.Tensor, int, int]] = []
    seen: set[str] = set()
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor kept beside its id, so the id stays its own
    handles = []
    for name, layer in probe.named_modules():
        kind = layer_kind(layer)
        if kind is None or kind is _EMBEDDING or not name:
            continue

        def record(mod: nn.Module, inputs: tuple, _name: str = name, _kind: _Kind = kind) -> None:
            if _name in seen or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            seen.add(_name)
            weight = mod.weight
            calls.append((_name, inputs[0], weight.shape[_kind.in_dim], weight.shape[_kind.out_dim]))

        def keep(mod: nn.Module, inputs: tuple, output: object, _name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                outputs.setdefault(id(output), (_name, output))

        handles.append(layer.register_forward_pre_hook(record))
        handles.append(layer.register_forward_hook(keep))
    recorder = _CutRecorder(outputs)
    try:
        with torch.no_grad(), recorder:
            probe(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, recorder.packed


class _CutRecorder(TorchFunctionMode):
    """Notes which linear outputs the block cuts into equal parts along their last (feature) dimension."""

    def __init__(self, outputs: dict[int, tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = outputs
        self.packed: dict[str, int] = {}

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        cut = equal_parts(func, args, kwargs)
        if cut is not None and id(args[0]) in self.outputs and cut[1] == args[0].dim() - 1:
            self.packed.setdefault(self.outputs[id(args[0])][0], cut[0])
        return func(*args, **kwargs)
