"""Predicted per-rank peak memory and step time of one plan, from a model and a hardware profile.

Memory is what the rank holds at its peak, in the order the step allocates it: the state at rest
(parameters, optimizer state; sharded as the plan says), then the step's gradients, activations
and temporaries (the profile's MemTracker peak), plus what sharding adds in flight (gathered units,
reduce-scatter and bucket buffers). On CPU the strategy builds the whole model on every rank before
sharding it, so a sharded plan also peaks once at setup, with the whole model and its first shard; and
where parti leaves glibc's allocator alone, the freed memory it keeps is counted too. Every rank also holds
the process's own memory and what its first step adds whatever the model (kernels' code, Lightning's loop).

Time is compute (FLOPs over a rate, plus the recomputed forward of checkpointed blocks), the
optimizer step (the timed block's step scaled by the bytes stepped, else the bytes it reads and writes over
the copy rate), the collectives
(bus-bandwidth formulas), page faults (ZeRO-2/3 on CPU) and framework costs (Lightning's loop;
DTensor's dispatch under tensor parallelism), summed: parti averages gradients after backward and
gloo does not overlap, so nothing hides behind compute. The rate is the one a block of this model
reached when timed on this machine at the same samples per call (:mod:`~parti_lightning.planner.timing`),
else the measured matmul rate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from parti_lightning.parallel import shards_module
from parti_lightning.parallel.data import DEFAULT_BUCKET_BYTES
from parti_lightning.plan import ResolvedPlan
from parti_lightning.planner.hardware import HardwareProfile
from parti_lightning.planner.profile import ModelProfile, stage_costs

# FSDP2 holds one unit's parameters gathered while prefetching the next (ZeRO-3).
_UNITS_IN_FLIGHT = 2
# The share of a step's activations glibc's heap keeps freed in a data-parallel CPU rank (see _heap_retained).
_HEAP_KEPT = 0.85
# The margin, as a share of the predicted heap, by technique: the most a rank's peak was measured beyond its
# prediction, over that heap, on Llama, GPT-2, BERT, CharGPT and GPT-NeoX (see Estimate.margin_bytes).
HEAP_MARGIN_SHARES: dict[str, float] = {
    "data": 0.3,  # ddp, ZeRO-1: 0.27 (GPT-NeoX 6x384)
    "checkpointing": 1.2,  # 1.17 (GPT-NeoX 6x384; 0.34 on the others)
    "pipeline": 1.2,  # 1.17 (GPT-NeoX 6x384; 0.40 on the others)
    "tensor": 1.8,  # 1.80 (GPT-NeoX 6x384; 1.20 on the others)
}


@dataclass(frozen=True)
class Estimate:
    """One plan's predicted peak memory per rank and step time, with their parts.

    Attributes:
        memory: bytes per part at the step's peak (``parameters``, ``gradients``, ``optimizer``,
            ``activations``, ``in_flight``, ``allocator``: freed memory glibc keeps, ``overhead``).
        setup_bytes: the setup peak (whole model plus its first shard), 0 when the model is never whole.
        time: seconds per part of one step (``compute``, ``recompute``, ``optimizer``, ``communication``,
            ``framework``: Lightning's loop and DTensor's dispatch; ``page_faults``: ZeRO-2/3 on CPU).
        margin_bytes: how much more the peak may measure than predicted, kept free when the planner asks
            whether the plan fits. The freed heap glibc keeps (``allocator``) is the one part that varies from
            model to model (and a little from run to run), where the rest came within -9..+9% but for two
            checkpointed plans (+14, +20%; runs with ``MALLOC_MMAP_THRESHOLD_`` fixed). Measured against its
            prediction on Llama, GPT-2, BERT and CharGPT, on 2 ranks (two runs) and on 4 (the heap taken as the
            difference of each run with and without the threshold fixed): ddp, ZeRO-1 and checkpointing 0.79-1.21
            times, pipelines 0.43-1.37, tensor parallelism 0.86-2.17; on GPT-NeoX, held out from those, up to 1.87
            with checkpointing, 1.71 under a pipeline, 2.34 under tensor parallelism. The margin covers the most
            measured beyond the predicted peak, as a share of the predicted heap: 0.3 under ddp and ZeRO-1, 1.2 with
            checkpointing or under a pipeline, 1.8 under tensor parallelism (the largest that applies). Every other
            part, none.
    """

    memory: dict[str, int]
    setup_bytes: int
    time: dict[str, float]
    margin_bytes: int = 0

    @property
    def step_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def peak_bytes(self) -> int:
        return max(self.step_bytes, self.setup_bytes + self.memory.get("overhead", 0))

    @property
    def needed_bytes(self) -> int:
        """The memory the planner asks of the budget: the peak and its margin."""
        return self.peak_bytes + self.margin_bytes

    @property
    def seconds(self) -> float:
        return sum(self.time.values())


# A technique's term: the cost of the plan so far, changed by what the technique does to one step.
Term = Callable[["_Cost", ModelProfile, HardwareProfile, ResolvedPlan, int], None]


@dataclass
class _Cost:
    memory: dict[str, int]
    time: dict[str, float]
    setup_bytes: int = 0
    # What this rank holds of the model after the model-parallel terms (pipeline, tensor): the storage term
    # shards that, and the activation term checkpoints the trunk's part of the activations.
    held_parameter_bytes: int = 0
    trunk_activation_bytes: int = 0
    trunk_blocks_held: float = 0.0
    # The rank's activations before checkpointing: what glibc's heap grows to hold (see _heap_retained).
    uncheckpointed_activation_bytes: int = 0


def estimate(profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan, ranks_per_node: int) -> Estimate:
    """Predict ``plan`` (resolved) for ``profile`` on ``hardware``.

    Starts from one process holding and computing everything, then applies one term per technique in
    the order ``parallelize`` applies the techniques.
    """
    cost = _single_process(profile, hardware)
    for term in _TERMS:
        term(cost, profile, hardware, plan, ranks_per_node)
    cost.memory["allocator"] = _heap_retained(cost, profile, hardware, plan)
    cost.memory["overhead"] = hardware.process_overhead_bytes + hardware.step_fixed_bytes
    return Estimate(cost.memory, cost.setup_bytes, cost.time, int(_heap_margin_share(plan) * cost.memory["allocator"]))


def _heap_margin_share(plan: ResolvedPlan) -> float:
    """The share of the predicted heap kept free as margin: the most a peak was measured beyond its prediction, over
    that heap, under the techniques this plan uses."""
    used = {"data": True, "checkpointing": plan.activation_checkpointing != "none", "pipeline": plan.pipeline > 1,
            "tensor": plan.tensor > 1}
    return max(spread for technique, spread in HEAP_MARGIN_SHARES.items() if used[technique])


def _single_process(profile: ModelProfile, hardware: HardwareProfile) -> _Cost:
    """One process: the whole model, its gradients (and the averaging bucket), its optimizer state."""
    memory = {
        "parameters": profile.parameter_bytes + profile.buffer_bytes,
        "gradients": profile.peak_gradient_bytes + min(DEFAULT_BUCKET_BYTES, profile.gradient_bytes),
        "optimizer": profile.optimizer_state_bytes + profile.optimizer_scalar_bytes,
        "activations": profile.transient_bytes,
        "in_flight": 0,
    }
    time = {"compute": profile.step_flops / _rate(profile, hardware), "recompute": 0.0,
            "optimizer": _optimizer_step_seconds(profile, hardware), "communication": 0.0,
            "framework": hardware.step_overhead_s}
    trunk = sum(b.activation_bytes for b in profile.blocks)
    return _Cost(memory, time, held_parameter_bytes=profile.parameter_bytes, trunk_activation_bytes=trunk,
                 trunk_blocks_held=float(len(profile.blocks)))


def _optimizer_step_seconds(profile: ModelProfile, hardware: HardwareProfile) -> float:
    """One optimizer step over the whole model: the timed block's, scaled by the bytes it steps; else, untimed, an
    Adam-like step's bytes (parameter, gradient and state read, parameter and state written) over the copy rate."""
    timing = profile.block_timing
    block = profile.blocks[0] if profile.blocks else None
    if timing is not None and timing.optimizer_seconds and block is not None and block.parameter_bytes:
        return timing.optimizer_seconds * profile.gradient_bytes / block.parameter_bytes
    step = 2 * profile.parameter_bytes + profile.gradient_bytes + 2 * profile.optimizer_state_bytes
    return step / hardware.memory_bandwidth_bytes_per_s


