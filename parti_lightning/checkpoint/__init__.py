"""Saving and loading training state under any plan: plan-independent checkpoints.

A checkpoint is keyed by the module's own parameter names, so one written under a plan and world size
loads under any other. Nothing here imports Lightning except ``hooks.py``, which adapts the rest to
Lightning's checkpoint hooks.

- ``sharded.py``: the sharded format (a directory written through ``torch.distributed.checkpoint``):
  recognizing it, each rank's named state, saving, loading into the current plan's layout, and which
  kind (``"sharded"`` or ``"full"``) a run writes.
- ``files.py``: publishing a checkpoint atomically: staged under a hidden sibling name, written and
  ``fsync``-ed, then swapped in (``renameat2`` exchange where Linux has it).
- ``pending.py``: a sharded checkpoint written in the background, published once whole.
- ``integrity.py``: whether a checkpoint on disk is whole (every file and byte its index names is there).
- ``safe_load.py``: reading DCP's ``.metadata`` index through a restricted unpickler, never running code.
- ``names.py``: optimizer state keyed by parameter name (parti) or by position (torch, stock Lightning).
- ``parts.py``: ranks that each hold part of the model (pipeline stages): gathering their parts into
  one whole state in module order, and cutting a whole state down to a rank's part.
- ``hooks.py``: the strategy's checkpoint hooks (``CheckpointHooks``, a mixin of ``PartiStrategy``).

Converting between a sharded directory and a single file is :mod:`parti_lightning.convert`.
"""

from parti_lightning.checkpoint.names import (
    is_named_optimizer_state,
    named_optimizer_state,
    named_to_positional,
    positional_to_named,
)
from parti_lightning.checkpoint.parts import (
    gather_optimizer_parts,
    gather_parts,
    module_order,
    restrict_optimizer_to_module,
    restrict_to_module,
)
from parti_lightning.checkpoint.safe_load import SafeFileSystemReader, checkpoint_index
from parti_lightning.checkpoint.sharded import (
    FORMAT,
    META_FILE,
    MODEL,
    OPTIM,
    CheckpointError,
    checkpoint_kind,
    is_sharded_checkpoint,
    load_sharded,
    local_optimizer,
    optimizer_entries,
    read_meta,
    restore_rng_state,
    save_sharded,
    sharded_model_state,
    sharded_optimizer_state,
    single_process_is_intended,
)

__all__ = [
    "FORMAT",
    "META_FILE",
    "MODEL",
    "OPTIM",
    "CheckpointError",
    "SafeFileSystemReader",
    "checkpoint_index",
    "checkpoint_kind",
    "gather_optimizer_parts",
    "gather_parts",
    "is_named_optimizer_state",
    "is_sharded_checkpoint",
    "load_sharded",
    "local_optimizer",
    "module_order",
    "named_optimizer_state",
    "named_to_positional",
    "optimizer_entries",
    "positional_to_named",
    "read_meta",
    "restore_rng_state",
    "restrict_optimizer_to_module",
    "restrict_to_module",
    "save_sharded",
    "sharded_model_state",
    "sharded_optimizer_state",
    "single_process_is_intended",
]
