"""What one training step of a module needs, measured on the meta device without real compute.

The module is copied onto the meta device (its parameters are not copied: each is replaced by a
meta tensor of the same shape), one training step runs there on the example batch, and torch's
own tools watch it: ``FlopCounterMode`` counts FLOPs per module, ``MemTracker`` finds the step's
peak memory and what it is made of, and saved-tensor hooks attribute the activations kept for
backward to the repeated blocks. A model larger than memory is profiled in the memory of its
module tree.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from parti_lightning.parallel.blocks import find_blocks
from parti_lightning.parallel.copies import REAL_COPY_BYTES, state_bytes, trial_copy
from parti_lightning.parallel.pipeline.contract import check_trunk_contract
from parti_lightning.parallel.tensor.rules import layer_kind
from parti_lightning.planner.optimizer_state import UNKNOWN_STATE_TENSORS, OptimizerState, optimizer_state

META = torch.device("meta")
# glibc's mmap threshold as parti sets it in ZeRO-2/3 CPU ranks (see accelerator.release_freed_memory): every
# tensor at least this large is then new, page-faulted memory.
LARGE_ALLOCATION_BYTES = 128 * 1024


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter's shape, as the sharding arithmetic needs it."""

    name: str
    shape: tuple[int, ...]
    element_size: int
    requires_grad: bool
    # Whether tensor parallelism has a split for it: a matrix of a linear, embedding or Conv1D layer, torch's
    # attention's packed projection, or a stack of experts' matrices. A convolution's kernel has none, and a
    # parameter tied to another (an embedding and its head) is kept whole.
    splittable: bool = True

    @property
    def numel(self) -> int:
        return _product(self.shape)

    @property
    def bytes(self) -> int:
        return self.numel * self.element_size


@dataclass(frozen=True)
class BlockProfile:
    """One repeated block (a unit of sharding and of activation checkpointing).

    Attributes:
        name: as in ``named_modules()``.
        parameter_bytes: bytes of the block's parameters.
        activation_bytes: bytes of the tensors saved for backward while the block's forward ran.
        input_bytes: bytes of the block's tensor inputs: what activation checkpointing keeps instead.
        replicated_activation_bytes: the part of ``activation_bytes`` in tensors shaped like the block's first
            input (the residual stream: norms' inputs and outputs, dropout masks), which tensor parallelism
            leaves whole on every rank. A split layer's input of that shape (an output projection's) is
            counted here too: this errs towards more memory.
        forward_flops: FLOPs of the block's forward (recomputed once more under checkpointing).
        backward_flops: FLOPs of the block's backward.
        operations: aten operator calls of the block's forward and backward: under tensor parallelism
            each goes through DTensor's dispatch, whose cost per call is about that of a small matmul.
    """

    name: str
    parameter_bytes: int
    activation_bytes: int
    input_bytes: int
    forward_flops: int
    backward_flops: int
    operations: int = 0
    replicated_activation_bytes: int = 0


@dataclass(frozen=True)
class BlockTiming:
    """One block's forward and backward, measured.

    Attributes:
        seconds: ``(samples per call, seconds)`` pairs, largest first: the median time of one block's forward and
            backward at that many samples.
        operations: aten calls of one forward and backward of the block.
        threads: the torch threads it ran on (one rank's share of the cores).
        forward_share: the forward's part of ``seconds`` (at the largest size): a forward runs at a higher rate
            than its backward, so its share of the time is below its share of the FLOPs. ``None``: not measured.
        optimizer_seconds: one step of the model's optimizer (its ``torch.optim`` class at its defaults) over the
            block's parameters, measured. ``None``: not measured (an optimizer ``torch.optim`` does not have).
    """

    seconds: tuple[tuple[int, float], ...]
    operations: int
    threads: int
    forward_share: float | None = None
    optimizer_seconds: float | None = None

    def seconds_at(self, samples: float) -> float:
        """Seconds of one block's forward and backward at ``samples``: the nearest measured size, scaled linearly."""
        size, seconds = min(self.seconds, key=lambda pair: abs(pair[0] - samples))
        return seconds * samples / size if size else seconds


