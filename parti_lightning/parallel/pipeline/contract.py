"""The trunk contract that pipeline parallelism needs from an unmodified ``forward``, checked by a dry run.

Pipelining runs the whole trunk (the repeated blocks) as one operation the first time the user's
forward calls its first block, and lets the calls of the later blocks pass that result through. That
is exact only if the forward treats the trunk as a chain: every block called once, in order, fed the
previous block's output (its first element when blocks return tuples), with extra arguments computed
outside the trunk (masks, rotary tables, an encoder's output: those that require grad get their gradient
back from every stage), and nothing between or after the blocks reading an intermediate block output.

- Extra arguments may differ by block (a sliding-window mask on some layers, a full one on others): the
  trunk then runs when the forward calls its last block, once every block's arguments are known
  (:attr:`TrunkLayout.per_block_extras`).
- A key/value cache handed to the blocks is allowed when it is empty as the trunk starts (Hugging Face's
  default in training): it is per-pass scratch, and every stage and micro-batch gets a fresh one
  (:mod:`parti_lightning.parallel.scratch`).
- A training step may run the trunk several times (manual optimization's separate losses), each time as a
  whole chain.

:func:`trunk_layout` runs the forward once (on meta tensors where the caller can) with hooks on the blocks
and a ``TorchFunctionMode`` that sees every tensor operation outside the blocks, and names what breaks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from parti_lightning.parallel.blocks import find_trunks
from parti_lightning.parallel.scratch import filled_caches


@dataclass(frozen=True)
class TrunkLayout:
    """What the dry run saw of the trunk: its blocks, whether their extra arguments differ, what they return.

    Attributes:
        blocks: ``(name, block)`` pairs in call order.
        per_block_extras: some block got extra arguments different from the first block's.
        output_template: the structure a block returns: ``None`` for a tensor, else ``(type, length)`` of its
            tuple or list.
        tensor_elements: the positions after the first where blocks return tensors.
        handed: some block takes a value an earlier block returned (T5's position bias), which the pipelined
            trunk carries from stage to stage with the hidden state.
    """

    blocks: list[tuple[str, nn.Module]]
    per_block_extras: bool = False
    output_template: Any = None
    tensor_elements: tuple[int, ...] = ()
    handed: bool = False


def check_trunk_contract(module: nn.Module, run_example: Callable[[], Any]) -> list[tuple[str, nn.Module]]:
    """The ``(name, block)`` pairs of every trunk, once :func:`trunk_layout` found each trunk's contract kept."""
    trunks = find_trunks(module)
    if not trunks:
        raise ValueError(_no_trunk_message(module))
    return [pair for trunk in trunks for pair in trunk_layout(module, run_example, trunk).blocks]


def trunk_layout(
    module: nn.Module, run_example: Callable[[], Any], blocks: list[tuple[str, nn.Module]] | None = None
) -> TrunkLayout:
    """Check by one dry run that ``module``'s trunk can be pipelined without changing its ``forward``.

    Args:
        module: the model; ideally on the meta device (nothing is computed then).
        run_example: runs the module's forward (or training step) once, on inputs shaped like a
            real batch. Whatever it returns is ignored.
        blocks: the trunk to check (one of :func:`find_trunks`); ``None``: the module's only trunk.

    Returns:
        The trunk's blocks, in call order, and how they are called.

    Raises:
        ValueError: no repeated trunk (the message lists the containers searched), or the forward
            breaks the contract (the message names the block and what it did).
    """
    if blocks is None:
        trunks = find_trunks(module)
        blocks = trunks[0] if len(trunks) == 1 else [pair for trunk in trunks for pair in trunk]
    if len(blocks) < 2:
        raise ValueError(_no_trunk_message(module))
    recorder = _Recorder([name for name, _ in blocks])
    handles = []
    for index, (_, block) in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(recorder.pre_hook(index), with_kwargs=True))
        handles.append(block.register_forward_hook(recorder.post_hook(index), with_kwargs=True, always_call=True))
    try:
        with recorder.mode():
            run_example()
    finally:
        for handle in handles:
            handle.remove()
    recorder.verify()
    elements = sorted(
        {j for call in recorder.calls if isinstance(call.output, (tuple, list))
         for j, item in enumerate(call.output) if j > 0 and isinstance(item, Tensor)}
    )
    return TrunkLayout(
        blocks, recorder.per_block_extras, output_template(recorder.calls[-1].output), tuple(elements),
        recorder.handed,
    )