def _pipeline(
    cost: _Cost, profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan, ranks_per_node: int
) -> None:
    """The trunk in ``p`` stages: a rank holds one stage's blocks; the rest of the model runs on every rank.

    Time follows parti's pipelined trunk: the stage's forward and backward, each stretched by the
    schedule's bubble ``(p-1)/(m+p-1)``, plus under 1F1B the forward recomputed in the backward; two
    broadcasts of the trunk's boundary tensor over the pipeline ranks and one send per micro-batch and
    direction. Memory: GPipe keeps all ``m`` micro-batches' activations of the stage, 1F1B at most ``p``.

    The parameters outside the trunk are sharded over ``pipeline × data × shard`` (but under ZeRO-1): at
    rest a rank holds one shard of them; FSDP gathers them whole for the step (a root unit stays gathered
    from its forward to its backward), and reduce-scatters their whole gradients at its end.
    """
    p, m = plan.pipeline, plan.micro_batches
    if p == 1 or not profile.blocks:
        return
    block_params = [b.parameter_bytes for b in profile.blocks]
    stage = _largest_stage(block_params, p, stage_costs(profile))
    share = stage / max(sum(block_params), 1)
    trunk_params = sum(block_params)
    outside = profile.parameter_bytes - trunk_params
    if plan.storage != "optimizer":
        # The storage term divides what is held by `shard` again under ZeRO-2/3: leave that division to it.
        spread = p * plan.data * (plan.shard if plan.storage == "replicated" else 1)
        outside_held = outside // spread
        trainable = profile.gradient_bytes / max(profile.parameter_bytes, 1)
        cost.memory["in_flight"] += int((outside - outside_held) * (1 + trainable))
        ranks = p * plan.data * plan.shard
        copy = 2 * outside * (1 + trainable) / hardware.memory_bandwidth_bytes_per_s
        cost.time["communication"] += (_gather_seconds(outside, ranks, hardware, ranks_per_node)
                                       + _scatter_seconds(outside * trainable, ranks, hardware, ranks_per_node)
                                       + copy + 2 * hardware.collective_latency_s)
    else:
        outside_held = outside
    held = int(trunk_params * share) + outside_held
    _scale_state(cost, profile, held)
    cost.setup_bytes = profile.parameter_bytes + profile.buffer_bytes  # built whole, then split
    cost.trunk_blocks_held = len(profile.blocks) * share
    in_flight = _micro_batches_in_flight(plan)
    stage_activations = int(cost.trunk_activation_bytes * share * in_flight / m)
    boundary = profile.blocks[0].input_bytes
    cost.memory["activations"] += stage_activations - cost.trunk_activation_bytes + 2 * boundary
    cost.trunk_activation_bytes = stage_activations
    trunk_forward = sum(b.forward_flops for b in profile.blocks)
    trunk_step = trunk_forward + sum(b.backward_flops for b in profile.blocks)
    bubble = (p - 1) / (plan.virtual_stages * m + p - 1)  # interleaving v stages per rank divides it by ~v
    stretch = 1 / (1 - bubble)
    recomputed = trunk_forward if plan.schedule != "gpipe" else 0.0
    # The stage runs its blocks on micro-batches, which CPU kernels run at a lower rate than the whole batch.
    micro_rate = _rate(profile, hardware, (profile.batch_size or m) / m)
    micro_forward_rate = _rate(profile, hardware, (profile.batch_size or m) / m, forward=True)
    cost.time["compute"] += ((trunk_step / micro_rate + recomputed / micro_forward_rate) * share * stretch
                             - trunk_step / _rate(profile, hardware))
    bandwidth = _bandwidth(hardware, p, ranks_per_node)
    broadcasts = 2 * _one_way(boundary, p, bandwidth)  # trunk output and input gradient, to every stage
    sends = 2 * boundary / bandwidth + 2 * m * hardware.collective_latency_s
    cost.time["communication"] += broadcasts + sends + 2 * hardware.collective_latency_s