@dataclass(frozen=True)
class ModelProfile:
    """Bytes and FLOPs of one training step on one process, unpartitioned.

    Attributes:
        name: the module's class name.
        parameters: every parameter (shared ones once).
        buffer_bytes: bytes of the buffers (never sharded).
        optimizers: predicted state of each optimizer from ``configure_optimizers``.
        blocks: the repeated blocks, in module order (empty when nothing repeats).
        activation_bytes: bytes of all tensors saved for backward (parameters excluded).
        step_peak_bytes: memory a step adds on top of the parameters at its peak (MemTracker).
        peak_gradient_bytes: of that, the gradients alive at the peak.
        forward_flops: FLOPs of the forward pass (training step).
        backward_flops: FLOPs of the backward pass.
        batch_size: size of the example batch's first dimension (0 when unknown).
        source: ``"training_step"`` or ``"forward"``: what was run.
        notes: assumptions the numbers rest on.
        heads: the attention head counts the module's layers or configs declare (``n_head``, ``num_heads``,
            ``num_attention_heads``, ``num_key_value_heads``, ...): tensor parallelism splits whole heads.
        large_allocation_bytes: bytes of the new tensors of at least ``LARGE_ALLOCATION_BYTES`` the step
            allocates (forward and backward), freed or not.
        largest_trunk_activation_bytes: the largest single tensor saved for backward inside the blocks.
        largest_outside_activation_bytes: the largest saved for backward outside them (logits, embeddings).
        block_timing: the first block's forward and backward measured on this machine
            (:func:`~parti_lightning.planner.timing.time_blocks`); ``None``: predicted from FLOPs alone.
        pipeline_refusal: why pipeline parallelism would refuse the module (the trunk contract, checked on the
            profiled step as the run checks it); empty when it would run.
    """

    name: str
    parameters: tuple[ParameterInfo, ...]
    buffer_bytes: int
    optimizers: tuple[OptimizerState, ...]
    blocks: tuple[BlockProfile, ...]
    activation_bytes: int
    step_peak_bytes: int
    peak_gradient_bytes: int
    forward_flops: int
    backward_flops: int
    batch_size: int
    source: str
    notes: tuple[str, ...] = ()
    heads: tuple[int, ...] = ()
    large_allocation_bytes: int = 0
    largest_trunk_activation_bytes: int = 0
    largest_outside_activation_bytes: int = 0
    block_timing: BlockTiming | None = None
    pipeline_refusal: str = ""

    @property
    def tensor_refusal(self) -> str:
        """Why tensor parallelism would split nothing in the blocks (it would train them replicated); empty if not."""
        if not self.blocks:
            return "the model has no repeated blocks"
        if not any(p.splittable and len(p.shape) >= 2 for p in self.block_parameters):
            return "no layer of its blocks is one tensor parallelism splits (convolutions, norms: kept whole)"
        return ""

    @property
    def parameter_count(self) -> int:
        return sum(p.numel for p in self.parameters)

    @property
    def parameter_bytes(self) -> int:
        return sum(p.bytes for p in self.parameters)

    @property
    def largest_parameter_bytes(self) -> int:
        return max((p.bytes for p in self.parameters), default=0)

    @property
    def gradient_bytes(self) -> int:
        return sum(p.bytes for p in self.parameters if p.requires_grad)

    @property
    def optimizer_state_bytes(self) -> int:
        return sum(o.state_bytes for o in self.optimizers)

    @property
    def optimizer_scalar_bytes(self) -> int:
        return sum(o.scalar_bytes for o in self.optimizers)

    @property
    def optimizer_tensors_per_parameter(self) -> int:
        """State tensors per trainable parameter (the largest over the optimizers)."""
        return max((o.tensors_per_parameter for o in self.optimizers), default=UNKNOWN_STATE_TENSORS)

    @property
    def block_parameters(self) -> tuple[ParameterInfo, ...]:
        """The parameters inside the repeated blocks."""
        prefixes = tuple(f"{b.name}." for b in self.blocks)
        return tuple(p for p in self.parameters if p.name.startswith(prefixes))

    @property
    def step_flops(self) -> int:
        return self.forward_flops + self.backward_flops

    @property
    def transient_bytes(self) -> int:
        """Activations and temporaries alive at the step's peak (the peak less its gradients)."""
        return max(0, self.step_peak_bytes - self.peak_gradient_bytes)


