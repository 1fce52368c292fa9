"""GPipe with its forward and backward phases run apart, so the user's code can run in between.

torch's schedules run a step's forward and backward passes in one ``step()`` call, with the loss
computed in between by a ``loss_fn`` on the last stage. A Lightning ``training_step`` computes its
loss itself, after the trunk, on every rank. Of the schedules torch provides, GPipe's order (every
micro-batch forward, then every micro-batch backward) is the one whose two halves can be separated:
:class:`PhasedGPipe` runs the forward loop when the user's forward reaches the trunk, keeping each
micro-batch's activations on its stage, and the backward loop when autograd reaches the trunk, with
the incoming gradient as the last stage's target. No pass is recomputed.

Written by hand because nothing in torch splits a schedule's step; it drives the stage through the
same primitives, in the same order, as ``ScheduleGPipe._step_microbatches`` (fill, then drain).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.distributed.pipelining import ScheduleGPipe


class PhasedGPipe(ScheduleGPipe):
    """A GPipe schedule whose :meth:`forward_phase` and :meth:`backward_phase` are called separately.

    Built like ``ScheduleGPipe`` with a ``loss_fn`` taking ``(output, target)``; ``step()`` still
    runs both phases at once. Between the two phases the stage holds every micro-batch's activations,
    for the caller named by :attr:`kept_for` (``None`` once its backward ran or none was kept).
    """

    kept_for: object | None = None

    def forward_phase(self, owner: object, *args: Any, **kwargs: Any) -> Tensor | None:
        """Run every micro-batch forward, keeping its activations for ``owner``; the merged output on the last stage."""
        self.kept_for = None
        stage = self._stage
        stage.has_backward = True
        stage.clear_runtime_states()
        self._internal_losses.clear()
        arg_mbs, kwarg_mbs = self._split_inputs(args, kwargs)
        self._initialize_stage(arg_mbs[0], kwarg_mbs[0])
        sends: list[dist.Work] = []
        for i in range(self._n_microbatches):
            _wait(_post(stage.get_fwd_recv_ops(i)))
            stage.forward_one_chunk(i, arg_mbs[i], kwarg_mbs[i])
            sends.extend(_post(stage.get_fwd_send_ops(i)))
        _wait(sends)
        self.kept_for = owner
        return self._merge_outputs(stage.output_chunks) if stage.is_last else None

    def backward_phase(self, target: Tensor | None) -> None:
        """Run every micro-batch backward from the activations :meth:`forward_phase` kept.

        Args:
            target: on the last stage, the whole batch's target for ``loss_fn`` (split like the input);
                ``None`` on the others.
        """
        if self.kept_for is None:
            raise RuntimeError("backward_phase without a kept forward_phase")
        self.kept_for = None
        stage = self._stage
        n = self._n_microbatches
        targets = target.tensor_split(n) if target is not None else [None] * n
        sends: list[dist.Work] = []
        for i in range(n):
            _wait(_post(stage.get_bwd_recv_ops(i)))
            loss = self._compute_loss(stage.output_chunks[i], targets[i]) if stage.is_last else None
            stage.backward_one_chunk(i, loss=loss, last_backward=i == n - 1)
            sends.extend(_post(stage.get_bwd_send_ops(i)))
        _wait(sends)
        stage.perform_reduce_grad(n if self.scale_grads else 1)
        # The last stage's output chunks hold the forward's graph; nothing needs them any more.
        stage.clear_runtime_states()


def _post(ops: list[dist.P2POp]) -> list[dist.Work]:
    # One peer per direction in a single-stage-per-rank pipeline, so no ordering by peer is needed.
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()