def _tensor(
    cost: _Cost, profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan, ranks_per_node: int
) -> None:
    """Each block's matrices (and embeddings or heads at least a block's size) split over ``t`` ranks.

    Megatron's layout: a block's compute and its activations inside the split layers are divided by ``t``
    (those shaped like the block's input, the residual stream's, stay whole);
    four all-reduces of the block's input per block and step (two forward, two backward) over the tensor ranks,
    each also waiting for the slowest rank (the hardware's measured skew, a share of the compute before it).
    """
    t = plan.tensor
    if t == 1 or not profile.blocks:
        return
    split = _tensor_split_bytes(profile)
    held_fraction = cost.held_parameter_bytes / max(profile.parameter_bytes, 1)
    held = cost.held_parameter_bytes - int(split * held_fraction * (1 - 1 / t))
    _scale_state(cost, profile, held)
    cost.setup_bytes = profile.parameter_bytes + profile.buffer_bytes  # built whole, then split
    # The split layers' activations are divided by t; the residual stream's (norms, dropout masks) stay whole.
    replicated = sum(b.replicated_activation_bytes for b in profile.blocks) / max(
        sum(b.activation_bytes for b in profile.blocks), 1)
    trunk = cost.trunk_activation_bytes
    kept = int(trunk * (replicated + (1 - replicated) / t))
    cost.memory["activations"] -= trunk - kept
    cost.trunk_activation_bytes = kept
    blocks_held = cost.trunk_blocks_held / len(profile.blocks)
    block_step = sum(b.forward_flops + b.backward_flops for b in profile.blocks)
    whole_compute = block_step * blocks_held / _rate(profile, hardware)
    cost.time["compute"] -= whole_compute * (1 - 1 / t)
    # Every all-reduce also waits for the slowest tensor rank: a share of the split compute before it.
    split_compute = whole_compute / t
    # A block's activations are small messages, which move slower than the gradient buckets the bandwidth
    # was measured with.
    size = profile.blocks[0].input_bytes
    bandwidth = hardware.bandwidth_at(size) if t <= ranks_per_node else hardware.internode_bandwidth
    per_block = 4 * (_all_reduce(size, t, bandwidth) + hardware.collective_latency_s)
    # A trunk pipelined under 1F1B runs its stage's blocks forward twice (then recomputed): two more all-reduces.
    passes = 1.5 if plan.pipeline > 1 and plan.schedule != "gpipe" else 1.0
    cost.time["communication"] += per_block * cost.trunk_blocks_held * passes + hardware.collective_skew * split_compute
    # Every operator call in a split block goes through DTensor's dispatch, and the optimizer steps each DTensor
    # parameter on its own.
    timing = profile.block_timing
    calls = timing.operations if timing is not None else profile.blocks[0].operations
    cost.time["framework"] += (calls * cost.trunk_blocks_held * passes * hardware.dtensor_call_s
                               + len(profile.block_parameters) * blocks_held * hardware.dtensor_optimizer_parameter_s)