def profile_model(module: nn.Module, batch: Any) -> ModelProfile:
    """Profile one training step of ``module`` on ``batch`` on the meta device.

    The user's module is not touched: a copy is made whose parameters and buffers are new meta
    tensors (so a module of any size, or one already on meta, costs only its module tree). A
    ``LightningModule`` runs ``training_step(batch, 0)``; when that cannot run on meta tensors (it
    reads a value, needs a Trainer) or the module is a plain ``nn.Module``, ``module(batch)`` runs
    instead and the sum of its floating outputs stands for the loss; the profile's notes say so.

    Code that reads values cannot run on meta tensors at all (Hugging Face's mask and loss code asks
    whether a padding mask is all ones). Such a module of at most ``REAL_COPY_BYTES`` is profiled on a
    real copy instead, one real step on the batch (the random number generators left as they were).

    Args:
        module: the model (a ``LightningModule`` or any ``nn.Module``), on any device.
        batch: one batch as the dataloader yields it (tensors anywhere; only shapes and dtypes are read).

    Returns:
        the profile.

    Raises:
        ValueError: the step cannot run on meta tensors and the module is too large to copy.
    """
    meta_batch = tree_map_only(Tensor, lambda t: torch.empty_like(t, device=META), batch)
    try:
        return _profile(module, meta_copy(module), meta_batch, batch, [])
    except Exception as err:  # noqa: BLE001 - any failure on meta tensors: try a real copy, or say why not
        why = f"{type(err).__name__}: {str(err)[:200]}"
        if state_bytes(module) > REAL_COPY_BYTES:
            raise ValueError(
                f"cannot profile {type(module).__name__}: its step cannot run on meta tensors ({why}), and at"
                f" {state_bytes(module) / 2**30:.1f} GiB it is too large to profile on a real copy (at most"
                f" {REAL_COPY_BYTES / 2**30:.0f} GiB). Give a plan instead of plan='auto'."
            ) from err
        notes = [f"profiled on a real copy of the module: its step cannot run on meta tensors ({why})"]
        device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
        real_batch = tree_map_only(Tensor, lambda t: t.detach().to(device), batch)
        with torch.random.fork_rng(devices=[]):
            return _profile(module, trial_copy(module), real_batch, batch, notes)


