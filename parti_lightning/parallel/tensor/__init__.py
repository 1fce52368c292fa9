"""Tensor parallelism for modules parti has never seen: rules per block, verified before training.

Each repeated block, and each large layer outside the blocks that gets a rule, becomes a *region*: a
forward pre-hook turns its tensor inputs into replicated DTensors on the tensor mesh, its split layers hold
``Shard(0)``/``Shard(1)`` DTensor parameters and every other parameter and buffer a ``Replicate`` one, and a
forward hook returns plain, replicated tensors. Inside a region every intermediate is a DTensor with
*global* semantics, so user code such as ``view(B, T, self.n_head, C // self.n_head)`` or
``qkv.split(C, dim=2)`` computes the same function as on one device: where a layout does not suit an op,
DTensor redistributes (costing a collective, never a wrong value). Outside the regions everything stays
plain, so losses, ``self.log(sync_dist=True)`` and metrics need no change. A fused q/k/v layer whose output
the block splits is *packed*: each rank holds ``[q_r; k_r; v_r]`` (whole heads; a strided shard, saved in
the plain layout), and the split is cut locally, so every block runs Megatron's two all-reduces forward
and two backward.

Why regions rather than torch's ``parallelize_module`` styles: those expect the module's code to be written
for local shards (``view`` by the local head count), which unmodified code is not; global-semantics
DTensors inside a region need no change to the code, and a layout DTensor cannot run shows up in the
setup check below instead of as wrong values.

Before a rule set is used it is verified: each distinct block (class and rules) runs on the input it
really received in one example step, with its rules and unsharded, forward and backward, on every tensor
rank; a set that errors or differs falls back to a correct subset of its layers (each layer verified as it
is added), and then to leaving the block untouched. The report says which.

Files:

- ``apply.py``: :func:`apply_tensor_parallel` (which units, which rules, the report) and
  :func:`tensor_parallel_step`, the context a step's backward and optimizer run in;
- ``rules.py``: where rules come from (the user's patterns, a Hugging Face ``tp_plan``, a trace of one
  block) and what each rule does to a layer's parameters;
- ``verify.py``: the setup check: choose a block's layout, verify it against the unsharded block, the
  tolerances;
- ``region.py``: a block made a region (DTensor parameters, plain tensors in and out, Megatron's
  collectives) and the implicit-replication context;
- ``ops.py``: sharding rules DTensor lacks for ops blocks run (CPU attention, packed outputs);
- ``random.py``: what random streams the ranks of one tensor group share (dropout).
"""

from parti_lightning.parallel.tensor.apply import (
    TensorLayerRow,
    TensorParallelReport,
    apply_tensor_parallel,
    tensor_parallel_step,
)
from parti_lightning.parallel.tensor.random import sync_tensor_random_state
from parti_lightning.parallel.tensor.region import standard_layout
from parti_lightning.parallel.tensor.rules import validate_tensor_rules

__all__ = [
    "TensorLayerRow",
    "TensorParallelReport",
    "apply_tensor_parallel",
    "standard_layout",
    "sync_tensor_random_state",
    "tensor_parallel_step",
    "validate_tensor_rules",
]