def _activation_checkpointing(
    cost: _Cost, profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan, ranks_per_node: int
) -> None:
    """Blocks keep only their inputs; their forward runs again in backward."""
    cost.uncheckpointed_activation_bytes = cost.memory["activations"]
    if plan.activation_checkpointing != "blocks" or not profile.blocks:
        return
    held = cost.trunk_blocks_held / len(profile.blocks)
    if plan.pipeline == 1 and plan.tensor == 1:
        cost.memory["activations"] = _activation_bytes(profile, plan)
    else:
        # The stage's (or split) trunk keeps its blocks' inputs and one block's activations in flight.
        trunk = cost.trunk_activation_bytes
        kept = min(trunk, int((sum(b.input_bytes for b in profile.blocks) + max(b.activation_bytes for b in
                                                                                  profile.blocks)) * held))
        cost.memory["activations"] += kept - trunk
        cost.trunk_activation_bytes = kept
    forward = sum(b.forward_flops for b in profile.blocks) * held / plan.tensor
    cost.time["recompute"] = forward / _rate(profile, hardware, forward=True)


def _storage(
    cost: _Cost, profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan, ranks_per_node: int
) -> None:
    """ZeRO-1/2/3 over the shard axis, or replicated gradient averaging over the data-parallel ranks."""
    n = plan.shard if plan.storage != "replicated" else 1
    cost.time["optimizer"] /= n  # each rank steps its share
    # What the model-parallel terms left this rank holding, as a share of the whole model.
    share = cost.held_parameter_bytes / max(profile.parameter_bytes, 1)
    cost.time["communication"] += share * _communication(profile, hardware, plan, ranks_per_node)
    if plan.storage == "replicated" or n == 1:
        return
    if plan.storage == "optimizer":
        owned = _zero1_largest_share(profile, n)
        cost.memory["optimizer"] = owned * profile.optimizer_tensors_per_parameter + profile.optimizer_scalar_bytes // n
        return
    cost.time["page_faults"] = _page_fault_seconds(profile, hardware) * share
    shard = int(_fsdp_shard_bytes(profile, n) * share)
    params = cost.held_parameter_bytes
    blocks = [b.parameter_bytes for b in profile.blocks]
    # The root unit (what no block holds: embeddings, head) and the largest block unit, as this rank holds them.
    root, block = int((profile.parameter_bytes - sum(blocks)) * share), int(max(blocks, default=0) * share)
    trainable_share = profile.gradient_bytes / max(params, 1)
    # ZeRO-2 keeps every unit gathered from its forward to its backward. ZeRO-3 only those in flight: FSDP2
    # keeps the root gathered from its forward to its backward, and prefetches the next block.
    gathered = params if plan.storage == "gradients" else min(params, root + _UNITS_IN_FLIGHT * block)
    cost.memory.update({
        "parameters": shard + profile.buffer_bytes,
        # Gradients are reduce-scattered unit by unit: a block's whole gradients and the reduce-scatter input
        # exist until its shard is written. At the step's peak (the forward's end) none exist yet; the blocks'
        # come while activations are freed, the root's last, when the activations are gone.
        "gradients": int(shard * trainable_share) + 2 * block,
        "optimizer": int(shard * trainable_share) * profile.optimizer_tensors_per_parameter
        + profile.optimizer_scalar_bytes,
        # The all-gather output is copied out into the unit's parameters: briefly one unit twice. At the step's
        # peak (the forward's end) the unit gathered is the last block, prefetched for backward: the root, often
        # larger, stays gathered from its forward on.
        "in_flight": cost.memory["in_flight"] + gathered + block,  # plus what a pipeline root gathers
    })
    # On CPU the strategy builds the whole model on every rank before sharding it.
    cost.setup_bytes = profile.parameter_bytes + shard