def _profile(module: nn.Module, copy: nn.Module, copy_batch: Any, batch: Any, notes: list[str]) -> ModelProfile:
    """One step of ``copy`` (of ``module``; meta or real) on ``copy_batch``, watched."""
    device = next((t.device for t in (*copy.parameters(), *copy.buffers())), META)
    optimizers = _optimizer_states(copy, notes)
    blocks = find_blocks(copy)
    recorder = _SavedTensors(copy, blocks)
    # Why two counters: one over the whole step attributes backward FLOPs to modules (its hooks are
    # set during forward); the inner one tells the forward's share apart.
    step_counter, forward_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    tracker = MemTracker()
    aliases = {name: _tracked_names(copy, name) for name, _ in blocks}
    operations = _OperationCounter({alias: name for name, names in aliases.items() for alias in names})
    with warnings.catch_warnings(), recorder:
        warnings.simplefilter("ignore")  # self.log without a Trainer, MemTracker's own notices
        tracker.track_external(copy)
        with tracker, step_counter, operations:
            with forward_counter:
                loss, source = _run_step(copy, copy_batch, notes)
            recorder.stop()
            loss.backward()
    peak = tracker.get_tracker_snapshot("peak").get(device, {})
    refusal = _pipeline_refusal(copy, copy_batch, len(blocks))
    params = _parameter_infos(module)
    fwd, step = forward_counter.get_flop_counts(), step_counter.get_flop_counts()
    return ModelProfile(
        name=type(module).__name__,
        parameters=params,
        buffer_bytes=sum(b.numel() * b.element_size() for b in module.buffers()),
        optimizers=optimizers,
        blocks=tuple(
            BlockProfile(
                name=name,
                parameter_bytes=sum(p.numel() * p.element_size() for p in block.parameters()),
                activation_bytes=recorder.block_bytes.get(name, 0),
                input_bytes=recorder.input_bytes.get(name, 0),
                forward_flops=_flops(fwd, aliases[name]),
                backward_flops=_flops(step, aliases[name]) - _flops(fwd, aliases[name]),
                operations=operations.counts.get(name, 0),
                replicated_activation_bytes=recorder.replicated_bytes.get(name, 0),
            )
            for name, block in blocks
        ),
        activation_bytes=recorder.total_bytes,
        largest_trunk_activation_bytes=recorder.largest_in_blocks,
        largest_outside_activation_bytes=recorder.largest_outside,
        step_peak_bytes=int(peak.get("Total", 0)) - int(peak.get(_MemRefType.PARAM, 0)),
        peak_gradient_bytes=int(peak.get(_MemRefType.GRAD, 0)),
        forward_flops=forward_counter.get_total_flops(),
        backward_flops=step_counter.get_total_flops() - forward_counter.get_total_flops(),
        batch_size=_batch_size(batch),
        source=source,
        notes=tuple(notes),
        heads=_head_counts(module),
        large_allocation_bytes=operations.large_allocation_bytes,
        pipeline_refusal=refusal,
    )


def _pipeline_refusal(copy: nn.Module, batch: Any, blocks: int) -> str:
    """What pipeline parallelism's trunk contract says of the step, checked on the profiled copy as the run
    checks it on the first batch; empty when the trunk can be pipelined."""
    if blocks < 2:
        return "the model has no repeated trunk"

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run_step(copy, batch, [])

    try:
        with torch.no_grad():
            check_trunk_contract(copy, run)
    except ValueError as err:
        return str(err)
    except Exception:  # noqa: BLE001,S110 - not a verdict (the step failed without grad): the run checks it at setup
        pass
    return ""


# Attribute names under which attention layers and model configs (torch's, nanoGPT's, Hugging Face's) keep
# their head counts.
_HEAD_ATTRIBUTES = ("n_head", "nhead", "num_heads", "n_heads", "num_attention_heads", "num_key_value_heads",
                    "n_kv_heads", "num_kv_heads")


def _head_counts(module: nn.Module) -> tuple[int, ...]:
    found: set[int] = set()
    for sub in module.modules():
        for owner in (sub, getattr(sub, "config", None), getattr(sub, "hparams", None)):
            for attribute in _HEAD_ATTRIBUTES:
                value = getattr(owner, attribute, None) if owner is not None else None
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    found.add(value)
    return tuple(sorted(found))


