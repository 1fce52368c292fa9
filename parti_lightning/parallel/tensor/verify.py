"""The setup check of tensor parallelism: choose a layout for a block, verified on the input it really got.

Each distinct block (class and rules) runs on the input it received in one example step, once with the
proposed rules and once unsharded, forward and backward, on every tensor rank. A proposal that errors or
differs falls back: a packed q/k/v layer to plain colwise, then to the largest correct subset of its layers
(each layer verified as it is added), then to leaving the block replicated. Every tensor rank takes the same
verdict (one all-reduce per candidate), so they all hold the same layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_map

from parti_lightning.parallel.copies import module_copy
from parti_lightning.parallel.scratch import fresh_caches
from parti_lightning.parallel.tensor.region import implicit_replication, mesh_device, shard_unit
from parti_lightning.parallel.tensor.rules import COLWISE, REPLICATE, packed_parts, split_dim, split_target

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


def drop_unsplittable(
    unit_name: str, unit: nn.Module, proposal: Mapping[str, str], tied: dict[int, list[str]], degree: int
) -> tuple[dict[str, str], list[str]]:
    """Keep the split rules that can apply: a splittable, untied layer whose split dimension ``degree`` divides."""
    kept: dict[str, str] = {}
    refused: list[str] = []
    modules = dict(unit.named_modules())
    for name, style in proposal.items():
        if style == REPLICATE:
            continue
        _, layer, parameter = split_target(unit, name, modules)
        full = f"{unit_name}.{name}" if name else unit_name
        dim = split_dim(layer, style, parameter)
        weight = getattr(layer, parameter or "weight", None)
        if dim is None or not isinstance(weight, torch.Tensor):
            what = f"parameter {parameter!r} of a" if parameter else "a"
            refused.append(f"{full}: {what} {type(layer).__name__} cannot be split {style}")
        elif id(weight) in tied:
            refused.append(f"{full}: weight tied with {', '.join(tied[id(weight)])}; kept replicated")
        elif weight.shape[dim] % (degree * (packed_parts(style) or 1)):
            parts = f" in {packed_parts(style)} packed parts" if packed_parts(style) else ""
            refused.append(f"{full}: size {weight.shape[dim]}{parts} not divisible by tensor={degree}")
        else:
            kept[name] = style
    return kept, refused



def choose(
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
        failure = error_line(error)
    # Every tensor rank must take the same layout: one rank's failure fails it for all.
    flag = torch.tensor([0 if failure is None else 1], device=mesh_device(mesh))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group())
    if failure is None and flag.item():
        failure = "failed the setup check on another tensor rank"
    return None if failure is None else failure[:_REASON_CHARS]


def _compare(unit: nn.Module, rules: Mapping[str, str], sample: tuple, mesh: DeviceMesh) -> str | None:
    # Compared in eval mode, where dropout draws nothing: a split activation's masks differ from one process's
    # by design (see random.py). A block that trains runs once more split in training mode, unchecked: code
    # paths taken in training only (dropout, a different attention kernel) must run on DTensors too.
    reference = module_copy(unit).eval()
    sharded = module_copy(unit).eval()
    shard_unit(sharded, rules, mesh)
    results = [_run(model, sample) for model in (reference, sharded)]
    if unit.training:
        with torch.random.fork_rng():  # the run's random streams are not advanced by the check
            _run(sharded.train(), sample)
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


def _run(model: nn.Module, sample: tuple) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """``model``'s floating outputs on ``sample``, and its input and parameter gradients for random cotangents."""
    args, kwargs = tree_map(_fresh_input, fresh_caches(sample))
    with torch.enable_grad():
        output = model(*args, **kwargs)
        outputs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        differentiable = [t for t in outputs if t.requires_grad]
        if differentiable:
            generator = torch.Generator().manual_seed(0)
            cotangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in differentiable]
            with implicit_replication():  # as the strategy runs backward passes (see Parallelized.step_context)
                torch.autograd.backward(differentiable, cotangents)
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = [t.grad for t in inputs] + [p.grad for _, p in sorted(model.named_parameters())]
    # Copies: a later backward through the same model accumulates into its parameters' gradients.
    return [t.detach() for t in outputs], [g if g is None else g.detach().clone() for g in grads]


def error_line(error: Exception) -> str:
    """An error as one line for the plan table: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


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
