"""Replicated data parallel: identical replicas, gradients averaged over the data-parallel group.

Written by hand on purpose. torch's ``DistributedDataParallel`` reducer assumes exactly one backward
per forward over a fixed set of used parameters, which is what trips Lightning's ``ddp`` strategy on
manual optimization with several optimizers (two backward passes, each touching part of the model)
and on parameters that are unused in some steps (``find_unused_parameters`` must then be set by the
user). Averaging the gradients that a backward actually produced has neither limit, needs no flag and
no wrapper around the user's module, and is bit-for-bit the same math.

Like DDP, the averaging overlaps backward: gradient hooks start asynchronous all-reduces of flat
buckets as they fill, and :meth:`GradientSynchronizer.sync` after backward only waits and copies the
averages back. How that stays correct without DDP's assumptions:

* **Which gradients exist.** At the first gradient of a backward pass, the autograd engine already
  knows which parameters this pass will reach (``torch._C._will_engine_execute_node``, what torch's
  own ``register_multi_grad_hook`` uses). Ranks agree on the union with one small asynchronous
  all-reduce; a parameter that this rank's pass does not reach is ready at once (its gradient, or
  zeros, enters the average), so ranks that used different parameters still start the same buckets.
* **Same order on every rank.** Buckets start in one fixed order, each once, on a process group of
  their own: launch times differ between ranks, the sequence of collectives never does, and nothing
  interleaves with collectives others run during backward (sync batch norm, ``all_gather`` with
  gradients) on the data-parallel group.
* **A gradient that changes after its bucket started** (a second backward before ``sync``, a
  reentrant checkpoint's inner backward): its average is discarded and its final local value
  averaged again after backward. The averages are copied into ``.grad`` only in ``sync``, so the
  local value is intact until then. Whether any rank has such a gradient travels in the last bucket
  (one extra element), so the common case costs no extra collective.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup, Work
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from parti_lightning.mesh import twin_group

# Gradients are averaged in flat buckets of about this size: few collectives, bounded extra memory.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
# The first bucket (the last layers' gradients, ready first) is smaller, so that communication starts
# early in backward, as DDP does.
FIRST_BUCKET_BYTES = 1024 * 1024
# Longest a backward waits for the other ranks' agreement on which gradients exist, once a bucket is
# ready: about the ranks' skew in a healthy run. Past it that step's buckets start after backward.
AGREEMENT_WAIT_S = 0.5
_POLL_S = 0.0001


class GradientSynchronizer:
    """Averages gradients over a process group, overlapping the all-reduces with backward.

    Only the parameters whose gradient a backward (or, with accumulation, the backward passes since
    the last synchronization) produced on some rank are averaged; a parameter used on some ranks but
    not others is averaged with zeros on the ranks that did not use it, exactly as in single-process
    training over the whole global batch. Tensor-parallel parameters (``DTensor``) have their local
    shard averaged with the ranks that hold the same shard.

    Args:
        module: the module whose gradients to average. Its parameters must already be identical
            on every rank (as after Lightning's ``_sync_module_states``).
        group: the data-parallel process group.
        bucket_bytes: size of the flat buckets gradients are averaged in.
        comm_group: a second group of the same ranks, for the bucket all-reduces alone (see the module
            docstring), as :class:`~parti_lightning.mesh.ParallelMesh` builds it; ``None`` builds one here,
            which every process of the job must then do at the same point (creating a group is collective).
        parameters: only these of ``module``'s parameters (those sharded storage leaves whole); all by default.
    """

    def __init__(
        self,
        module: nn.Module,
        group: ProcessGroup,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        comm_group: ProcessGroup | None = None,
        parameters: Iterable[nn.Parameter] | None = None,
    ) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.bucket_bytes = bucket_bytes
        self.enabled = True
        # `parameters()` skips shared parameters' repeats, so tied weights are averaged once.
        self._params = [p for p in (module.parameters() if parameters is None else parameters) if p.requires_grad]
        self._handles: list[RemovableHandle] = []
        self._comm: ProcessGroup | None = None
        if self.world_size == 1 or not self._params:
            return  # the average over one rank is the gradient itself
        self._owns_comm = comm_group is None  # a group given by the caller (the mesh) outlives this object
        self._comm = comm_group if comm_group is not None else twin_group(group)
        self._mask_device = torch.device("cpu") if "gloo" in str(dist.get_backend(self._comm)) else _device(
            self._params[0]
        )
        self._buckets = _static_buckets(self._params, bucket_bytes)
        self._bucket_of = [0] * len(self._params)
        for b, bucket in enumerate(self._buckets):
            for i in bucket:
                self._bucket_of[i] = b
        # Held, as DDP holds them, so every backward reuses these nodes and `_start_agreement` can ask the
        # engine about them without looking them up per step. (Had a parameter got a new one, its gradient
        # would only arrive unannounced: averaged after backward, still correct.)
        self._nodes = [torch.autograd.graph.get_gradient_edge(p).node for p in self._params]
        self._period = _Period(len(self._params), len(self._buckets))
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self._params)]

    # ------------------------------------------------------------------ during backward

    def _hook(self, index: int):  # noqa: ANN202 - a hook factory
        def hook(_: Tensor) -> None:
            self._on_gradient(index)

        return hook

    @torch.no_grad()
    def _on_gradient(self, index: int) -> None:
        period = self._period
        period.produced[index] = True
        if period.launched[self._bucket_of[index]]:
            period.late[index] = True  # its average is stale: averaged again in `sync`
            return
        if not self.enabled:
            return  # accumulating (`no_sync`): no collective until the boundary step
        task = torch._C._current_graph_task_id()
        if period.agreement is None:
            self._start_agreement(task)
        if task != period.task:
            # Another backward (a nested reentrant one, or a second one before `sync`) starts no
            # bucket; what it changes is in a bucket not started yet, or late.
            return
        if period.expected[index]:
            period.fired[index] = True
            period.pending[self._bucket_of[index]] -= 1
        if period.agreed is None and not self._agreement_done(period.pending[self._bucket_of[index]] == 0):
            return
        self._launch_ready()

    def _start_agreement(self, task: int) -> None:
        """First gradient of the period: tell the other ranks which gradients this period has."""
        period = self._period
        period.task = task
        if task != -1:
            # Why the private call: it is how torch itself (`register_multi_grad_hook`) asks the
            # engine which nodes the running backward will execute; no public API says it.
            for i, node in enumerate(self._nodes):
                period.expected[i] = bool(torch._C._will_engine_execute_node(node))
            for i, expected in enumerate(period.expected):
                period.pending[self._bucket_of[i]] += int(expected and not period.fired[i])
        mask = [a or b for a, b in zip(period.produced, period.expected, strict=True)]
        period.agreement_tensor = torch.tensor(mask, dtype=torch.int32, device=self._mask_device)
        period.agreement = dist.all_reduce(
            period.agreement_tensor, op=dist.ReduceOp.MAX, group=self._comm, async_op=True
        )

    def _agreement_done(self, bucket_ready: bool) -> bool:
        """Whether the ranks' agreement is in; waits a little for it when a bucket could start."""
        period = self._period
        assert period.agreement is not None
        if not period.agreement.is_completed():
            if not bucket_ready or period.gave_up:
                return False
            # Why wait at all: a CPU that runs ahead of its GPU (or a tiny model) can finish its whole
            # backward before the agreement's round trip, and nothing would overlap. Why bounded: a rank
            # blocked in another collective (sync batch norm) that our peer has not reached yet would
            # otherwise never come back; past the bound the buckets start in `sync`, as without overlap.
            deadline = time.monotonic() + AGREEMENT_WAIT_S
            while not period.agreement.is_completed():
                if time.monotonic() > deadline:
                    period.gave_up = True
                    return False
                time.sleep(_POLL_S)
        self._take_agreement()
        return True

    def _take_agreement(self) -> None:
        period = self._period
        assert period.agreement is not None and period.agreement_tensor is not None
        period.agreement.wait()
        agreed = [bool(v) for v in period.agreement_tensor.tolist()]
        period.agreed = agreed
        # Buckets in fixed order, those holding a gradient of this period on some rank.
        period.order = [b for b, bucket in enumerate(self._buckets) if any(agreed[i] for i in bucket)]

    def _launch_ready(self) -> None:
        """Start every bucket, in order, whose gradients are final; the last one waits for `sync`."""
        period = self._period
        while period.next + 1 < len(period.order) and period.pending[period.order[period.next]] == 0:
            self._launch(period.order[period.next])

    def _launch(self, bucket: int, late_flag: float | None = None) -> None:
        period = self._period
        assert period.agreed is not None
        params = [self._params[i] for i in self._buckets[bucket] if period.agreed[i]]
        grads = _local_grads(params)
        extra = [] if late_flag is None else [grads[0].new_full((1,), late_flag)]
        flat = torch.cat([g.reshape(-1) for g in grads] + extra)
        work = dist.all_reduce(flat, group=self._comm, async_op=True)
        period.launched[bucket] = True
        period.inflight.append((bucket, flat, work))
        period.next += 1

    # ------------------------------------------------------------------ after backward

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate local gradients without averaging (gradient accumulation steps)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @torch.no_grad()
    def sync(self) -> None:
        """Average the gradients produced since the last call over the group."""
        if not self.enabled or self._comm is None:
            return
        period = self._period
        if period.agreement is None:
            self._start_agreement(-1)  # no gradient reached this rank's hooks: its mask is what it produced
        if period.agreed is None:
            self._take_agreement()
        assert period.agreed is not None
        for i, (produced, agreed) in enumerate(zip(period.produced, period.agreed, strict=True)):
            if produced and not agreed:
                period.late[i] = True  # arrived after the agreement, in another backward
        while period.next < len(period.order):
            last = period.next == len(period.order) - 1
            self._launch(period.order[period.next], late_flag=float(any(period.late)) if last else None)
        averaged: list[tuple[int, Tensor]] = []
        for bucket, flat, work in period.inflight:
            work.wait()
            flat.div_(self.world_size)
            averaged.append((bucket, flat))
        any_late = bool(averaged[-1][1][-1] > 0) if averaged else self._any_late_without_buckets()
        late = self._agree_on_late() if any_late else [False] * len(self._params)
        for bucket, flat in averaged:
            self._copy_back(bucket, flat, late)
        self._average_now([i for i, is_late in enumerate(late) if is_late])
        self._period = _Period(len(self._params), len(self._buckets))

    def _any_late_without_buckets(self) -> bool:
        flag = torch.tensor([int(any(self._period.late))], dtype=torch.int32, device=self._mask_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._comm)
        return bool(flag.item())

    def _agree_on_late(self) -> list[bool]:
        mask = torch.tensor(self._period.late, dtype=torch.int32, device=self._mask_device)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self._comm)
        return [bool(v) for v in mask.tolist()]

    def _copy_back(self, bucket: int, flat: Tensor, late: list[bool]) -> None:
        agreed = self._period.agreed
        assert agreed is not None
        offset = 0
        for i in self._buckets[bucket]:
            if not agreed[i]:
                continue
            grad = _local(self._params[i].grad)
            if not late[i]:
                grad.copy_(flat[offset : offset + grad.numel()].view(grad.shape))
            offset += grad.numel()

    def _average_now(self, indices: list[int]) -> None:
        """Average these gradients after backward, in flat buckets (gradients that changed late)."""
        params = [self._params[i] for i in indices]
        for chunk in _chunks(_local_grads(params), self.bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in chunk])
            dist.all_reduce(flat, group=self._comm)
            flat.div_(self.world_size)
            offset = 0
            for grad in chunk:
                grad.copy_(flat[offset : offset + grad.numel()].view(grad.shape))
                offset += grad.numel()

    def remove(self) -> None:
        """Remove the hooks from the parameters and release the synchronizer's process group."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._nodes = []
        if self._comm is not None:
            # With collectives still in flight (a backward that failed before `sync`), waiting could
            # wait for a dead rank: the group is then left to the default group's teardown.
            if self._owns_comm and not self._period.inflight and self._period.agreement is None:
                dist.destroy_process_group(self._comm)
            self._comm = None


class _Period:
    """What happened to the gradients since the last ``sync`` (indices are parameter positions)."""

    def __init__(self, n: int, buckets: int) -> None:
        self.produced = [False] * n  # a gradient arrived on this rank
        self.expected = [False] * n  # the first backward of the period reaches it on this rank
        self.fired = [False] * n  # it arrived in that backward
        self.late = [False] * n  # it changed after its bucket started, or arrived after the agreement
        self.task = -1  # the autograd graph task whose gradients start buckets
        self.agreement: Work | None = None
        self.agreement_tensor: Tensor | None = None
        self.agreed: list[bool] | None = None  # some rank has this gradient in this period
        self.order: list[int] = []  # buckets to average, in launch order
        self.pending = [0] * buckets  # per bucket: its gradients this backward has still to deliver here
        self.gave_up = False  # the agreement came too late to start buckets during this backward
        self.launched = [False] * buckets
        self.next = 0  # position in `order` of the next bucket to start
        self.inflight: list[tuple[int, Tensor, Work]] = []


def _static_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[int]]:
    """Parameter indices in buckets of one dtype and device, in reverse order (backward's order)."""
    buckets: list[list[int]] = []
    size, key = 0, None
    for i in reversed(range(len(params))):
        local = _local(params[i])
        nbytes = local.numel() * local.element_size()
        cap = min(FIRST_BUCKET_BYTES, bucket_bytes) if len(buckets) == 1 else bucket_bytes
        if buckets and (local.dtype, local.device) == key and size + nbytes <= cap:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size, key = nbytes, (local.dtype, local.device)
    return buckets


def _local_grads(params: list[nn.Parameter]) -> list[Tensor]:
    """Each parameter's gradient (zeros where it has none), as a plain local tensor."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            raise NotImplementedError("parti data parallel does not average sparse gradients yet.")
        grads.append(_local(p.grad))
    return grads


def _local(tensor: Tensor | None) -> Tensor:
    # A DTensor's local shard: its data-parallel peers hold the same shard, so averaging it is
    # averaging the gradient. `to_local` outside autograd returns the shard itself, so copies land in it.
    assert tensor is not None
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _device(param: nn.Parameter) -> torch.device:
    return _local(param).device


def _chunks(grads: list[Tensor], bucket_bytes: int) -> Iterator[list[Tensor]]:
    chunk: list[Tensor] = []
    size = 0
    for grad in grads:
        if chunk and (grad.dtype != chunk[0].dtype or grad.device != chunk[0].device
                      or size + grad.nbytes > bucket_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(grad)
        size += grad.nbytes
    if chunk:
        yield chunk