# In `parallelize`'s order: pipeline split, tensor parallel, activation checkpointing, storage.
_TERMS: tuple[Term, ...] = (_pipeline, _tensor, _activation_checkpointing, _storage)


def _scale_state(cost: _Cost, profile: ModelProfile, held: int) -> None:
    """This rank now holds ``held`` parameter bytes: its gradients and optimizer state shrink with them."""
    ratio = held / max(cost.held_parameter_bytes, 1)
    cost.held_parameter_bytes = held
    cost.memory["parameters"] = held + profile.buffer_bytes
    cost.memory["gradients"] = int(cost.memory["gradients"] * ratio)
    scalars = profile.optimizer_scalar_bytes
    cost.memory["optimizer"] = int((cost.memory["optimizer"] - scalars) * ratio) + scalars
    cost.time["optimizer"] *= ratio


def _heap_retained(cost: _Cost, profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan) -> int:
    """Freed memory glibc keeps resident in a CPU rank whose allocator parti leaves alone (all but ZeRO-2/3).

    glibc raises its mmap threshold to each large block freed, so after the first step a step's activations
    and temporaries come from the heap, and the next step's allocations, in another order, reuse its freed
    chunks only in part: resident memory creeps up over the first steps (ddp on the example, 2 CPU ranks:
    148, 197, 210, 216 MiB after steps 1-4; 149 MiB throughout with ``MALLOC_MMAP_THRESHOLD_`` fixed). The
    growth follows what the step allocates, not what it keeps: over 8 steps 0.61-0.94 (mean 0.85) times the
    step's activations before checkpointing under ddp, ZeRO-1 and tensor parallelism, with or without
    checkpointing, which allocates the same activations but frees them sooner (benchmarks/planner_accuracy.py,
    two model sizes, the step's fixed memory taken out). Nothing where the threshold is fixed (ZeRO-2/3
    ranks, or the user's ``MALLOC_MMAP_THRESHOLD_``).

    A pipeline rank's heap depends on what else it frees. Its stage runs on micro-batches, whose slices of
    the trunk's activations are small and of the same sizes every step: where nothing larger is freed (the
    example's CharGPT: a 65-token vocabulary, 1 MiB matrices) it kept only about one micro-batch's (0.37
    times its own activations; this rule over-predicts it by about 20%). Where the rank also frees, every
    step, a chunk at least as large as the trunk's largest activation at the whole batch (a vocabulary-sized
    embedding's gradient, the logits: every Hugging Face model measured), those sizes mix in the heap and it
    kept as much as an unsplit step's: 0.91-1.02 times the whole step's activations on Llama, GPT-2 and
    BERT (measured as the difference of each run with and without ``MALLOC_MMAP_THRESHOLD_`` fixed).
    """
    if hardware.device_type != "cpu" or shards_module(plan) or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return 0
    kept = cost.uncheckpointed_activation_bytes
    freed_outside = max(profile.largest_parameter_bytes, profile.largest_outside_activation_bytes)
    if plan.pipeline > 1 and freed_outside >= profile.largest_trunk_activation_bytes > 0:
        kept = max(kept, profile.transient_bytes)
    return int(_HEAP_KEPT * kept)