def same_arguments(a: Any, b: Any) -> bool:
    """Whether two blocks' extra arguments are the same: tensors by identity, containers by element, others by ``==``.

    Identity, not value, for tensors: the forward computes a mask or a rotary table once and hands
    the same object to every block; a different object per block is a per-layer argument.
    """
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_arguments(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_arguments(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == raises or is ambiguous compare by identity
        return a is b


def filled_cache_message(name: str, filled: list[str]) -> str:
    """Why a trunk entered with a cache that holds content cannot be pipelined."""
    return (
        f"block {name!r} is passed a cache that already holds keys and values: {', '.join(filled)}. A cache empty"
        " as the trunk starts is per-pass scratch, which a pipeline splits (each stage and micro-batch gets its"
        " own); one filled before (generation's prompt) is state carried across passes through every block,"
        " which pipeline stages cannot share. Generate under a plan without pipeline, or from a consolidated"
        " checkpoint."
    )


def output_template(output: Any) -> Any:
    """The structure of a block's output: ``None`` for a tensor, else ``(type, length)`` of its tuple or list."""
    return (type(output), len(output)) if isinstance(output, (tuple, list)) else None


def first_output(output: Any) -> Any:
    """The hidden state a block hands on: its output, or the first element of a tuple or list."""
    return output[0] if isinstance(output, (tuple, list)) and len(output) > 0 else output


def argument_name(path: tuple[Any, ...]) -> str:
    """A readable name for an extra argument: ``'attention_mask'`` or ``'positional argument 2'``."""
    kind, key = path
    return repr(key) if kind == "kw" else f"positional argument {key + 1}"


@dataclass
class _Call:
    index: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    filled: list[str] = field(default_factory=list)
    output: Any = None


@dataclass
class _Recorder:
    names: list[str]
    calls: list[_Call] = field(default_factory=list)
    depth: int = 0
    # Tensors the forward must not read outside the blocks: non-first block outputs and the first
    # outputs of all blocks but the last (the pipelined trunk produces neither on every rank).
    hidden: dict[int, tuple[Tensor, str]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    per_block_extras: bool = False
    handed: bool = False

    def pre_hook(self, index: int) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.depth += 1
            # Read now: the blocks fill the cache as they run.
            self.calls.append(_Call(index, args, dict(kwargs), filled=filled_caches(args, kwargs)))

        return hook

    def post_hook(self, index: int) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            self.depth -= 1
            if not self.calls or self.calls[-1].index != index:
                return
            self.calls[-1].output = output
            name = self.names[index]
            if isinstance(output, (tuple, list)):
                for i, item in enumerate(output[1:], start=1):
                    if isinstance(item, Tensor):  # named after the first block that returned it
                        self.hidden.setdefault(id(item), (item, f"output element {i} of block {name!r}"))
            hidden_state = first_output(output)
            if isinstance(hidden_state, Tensor) and index < len(self.names) - 1:
                self.hidden[id(hidden_state)] = (hidden_state, f"the output of block {name!r} (not the last block)")

        return hook

    def mode(self) -> TorchFunctionMode:
        return _WatchOutsideBlocks(self)

    def note_use(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, result: Any) -> None:
        if self.depth > 0 or not self.hidden or not _has_tensor(result):
            return
        for value in _leaves((args, kwargs or {})):
            seen = self.hidden.get(id(value)) if isinstance(value, Tensor) else None
            if seen is not None and seen[0] is value:
                what = getattr(func, "__name__", str(func))
                self.violations.append(f"{seen[1]} is used outside the blocks (by {what})")
                return

    def verify(self) -> None:
        order = [call.index for call in self.calls]
        _check_order(order, self.names)
        n = len(self.names)
        # Each pass of the trunk is a chain of its own: fed by its own first block, with its own extras.
        for start in range(0, len(self.calls), n):
            chain = self.calls[start : start + n]
            first = chain[0]
            self._check_call(first, None, first)
            for previous, call in zip(chain, chain[1:], strict=False):
                self._check_call(first, previous, call)
        if self.violations:
            raise ValueError(
                f"trunk contract broken: {self.violations[0]}. A pipelined trunk hands on only the last block's"
                " first output: block outputs other than the first, and intermediate block outputs, do not exist"
                " on every pipeline rank."
            )

    def _check_call(self, first: _Call, previous: _Call | None, call: _Call) -> None:
        name = self.names[call.index]
        if not call.args or not isinstance(call.args[0], Tensor):
            raise ValueError(
                f"trunk contract broken: block {name!r} is called without a tensor as its first positional"
                " argument; the pipelined trunk needs the hidden state passed first, by position."
            )
        if call is first and call.filled:
            raise ValueError(f"trunk contract broken: {filled_cache_message(name, call.filled)}")
        hidden, out = call.args[0], first_output(call.output)
        if not isinstance(out, Tensor) or out.shape != hidden.shape or out.dtype != hidden.dtype:
            raise ValueError(
                f"trunk contract broken: block {name!r} returns {_describe(out)} for a hidden state of "
                f"{_describe(hidden)}; pipelined blocks must return a tensor of the input's shape and dtype"
                " (or a tuple whose first element is one)."
            )
        if previous is not None and hidden is not first_output(previous.output):
            raise ValueError(
                f"trunk contract broken: block {name!r} is not fed the output of block {self.names[previous.index]!r}"
                " (its first element); code between blocks that changes the hidden state cannot be pipelined."
            )
        for path, value, reference in _extra_pairs(call, first):
            handed = [self.hidden[id(t)][1] for t in _leaves(value) if isinstance(t, Tensor) and id(t) in self.hidden]
            if any(not what.startswith("output element") for what in handed):
                raise ValueError(
                    f"trunk contract broken: block {name!r} gets {handed[0]} as {argument_name(path)}: a block's hidden"
                    " state reaches only the next block in a pipelined trunk."
                )
            if handed:  # T5's position bias: carried from stage to stage with the hidden state
                self.handed = self.per_block_extras = True
            if not same_arguments(value, reference):
                self.per_block_extras = True  # a per-layer argument: the trunk runs once all are known


class _WatchOutsideBlocks(TorchFunctionMode):
    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        self.recorder.note_use(func, args, kwargs, result)
        return result


def _check_order(order: list[int], names: list[str]) -> None:
    if not order:
        raise ValueError(
            f"trunk contract broken: the example ran none of the {len(names)} blocks ({names[0]!r}, ...); the"
            " forward must call the trunk's blocks."
        )
    # Whole passes only: 0, 1, ..., n-1, then again from 0 (a step may run the trunk more than once).
    last = len(names) - 1
    in_pass = {order[0]}
    for previous, index in zip(order, order[1:], strict=False):
        if index == 0 and previous == last:
            in_pass = {0}
            continue
        if index == previous + 1:
            in_pass.add(index)
            continue
        if index in in_pass:
            raise ValueError(
                f"trunk contract broken: block {names[index]!r} is called again after {names[previous]!r}, before"
                f" the trunk's last block {names[last]!r} ran (blocks indexed inside the loop, or a block reused);"
                " each pass must call every block exactly once, in order."
            )
        raise ValueError(
            f"trunk contract broken: block {names[index]!r} is called right after {names[previous]!r}; the"
            " blocks must be called in their module order."
        )
    counts = [order.count(i) for i in range(len(names))]
    skipped = [names[i] for i, c in enumerate(counts) if c == 0]
    if skipped:
        raise ValueError(
            f"trunk contract broken: block(s) {', '.join(map(repr, skipped[:4]))} are never called; the pipelined"
            " trunk runs every block, so the forward must too."
        )
    if order[-1] != last:
        raise ValueError(
            f"trunk contract broken: the last pass stops at block {names[order[-1]]!r}, before {names[last]!r};"
            " the pipelined trunk runs every block, so each pass of the forward must too."
        )


def _extra_pairs(call: _Call, first: _Call) -> list[tuple[tuple[Any, ...], Any, Any]]:
    pairs: list[tuple[tuple[Any, ...], Any, Any]] = []
    for i in range(1, max(len(call.args), len(first.args))):
        pairs.append((("pos", i), _get(call.args, i), _get(first.args, i)))
    for key in dict.fromkeys([*call.kwargs, *first.kwargs]):
        pairs.append((("kw", key), call.kwargs.get(key, _MISSING), first.kwargs.get(key, _MISSING)))
    return pairs


_MISSING = object()


def _get(values: tuple[Any, ...], i: int) -> Any:
    return values[i] if i < len(values) else _MISSING


def _leaves(value: Any) -> list[Any]:
    return torch.utils._pytree.tree_leaves(value)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, Tensor) for v in _leaves(value))


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {tuple(value.shape)} {value.dtype} tensor"
    return f"a {type(value).__name__}"


def _no_trunk_message(module: nn.Module) -> str:
    containers = [
        f"{name or '<root>'} ({type(m).__name__} of {', '.join(type(c).__name__ for c in m.children()) or 'nothing'})"
        for name, m in module.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential))
    ]
    searched = "; ".join(containers[:8]) if containers else "none: the model has no nn.ModuleList or nn.Sequential"
    return (
        f"no repeated trunk to pipeline in {type(module).__name__}: pipeline stages are cut between repeated blocks,"
        " which are two or more children of one class, holding parameters, in an nn.ModuleList or nn.Sequential."
        f" Containers searched: {searched}."
    )
