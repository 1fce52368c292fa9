"""How a pipelined trunk runs: the user's block calls intercepted, the trunk as one autograd operation.

When the user's forward calls the first block, :class:`_TrunkFunction` runs the whole trunk on
``torch.distributed.pipelining``:

- forward: the micro-batches run through the stages; the last stage broadcasts the trunk's output
  to every pipeline rank, which the later blocks' calls then hand on unchanged;
- backward: the incoming gradient is the last stage's loss target (surrogate loss
  ``(out * grad).sum()``), backpropagated through every stage, accumulating each stage's parameter
  gradients; stage 0 broadcasts the input gradient so the replicated layers before the trunk get
  the same gradient on every rank.

torch's schedules want the loss computed on the last stage by a ``loss_fn`` within one ``step()``; a
Lightning ``training_step`` computes its loss itself, after the trunk, and its ``self.log`` calls
must see that loss on every rank. Two ways around that, by schedule:

- ``"gpipe"``: the schedule's forward and backward phases run apart
  (:class:`~parti_lightning.parallel.pipeline.phases.PhasedGPipe`); each stage keeps its
  micro-batches' activations between them, as GPipe does. No recompute.
- ``"1f1b"`` and ``"interleaved-1f1b"``: 1F1B interleaves forward and backward passes, which cannot
  be separated, so the forward is a forward-only pass and the backward re-runs the trunk under the
  schedule. One extra trunk forward per step buys 1F1B's memory: at most ``pipeline`` micro-batches'
  activations in flight, and none held between forward and backward. Interleaved, a rank holds
  several stages (``r, r + p, ...``), which shortens the bubble.

Dropout masks are the same in a recompute: each (stage, micro-batch) runs under a seed drawn once per
call from the global generator, which advances identically on every rank.

When the blocks' extra arguments differ by layer (Gemma 2's masks), or a block takes a value an earlier block
returned (T5's position bias), the trunk runs at the last block's call instead, once every block's arguments
are known; the earlier calls get stand-ins (:meth:`PipelinedTrunk.intercept`). A handed value travels between
stages beside the hidden state, its shape probed once on the first stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from parti_lightning.parallel.pipeline.arguments import (
    crossing_values,
    handed_in,
    leaves,
    shaped_like,
    split_extras,
    template_key,
)
from parti_lightning.parallel.pipeline.contract import (
    TrunkLayout,
    filled_cache_message,
    first_output,
    output_template,
    same_arguments,
)
from parti_lightning.parallel.pipeline.extras import GradExtras
from parti_lightning.parallel.pipeline.phases import PhasedGPipe
from parti_lightning.parallel.scratch import CacheTemplates, filled_caches, fresh_caches

_Schedule = PipelineScheduleSingle | PipelineScheduleMulti
SCHEDULES: dict[str, type[_Schedule]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
}
# Schedules that run several stages per rank (torch's PipelineScheduleMulti).
INTERLEAVED = ("interleaved-1f1b",)

@dataclass
class _Call:
    """One run of the trunk: the extra block arguments of each micro-batch, the dropout seed, and how it runs."""

    micro_batches: int
    # Per micro-batch, each block's extra arguments (the same object for every block unless they differ).
    extras: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]
    seed: int | None
    # Whether the forward keeps its activations for the backward (GPipe under autograd), and then the
    # schedule that holds them (until its next kept forward, which may be another call's).
    kept: bool = False
    kept_by: PhasedGPipe | None = None
    input_leaves: dict[int, Tensor] | None = None
    # Extra arguments that carry gradients (an encoder's output into decoder blocks); None: none do.
    grad_extras: GradExtras | None = None
    # Values a block returns and later blocks take (T5's position bias): the stand-in each later block got, by
    # id, -> (producing block, output position); and those carried between stages, in the order they travel.
    handed: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Per stage boundary (after stage b), the handed values that cross it: made before, taken after.
    boundaries: list[list[tuple[int, int]]] = field(default_factory=list)


class PipelinedTrunk:
    """The pipelined trunk of one module on one rank: stage construction, call interception, schedules.

    Built by :func:`~parti_lightning.parallel.pipeline.apply_pipeline`, which then frees the blocks of
    other stages (:func:`free_block`) and routes the user's block calls here (:func:`route_block_calls`).
    """

    def __init__(
        self,
        blocks: list[tuple[str, nn.Module]],
        starts: list[int],
        group: ProcessGroup,
        micro_batches: int,
        schedule: str,
        device: torch.device,
        layout: TrunkLayout | None = None,
    ) -> None:
        self.names = [name for name, _ in blocks]
        # Blocks whose extra arguments differ (per-layer masks): the trunk runs at the last block's call, when
        # all are known; the earlier calls return a stand-in of the structure the blocks return.
        self.per_block_extras = layout is not None and layout.per_block_extras
        self.output_template = layout.output_template if layout is not None else None
        self.tensor_elements = layout.tensor_elements if layout is not None and layout.handed else ()
        self._handed: dict[int, tuple[tuple[int, int], Tensor]] = {}  # stand-ins given out in this pass
        self.blocks = [block for _, block in blocks]
        self.starts = starts
        self.group = group
        self.micro_batches = micro_batches
        self.schedule = schedule
        self.device = torch.device(device)
        self.num_stages = len(starts)
        # Pipeline rank r holds stages r, r + p, r + 2p, ... (one per rank unless interleaved): rank 0
        # holds the first stage, rank p - 1 the last.
        self.rank, self.ranks = dist.get_rank(group), dist.get_world_size(group)
        self.stage_indices = list(range(self.rank, self.num_stages, self.ranks))
        ends = [*starts[1:], len(blocks)]
        self.held_indices = [i for s in self.stage_indices for i in range(starts[s], ends[s])]
        self.stage_modules = [
            _StageModule(self, [block for _, block in blocks[starts[s] : ends[s]]], s) for s in self.stage_indices
        ]
        # Why: a custom autograd Function is only backpropagated through if an input requires grad;
        # when the trunk's input does not (frozen embeddings), this empty leaf still routes the backward.
        self.anchor = torch.zeros(0, device=self.device, requires_grad=True)
        self.running = False
        self.call: _Call | None = None
        self._next = 0
        self._carry: Tensor | None = None
        self._extras: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._key = ""
        self._pending: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._input: Tensor | None = None
        self._templates: dict[str, Any] = {}
        self._schedules: dict[tuple, _Schedule] = {}

    @property
    def stage_param_ids(self) -> set[int]:
        """The ids of this stage's parameters, read now: tensor parallelism and FSDP replace parameter objects."""
        return {id(p) for module in self.stage_modules for p in module.parameters()}

    @property
    def holds_first(self) -> bool:
        return self.rank == 0

    @property
    def holds_last(self) -> bool:
        return self.rank == self.ranks - 1

    def stage_names(self) -> list[list[str]]:
        ends = [*self.starts[1:], len(self.names)]
        return [self.names[a:b] for a, b in zip(self.starts, ends, strict=True)]

    # --- the user's block calls

    def intercept(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call of block ``index`` from the user's forward: the trunk runs at the first block's call (or, when
        blocks get different extra arguments, at the last one's), the other calls hand its output on."""
        name = self.names[index]
        if index != self._next:
            expected = self.names[self._next]
            raise RuntimeError(
                f"pipelined trunk: block {name!r} was called where {expected!r} was expected; the trunk's blocks"
                " must be called once each, in order (see check_trunk_contract)"
            )
        if not args or not isinstance(args[0], Tensor):
            raise RuntimeError(
                f"pipelined trunk: block {name!r} must get the hidden state as its first positional argument"
            )
        extras = (args[1:], kwargs)
        if index == 0:
            filled = filled_caches(args, kwargs)
            if filled:
                raise RuntimeError(f"pipelined trunk: {filled_cache_message(name, filled)}")
            self._input, self._pending = args[0], []
        elif args[0] is not self._carry:
            raise RuntimeError(
                f"pipelined trunk: block {name!r} is not fed the output of {self.names[index - 1]!r}; code between"
                " blocks cannot change the hidden state of a pipelined trunk"
            )
        self._next = (index + 1) % len(self.names)
        if self.per_block_extras:
            self._pending.append(extras)
            if self._next != 0:  # not the last block yet: a stand-in, which only the next block reads
                self._carry = args[0].detach()
                return self._stand_in(index, self._carry)
            out, key = self._run(self._input, self._pending)
            self._carry = self._input = None
            self._pending, self._handed = [], {}
            return shaped_like(self._templates[key], out)
        if index == 0:
            out, self._key = self._run(args[0], [extras] * len(self.names))
            self._carry, self._extras = out, extras
        elif not same_arguments(extras, self._extras):
            raise RuntimeError(f"pipelined trunk: block {name!r} gets extra arguments different from the first block's")
        carry, key = self._carry, self._key
        if self._next == 0:  # the trunk is done: drop references to its graph and arguments
            self._carry, self._extras, self._input = None, None, None
        return shaped_like(self._templates[key], carry)

    def _stand_in(self, index: int, hidden: Tensor) -> Any:
        """What block ``index`` returns to the user's forward before the trunk has run: the structure its output has,
        ``hidden`` first, and an empty tensor standing for each value a later block may take (T5's position bias)."""
        if self.output_template is None:
            return hidden
        kind, length = self.output_template
        items: list[Any] = [hidden]
        for j in range(1, length):
            if j in self.tensor_elements:
                stand_in = torch.empty(0, device=hidden.device)
                self._handed[id(stand_in)] = ((index, j), stand_in)
                items.append(stand_in)
            else:
                items.append(None)
        return kind(items)

    def _run(self, x: Tensor, extras: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> tuple[Tensor, str]:
        """The trunk's output, and the key of the structure its blocks return (see ``_share_template``).

        ``extras``: each block's extra arguments, in block order.
        """
        call = self._plan_call(x, extras)
        anchor = self.anchor if torch.is_grad_enabled() else None
        grad_inputs = call.grad_extras.tensors if call.grad_extras is not None else []
        return _TrunkFunction.apply(self, call, x, anchor, *grad_inputs), template_key(call.extras[0][-1])

    def _plan_call(self, x: Tensor, extras: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> _Call:
        batch = x.shape[0]
        m = self.micro_batches
        if batch % m:
            if torch.is_grad_enabled():
                raise ValueError(
                    f"pipeline micro_batches={m} does not divide the batch of {batch} the trunk received; use a batch"
                    " size divisible by micro_batches (and drop_last=True)"
                )
            # Forward-only (validation's ragged last batch): fewer, equal micro-batches give the same values.
            m = max(d for d in range(1, m + 1) if batch % d == 0)
        # An (empty) cache handed to the trunk is scratch: each stage's run of each micro-batch gets its own.
        caches = CacheTemplates()
        caches.see((x, *extras[0][0]), extras[0][1])
        grad_extras = GradExtras(extras) if torch.is_grad_enabled() else None
        if grad_extras is not None and not grad_extras.tensors:
            grad_extras = None
        # Split once per distinct object: blocks that share their arguments keep sharing them.
        split: dict[int, list[Any]] = {}
        for e in extras:
            if id(e) in split:
                continue
            whole = grad_extras.detach(e) if grad_extras is not None else e
            split[id(e)] = [split_extras(whole, batch, m, i) for i in range(m)]
            if grad_extras is not None:
                for i, piece in enumerate(split[id(e)]):
                    for original, part in zip(leaves(whole), leaves(piece), strict=True):
                        if isinstance(original, Tensor):
                            grad_extras.note_slice(i, original, part)
            split[id(e)] = [caches.scratch(piece) for piece in split[id(e)]]
        per_micro = [[split[id(e)][i] for e in extras] for i in range(m)]
        # All blocks, freed ones included: every rank must agree on whether to draw a seed.
        training = any(block.training for block in self.blocks)
        seed = int(torch.randint(0, 2**62, ())) if training else None
        kept = torch.is_grad_enabled() and self.schedule == "gpipe"
        handed = {key: ref for key, (ref, _) in self._handed.items()}
        boundaries = crossing_values(extras, handed, self.starts, len(self.blocks))
        return _Call(m, per_micro, seed, kept=kept, grad_extras=grad_extras, handed=handed, boundaries=boundaries)

    # --- schedules

    def _schedule(self, call: _Call, x: Tensor, kind: str) -> _Schedule:
        """The schedule of ``kind``: ``"forward"`` (forward only), ``"kept"`` (phased GPipe), ``"training"``."""
        micro = (x.shape[0] // call.micro_batches, *x.shape[1:])
        key = (kind, call.micro_batches, micro, x.dtype, torch.is_inference_mode_enabled(), str(call.boundaries))
        backward = kind != "forward"
        cached = self._schedules.get(key)
        if cached is not None:
            return cached
        # Static shapes (every block keeps the hidden state's shape): no metadata exchange at start.
        # requires_grad tells the stage to allocate gradient buffers.
        example = torch.empty(micro, dtype=x.dtype, device="meta", requires_grad=backward)
        carried = [
            torch.empty(shape, dtype=dtype, device="meta", requires_grad=backward and grad)
            for shape, dtype, grad in self._carried_meta(call, x)
        ]
        last = self.num_stages - 1
        stages = [
            PipelineStage(
                module,
                module.stage_index,
                self.num_stages,
                self.device,
                input_args=(example,) if module.stage_index == 0 else (example, *carried),
                output_args=(example,) if module.stage_index == last else (example, *carried),
                group=self.group,
            )
            for module in self.stage_modules
        ]
        by_kind = {"kept": PhasedGPipe, "training": SCHEDULES[self.schedule], "forward": ScheduleGPipe}
        cls = by_kind[kind]
        # A sum, not a mean: the surrogate loss must not be rescaled per micro-batch. No loss_fn: forward
        # only, where scale_grads=False matters too: a schedule divides the stage's existing gradients by
        # the micro-batch count at the end of every step, backward or not, which would shrink gradients
        # accumulated by earlier backward passes.
        loss_fn = _surrogate_loss if backward else None
        if self.schedule in INTERLEAVED:
            # Forward-only too: its order fills the pipeline stage by stage, as the training schedule does.
            cls = SCHEDULES[self.schedule]
            schedule = cls(stages, call.micro_batches, loss_fn=loss_fn, scale_grads=False)
        else:
            schedule = cls(stages[0], call.micro_batches, loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = schedule
        return schedule

    def _carried_meta(self, call: _Call, x: Tensor) -> list[tuple[tuple[int, ...], torch.dtype, bool]]:
        """Shape, dtype and whether it requires grad of each value carried between stages, for one micro-batch.

        Why a probe: stages are built with static shapes, and only the first stage can know what its blocks hand
        on. It runs its blocks once on the first micro-batch (under the call's seed, no gradients) and tells
        the other pipeline ranks.
        """
        if not any(call.boundaries):
            return []
        box: list[Any] = [None]
        if self.holds_first:
            previous, self.call = self.call, call
            try:
                with torch.no_grad():
                    first = self.stage_modules[0]
                    outputs = first.run(x.detach()[: x.shape[0] // call.micro_batches], [], 0, probe=True)
                box[0] = [(tuple(t.shape), t.dtype, bool(t.is_floating_point())) for t in outputs[1:]]
            finally:
                self.call = previous
        dist.broadcast_object_list(box, group=self.group, group_src=0, device=self.device)
        return box[0]

    def forward(self, call: _Call, x: Tensor, input_grad: bool) -> Tensor:
        """The trunk's output on every pipeline rank; under ``call.kept``, the activations are kept for the backward."""
        indices = torch.arange(call.micro_batches)
        self.call = call
        try:
            if call.kept:
                schedule = self._schedule(call, x, "kept")
                assert isinstance(schedule, PhasedGPipe)  # noqa: S101
                call.kept_by = schedule
                call.input_leaves = {} if input_grad and self.holds_first else None
                if call.grad_extras is not None:
                    call.grad_extras.leaves = {}
                with torch.enable_grad():
                    out = schedule.forward_phase(call, *self._stage_args(x), micro_batch=indices)
            else:
                schedule = self._schedule(call, x, "forward")
                with torch.no_grad():
                    out = schedule.step(*self._stage_args(x), micro_batch=indices)
        finally:
            self.call = None
        last = self.ranks - 1
        out = out.detach().contiguous() if self.holds_last else torch.empty_like(x)
        dist.broadcast(out, group=self.group, group_src=last)
        self._share_template(call)
        return out

    def backward(self, call: _Call, x: Tensor, grad: Tensor, input_grad: bool) -> Tensor | None:
        """The trunk's input gradient on every pipeline rank (``None`` if not needed); stage gradients accumulate.

        The gradients of extra arguments that carry them are left in ``call.grad_extras`` (see ``extra_gradients``).
        """
        target = grad if self.holds_last else None
        if call.kept_by is not None and call.kept_by.kept_for is call:
            with torch.enable_grad():
                call.kept_by.backward_phase(target)
            call.kept_by = None
        else:
            # No kept activations: a non-GPipe schedule, a second backward through the same forward
            # (``retain_graph=True``), or the trunk ran again since. Recompute: the seeds and extras replay it.
            schedule = self._schedule(call, x, "training")
            indices = torch.arange(call.micro_batches)
            call.input_leaves = {} if input_grad and self.holds_first else None
            if call.grad_extras is not None:
                call.grad_extras.leaves = {}
            self.call = call
            try:
                with torch.enable_grad():
                    schedule.step(*self._stage_args(x), target=target, micro_batch=indices, return_outputs=False)
            finally:
                self.call = None
        if not input_grad:
            return None
        if self.holds_first:
            leaves = [call.input_leaves[i] for i in range(call.micro_batches)]
            grad_x = torch.cat([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves])
        else:
            grad_x = torch.empty_like(x)
        call.input_leaves = None
        dist.broadcast(grad_x, group=self.group, group_src=0)
        return grad_x

    def _stage_args(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x.detach(),) if self.holds_first else ()

    def _share_template(self, call: _Call) -> None:
        # Which structure (tensor, or tuple of what length) the blocks return, so every rank can hand
        # the trunk's output on in the same shape. Learned once per set of non-tensor arguments.
        key = template_key(call.extras[0][-1])  # what the last block returns is what the trunk hands on
        if key in self._templates:
            return
        box = [self.stage_modules[-1].template]
        dist.broadcast_object_list(box, group=self.group, group_src=self.ranks - 1, device=self.device)
        self._templates[key] = box[0]


class _StageModule(nn.Module):
    """This rank's blocks, run in order on one micro-batch; the submodule of the ``PipelineStage``."""

    def __init__(self, trunk: PipelinedTrunk, blocks: list[nn.Module], stage_index: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.stage_index = stage_index
        self.first_block = trunk.starts[stage_index]  # the trunk's index of this stage's first block
        self.template: Any = None
        # A plain attribute (object.__setattr__): the trunk is not a submodule.
        object.__setattr__(self, "trunk", trunk)

    def forward(self, x: Tensor, *carried: Tensor, micro_batch: Tensor) -> Tensor | tuple[Tensor, ...]:
        """This stage's blocks on one micro-batch: the hidden state, and the values carried to later stages."""
        trunk: PipelinedTrunk = self.trunk
        call = trunk.call
        assert call is not None, "the stage runs only inside a trunk call"  # noqa: S101
        index = int(micro_batch)
        if call.input_leaves is not None and self.stage_index == 0:
            # A leaf per micro-batch collects the gradient of stage 0's input, which the stage does not return.
            x = x.detach().requires_grad_()
            call.input_leaves[index] = x
        outputs = self.run(x, list(carried), index)
        return outputs if len(outputs) > 1 else outputs[0]

    def run(self, x: Tensor, carried: list[Tensor], index: int, probe: bool = False) -> tuple[Tensor, ...]:
        """The blocks on micro-batch ``index``: ``(hidden, *carried)`` (only the hidden state from the last stage)."""
        trunk: PipelinedTrunk = self.trunk
        call = trunk.call
        assert call is not None, "the stage runs only inside a trunk call"  # noqa: S101
        stage_extras = fresh_caches(call.extras[index][self.first_block : self.first_block + len(self.blocks)])
        if call.grad_extras is not None and not probe:
            stage_extras = call.grad_extras.leafify(index, stage_extras)
        # The first stage makes the carried values; every later one receives them with the hidden state.
        incoming = call.boundaries[self.stage_index - 1] if self.stage_index > 0 and call.boundaries else []
        produced = dict(zip(incoming, carried, strict=True))
        shape, dtype = x.shape, x.dtype
        with _seeded(call.seed, self.stage_index, index, call.micro_batches, trunk.device), _running(trunk):
            for offset, (block, extras) in enumerate(zip(self.blocks, stage_extras, strict=True)):
                args, kwargs = handed_in(extras, call.handed, produced)
                out = block(x, *args, **kwargs)
                if isinstance(out, (tuple, list)):
                    for j in trunk.tensor_elements:
                        produced[(self.first_block + offset, j)] = out[j]
                x = first_output(out)
                if not isinstance(x, Tensor) or x.shape != shape or x.dtype != dtype:
                    raise ValueError(
                        f"a pipelined block returned {type(x).__name__} {getattr(x, 'shape', '')} for a {tuple(shape)}"
                        f" {dtype} hidden state; blocks must keep the hidden state's shape and dtype"
                    )
        if not probe:
            self.template = output_template(out)
        last = self.stage_index == trunk.num_stages - 1
        outgoing = call.boundaries[self.stage_index] if call.boundaries and not last else []
        return (x, *(produced[ref].contiguous() for ref in outgoing))  # sent point to point: one contiguous buffer


class _TrunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, trunk: PipelinedTrunk, call: _Call, x: Tensor, anchor: Tensor | None, *extras: Tensor
    ) -> Tensor:
        # ``extras``: the extra block arguments that carry gradients (inputs here so autograd routes them back).
        ctx.trunk, ctx.call = trunk, call
        ctx.save_for_backward(x)
        return trunk.forward(call, x, input_grad=x.requires_grad)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        call: _Call = ctx.call
        # Running: a checkpointed block recomputed in this backward calls the block itself, not the trunk.
        with _running(ctx.trunk):
            grad_x = ctx.trunk.backward(call, x, grad, input_grad=ctx.needs_input_grad[2])
        extras: list[Tensor] = []
        if call.grad_extras is not None:
            extras = call.grad_extras.gradients(call.micro_batches, ctx.trunk.group)
        return None, None, grad_x, None, *extras


def _surrogate_loss(output: Tensor, target: Tensor) -> Tensor:
    # d/d(output) of sum(output * grad) is grad: backpropagating it from the last stage is
    # backpropagating the incoming gradient through the trunk.
    return (output * target).sum()


@contextlib.contextmanager
def _running(trunk: PipelinedTrunk) -> Iterator[None]:
    previous, trunk.running = trunk.running, True
    try:
        yield
    finally:
        trunk.running = previous


@contextlib.contextmanager
def _seeded(seed: int | None, stage: int, micro_batch: int, micro_batches: int, device: torch.device) -> Iterator[None]:
    """Run a stage's micro-batch under its own seed, leaving the global generators as they were.

    The same (call, stage, micro-batch) gets the same dropout masks in the forward pass and in the
    backward's recompute; and every rank's global generator stays identical, whatever its stage drew.
    """
    accel = torch.get_device_module(device.type) if device.type != "cpu" else None
    cpu_state = torch.get_rng_state()
    accel_state = accel.get_rng_state(device) if accel is not None else None
    if seed is not None:
        derived = (seed + stage * micro_batches + micro_batch) % 2**63
        torch.default_generator.manual_seed(derived)
        if accel is not None:
            with accel.device(device):
                accel.manual_seed(derived)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if accel is not None:
            accel.set_rng_state(accel_state, device)