def _micro_batches_in_flight(plan: ResolvedPlan) -> int:
    """Micro-batches whose stage activations a pipeline rank holds at once: GPipe all, 1F1B at most ``pipeline``."""
    return plan.micro_batches if plan.schedule == "gpipe" else max(min(plan.pipeline, plan.micro_batches), 1)


def _rate(
    profile: ModelProfile, hardware: HardwareProfile, samples: float | None = None, forward: bool = False
) -> float:
    """FLOP/s of this model's compute at ``samples`` per call (default: the batch): its timed block's when the
    profile has one, else the matmul rate. ``forward``: of a forward alone (what checkpointing recomputes), where
    the block's forward was timed apart."""
    timing = profile.block_timing
    block = profile.blocks[0] if profile.blocks else None
    if timing is None or block is None or not block.forward_flops:
        return hardware.flops_per_s
    batch = profile.batch_size or 1
    samples = samples or batch
    seconds = timing.seconds_at(samples)
    if forward and timing.forward_share is not None:
        return block.forward_flops * samples / batch / (seconds * timing.forward_share)
    return (block.forward_flops + block.backward_flops) * samples / batch / seconds


def _largest_stage(block_bytes: list[int], stages: int, costs: list[float] | None) -> int:
    """Bytes of the largest stage when the blocks are cut as a run cuts them (by ``costs``, else parameters)."""
    from parti_lightning.parallel.pipeline.cuts import stage_starts

    starts = stage_starts([str(i) for i in range(len(block_bytes))], stages, costs=costs or block_bytes)
    ends = [*starts[1:], len(block_bytes)]
    return max(sum(block_bytes[a:b]) for a, b in zip(starts, ends, strict=True))