# ------------------------------------------------------------------------------------------- copy


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are fresh meta tensors (no data copied)."""
    memo: dict[int, Any] = {}
    for param in module.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device=META), requires_grad=param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device=META)
    return trial_copy(module, memo)


def _parameter_infos(module: nn.Module) -> tuple[ParameterInfo, ...]:
    owners = dict(module.named_modules())
    # A tied pair (embedding and head) is kept whole by tensor parallelism: splitting one would untie it.
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return tuple(
        ParameterInfo(name, tuple(p.shape), p.element_size(), p.requires_grad,
                      uses[id(p)] == 1 and _splittable(owners, name, p))
        for name, p in module.named_parameters()
    )


def _splittable(owners: dict[str, nn.Module], name: str, param: Tensor) -> bool:
    """Whether tensor parallelism has a split for ``param`` (see :attr:`ParameterInfo.splittable`)."""
    if param.dim() == 3:  # a stack of experts' matrices, [experts, in, out]
        return True
    owner = owners[name.rpartition(".")[0]]
    return param.dim() == 2 and (layer_kind(owner) is not None or isinstance(owner, nn.MultiheadAttention))


# --------------------------------------------------------------------------------------- the step


def _run_step(module: nn.Module, batch: Any, notes: list[str]) -> tuple[Tensor, str]:
    step = getattr(module, "training_step", None)
    if step is not None:
        try:
            loss = _loss_of(step(batch, 0))
            if loss is not None:
                return loss, "training_step"
            notes.append("training_step returned no loss (manual optimization?): profiled forward(batch) instead")
        except Exception as err:  # noqa: BLE001 - any failure on meta tensors means: fall back to forward
            notes.append(f"training_step could not run on the copy ({type(err).__name__}: {err}):"
                         " profiled forward(batch) instead")
    output = module(*batch) if isinstance(batch, (tuple, list)) and step is None else module(batch)
    floats = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    if not floats:
        raise ValueError(f"{type(module).__name__}'s forward returned no floating-point tensor to take a loss of.")
    return sum(t.sum() for t in floats), "forward"  # type: ignore[return-value]


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, dict):
        output = output.get("loss")
    return output if isinstance(output, Tensor) and output.requires_grad else None


def _optimizer_states(module: nn.Module, notes: list[str]) -> tuple[OptimizerState, ...]:
    configure = getattr(module, "configure_optimizers", None)
    if configure is None:
        return _assumed(module, notes, "the module has no configure_optimizers")
    try:
        with _stand_in_trainer(module):
            config = configure()
        from lightning.pytorch.core.optimizer import _configure_optimizers

        optimizers = _configure_optimizers(config)[0]
    except Exception as err:  # noqa: BLE001 - the planner must not fail on what it only estimates
        return _assumed(module, notes, f"configure_optimizers failed on the meta copy ({type(err).__name__}: {err})")
    states = tuple(optimizer_state(o) for o in optimizers)
    notes.extend(s.note for s in states if s.note)
    return states


def _assumed(module: nn.Module, notes: list[str], why: str) -> tuple[OptimizerState, ...]:
    notes.append(f"{why}: assumed {UNKNOWN_STATE_TENSORS} optimizer state tensors per parameter, as Adam")
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    count = sum(1 for p in module.parameters() if p.requires_grad)
    return (OptimizerState("unknown", UNKNOWN_STATE_TENSORS, UNKNOWN_STATE_TENSORS * trainable, 4 * count),)


@contextmanager
def _stand_in_trainer(module: nn.Module) -> Iterator[None]:
    """Lets ``configure_optimizers`` read ``self.trainer.estimated_stepping_batches`` (schedulers) on the copy."""
    if not hasattr(module, "_trainer") or module._trainer is not None:
        yield
        return
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=1, max_steps=1, max_epochs=1)
    try:
        yield
    finally:
        module._trainer = None


class _SavedTensors:
    """Bytes of the tensors autograd saves for backward, in all and per block (parameters excluded)."""

    def __init__(self, module: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
        self._params = {id(p) for p in module.parameters()}
        self._blocks = blocks
        self._seen: dict[int, Tensor] = {}  # strong refs: ids must stay unique while counting
        self._current: list[str] = []
        self._stack = ExitStack()
        self._recording = True
        self.block_bytes: dict[str, int] = {}
        self.input_bytes: dict[str, int] = {}
        self.replicated_bytes: dict[str, int] = {}
        self._input_shapes: dict[str, torch.Size] = {}
        self.total_bytes = 0
        self.largest_in_blocks = 0
        self.largest_outside = 0

    def __enter__(self) -> _SavedTensors:
        for name, block in self._blocks:
            self._stack.callback(block.register_forward_pre_hook(self._enter(name)).remove)
            self._stack.callback(block.register_forward_hook(self._leave).remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._seen.clear()

    def stop(self) -> None:
        """Backward saves nothing that outlives it: stop counting before it runs."""
        self._recording = False

    def _enter(self, name: str):  # noqa: ANN202 - a hook factory
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if self._recording:
                self._current.append(name)
                tensors = [t for t in tree_flatten(args)[0] if isinstance(t, Tensor)]
                self.input_bytes[name] = sum(t.numel() * t.element_size() for t in tensors)
                if tensors:
                    self._input_shapes[name] = tensors[0].shape

        return hook

    def _leave(self, *_: Any) -> None:
        if self._recording and self._current:
            self._current.pop()

    def _pack(self, tensor: Tensor) -> Tensor:
        base = tensor if tensor._base is None else tensor._base
        if self._recording and id(base) not in self._params and id(base) not in self._seen:
            self._seen[id(base)] = base
            size = base.untyped_storage().nbytes()
            self.total_bytes += size
            if self._current:
                self.largest_in_blocks = max(self.largest_in_blocks, size)
                block = self._current[0]
                self.block_bytes[block] = self.block_bytes.get(block, 0) + size
                if base.shape == self._input_shapes.get(block):
                    self.replicated_bytes[block] = self.replicated_bytes.get(block, 0) + size
            else:
                self.largest_outside = max(self.largest_outside, size)
        return tensor


class CallCounter(TorchDispatchMode):
    """Counts the aten calls made under it; with ``subclass``, only those dispatched on that tensor subclass."""

    def __init__(self, subclass: type | None = None) -> None:
        super().__init__()
        self._subclass = subclass
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if self._subclass is None or any(issubclass(t, self._subclass) for t in types):
            self.count += 1
        return func(*args, **(kwargs or {}))


class _OperationCounter(TorchDispatchMode):
    """Counts the aten calls made inside each block, in its forward and in its backward, and the bytes of the
    step's large new tensors.

    Why a mode of our own: FlopCounterMode counts only the operators that have a FLOP formula, and
    tensor parallelism's overhead is per call, whatever the operator.
    """

    def __init__(self, blocks: dict[str, str]) -> None:
        super().__init__()
        self._blocks = blocks  # the names the module tracker may give a block -> the block's name
        self._modules = ModuleTracker()
        self.counts: dict[str, int] = {}
        self.large_allocation_bytes = 0

    def __enter__(self) -> _OperationCounter:
        self._modules.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._modules.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        for alias in self._blocks.keys() & self._modules.parents:
            name = self._blocks[alias]
            self.counts[name] = self.counts.get(name, 0) + 1
        out = func(*args, **(kwargs or {}))
        # A return without alias information is a new tensor, not a view or an input written in place.
        values = out if isinstance(out, (tuple, list)) else (out,)
        for returned, value in zip(func._schema.returns, values, strict=False):
            if returned.alias_info is None and isinstance(value, Tensor):
                size = value.numel() * value.element_size()
                if size >= LARGE_ALLOCATION_BYTES:
                    self.large_allocation_bytes += size
        return out


def _tracked_names(module: nn.Module, name: str) -> list[str]:
    """The names torch's module tracker (and ``FlopCounterMode``) may give the submodule ``name`` of ``module``.

    The tracker names a module by the path from the outermost module *called*, led by that module's class name.
    ``training_step`` often calls a child (``self.model(**batch)``), never the root: the block is then
    ``LlamaForCausalLM.model.layers.0``, not ``MyModule.model.model.layers.0``. One name per possible caller.
    """
    parts = name.split(".")
    names, owner = [], module
    for i in range(len(parts)):
        names.append(".".join([type(owner).__name__, *parts[i:]]))
        owner = getattr(owner, parts[i], None)
        if owner is None:
            break
    return names


def _flops(counts: dict[str, dict[Any, int]], names: list[str]) -> int:
    """FLOPs counted under the first of ``names`` the counter knows (one caller per step)."""
    return next((sum(counts[n].values()) for n in names if n in counts), 0)


def _batch_size(batch: Any) -> int:
    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor) and t.dim() > 0]
    return int(tensors[0].shape[0]) if tensors else 0


def _product(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def stage_costs(profile: ModelProfile) -> list[float] | None:
    """What a run balances pipeline stages by: each block's forward FLOPs (``None``: parameter counts)."""
    flops = [float(b.forward_flops) for b in profile.blocks]
    return flops if any(flops) else None