def _tensor_split_bytes(profile: ModelProfile) -> int:
    """Parameter bytes tensor parallelism splits: the blocks' matrices, and matrices outside the blocks at
    least a block's size (embeddings, output head), as its automatic rules do. Vectors stay replicated, and so
    do matrices no rule splits (a convolution's kernel)."""
    inside = {p.name for p in profile.block_parameters}
    block_numel = max((b.parameter_bytes for b in profile.blocks), default=0)
    return sum(
        p.bytes
        for p in profile.parameters
        if len(p.shape) >= 2 and p.splittable and (p.name in inside or p.bytes >= block_numel)
    )


# ------------------------------------------------------------------------------------------ memory


def _activation_bytes(profile: ModelProfile, plan: ResolvedPlan) -> int:
    """Activations and temporaries at the peak; under checkpointing, blocks keep only their inputs.

    A checkpointed step peaks at the forward's end, with the blocks' inputs and what the rest of the model saved
    (no block runs again before the loss's backward is done), or in the trunk's backward, with the inputs, one
    block's activations recomputed and their gradients. (Counting a block's activations at the forward's end too
    over-predicted ZeRO-3 with checkpointing, where glibc keeps no heap, by 11% on average on Hugging Face models;
    now by 4%.)
    """
    transient = profile.transient_bytes
    if plan.activation_checkpointing != "blocks" or not profile.blocks:
        return transient
    saved = sum(b.activation_bytes for b in profile.blocks)
    inputs = sum(b.input_bytes for b in profile.blocks)
    return max(transient - saved + inputs, inputs + 2 * max(b.activation_bytes for b in profile.blocks))


def _largest_unit_bytes(profile: ModelProfile) -> int:
    """The largest FSDP unit: a block, or the root with every parameter no block holds."""
    blocks = [b.parameter_bytes for b in profile.blocks]
    return max([*blocks, profile.parameter_bytes - sum(blocks)])


def _fsdp_shard_bytes(profile: ModelProfile, n: int) -> int:
    """The largest rank's share: FSDP2 splits each parameter's first dimension into ``n`` chunks, padded."""
    return sum(math.ceil(p.shape[0] / n) * (p.numel // p.shape[0]) * p.element_size if p.shape else p.bytes
               for p in profile.parameters)


def _zero1_largest_share(profile: ModelProfile, n: int) -> int:
    """Parameter bytes the busiest rank owns: ZeroRedundancyOptimizer assigns whole parameters,
    largest first, each to the rank that owns the fewest bytes so far."""
    loads = [0] * n
    for size in sorted((p.bytes for p in profile.parameters if p.requires_grad), reverse=True):
        loads[loads.index(min(loads))] += size
    return max(loads)


# -------------------------------------------------------------------------------------------- time


def _communication(
    profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan, ranks_per_node: int
) -> float:
    world = plan.data * plan.shard
    if world == 1:
        return 0.0
    calls, copied = _collective_calls(profile, plan)
    copy_rate = hardware.memory_bandwidth_bytes_per_s
    if plan.storage in ("gradients", "parameters") and plan.shard > 1 and hardware.device_type == "cpu":
        copy_rate = hardware.fresh_memory_bandwidth_bytes_per_s or copy_rate  # FSDP's copies land in new pages
    return (_volume_seconds(profile, hardware, plan, ranks_per_node) + calls * hardware.collective_latency_s
            + copied / copy_rate)


def _collective_calls(profile: ModelProfile, plan: ResolvedPlan) -> tuple[int, float]:
    """Collective calls per step, and bytes copied around them (read + write) outside the collective."""
    grads, params = profile.gradient_bytes, profile.parameter_bytes
    # GradientSynchronizer: one all-reduce agreeing on which gradients exist, then flat buckets,
    # each copied in and out.
    buckets = 1 + math.ceil(grads / DEFAULT_BUCKET_BYTES)
    if plan.storage == "replicated" or plan.shard == 1:
        return buckets, 4 * grads
    if plan.storage == "optimizer":  # plus one broadcast per parameter from its owner
        return buckets + len(profile.parameters), 4 * grads
    units = len(profile.blocks) + 1
    gathers = 1 if plan.storage == "gradients" else 2
    # FSDP copies each gathered unit out of the all-gather buffer into fresh parameter memory (first
    # touched, hence page-faulted, on CPU) and each unit's gradients into the reduce-scatter input.
    return (gathers + 1) * units, 2 * (2 * gathers * params + 2 * grads)


def _volume_seconds(
    profile: ModelProfile, hardware: HardwareProfile, plan: ResolvedPlan, ranks_per_node: int
) -> float:
    params, grads = profile.parameter_bytes, profile.gradient_bytes
    world = plan.data * plan.shard
    flat = hardware.bandwidth_bytes_per_s if world <= ranks_per_node else hardware.internode_bandwidth
    if plan.storage == "replicated" or plan.shard == 1:
        return _all_reduce(grads, world, flat)
    if plan.storage == "optimizer":
        # Gradients are all-reduced whole; each owner then broadcasts its updated parameters, one call each, at
        # the rate messages of its size move (Llama 4x256's 39 parameters: 20.9 ms, where one broadcast of the
        # same bytes takes 6.6).
        within = plan.shard <= ranks_per_node
        return _all_reduce(grads, world, flat) + sum(
            _one_way(p.bytes, plan.shard, hardware.bandwidth_at(p.bytes) if within else hardware.internode_bandwidth)
            for p in profile.parameters)
    gathers = 1 if plan.storage == "gradients" else 2  # ZeRO-3 gathers again for backward
    seconds = (_scatter_seconds(grads, plan.shard, hardware, ranks_per_node)
               + gathers * _gather_seconds(params, plan.shard, hardware, ranks_per_node))
    if plan.data > 1:  # hybrid: replicas average their gradient shards across nodes
        seconds += _all_reduce(grads / plan.shard, plan.data, hardware.internode_bandwidth)
    return seconds


def _page_fault_seconds(profile: ModelProfile, hardware: HardwareProfile) -> float:
    """What a ZeRO-2/3 CPU rank pays to fault in its step's large tensors: parti returns freed memory to the OS
    there (accelerator.release_freed_memory), so each is new memory; per byte, the measured difference between
    copying into new and into used memory."""
    fresh = hardware.fresh_memory_bandwidth_bytes_per_s
    if hardware.device_type != "cpu" or not fresh:
        return 0.0
    per_byte = max(0.0, 2 / fresh - 2 / hardware.memory_bandwidth_bytes_per_s)  # rates count read + write
    return profile.large_allocation_bytes * per_byte


def _bandwidth(hardware: HardwareProfile, ranks: int, ranks_per_node: int) -> float:
    return hardware.bandwidth_bytes_per_s if ranks <= ranks_per_node else hardware.internode_bandwidth


def _gather_seconds(size: float, ranks: int, hardware: HardwareProfile, ranks_per_node: int) -> float:
    """An all-gather of ``size`` bytes in all (FSDP's unit gathers), at its own measured rate within a node."""
    within = ranks <= ranks_per_node and hardware.all_gather_bandwidth_bytes_per_s
    return _one_way(size, ranks, within or _bandwidth(hardware, ranks, ranks_per_node))


def _scatter_seconds(size: float, ranks: int, hardware: HardwareProfile, ranks_per_node: int) -> float:
    """A reduce-scatter of ``size`` bytes in all (FSDP's gradients), at its own measured rate within a node."""
    within = ranks <= ranks_per_node and hardware.reduce_scatter_bandwidth_bytes_per_s
    return _one_way(size, ranks, within or _bandwidth(hardware, ranks, ranks_per_node))


def _all_reduce(size: float, ranks: int, bandwidth: float) -> float:
    return 2 * (ranks - 1) / ranks * size / bandwidth


def _one_way(size: float, ranks: int, bandwidth: float) -> float:
    """A reduce-scatter, all-gather or set of broadcasts of ``size`` bytes in all: half an all-reduce."""
    return (ranks - 1) / ranks * size / bandwidth
