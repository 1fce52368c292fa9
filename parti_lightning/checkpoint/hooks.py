"""The checkpoint half of :class:`~parti_lightning.PartiStrategy`: Lightning's checkpoint hooks, adapted.

Lightning asks a strategy for the model's and each optimizer's state, then saves the checkpoint dict it
builds from them; on resume it loads a dict and hands the parts back. Here those hooks write and read
either one plain Lightning file (``state_dict_type="full"``, gathered on rank 0) or a sharded directory
(``"sharded"``, each rank writing what it holds; :mod:`parti_lightning.checkpoint.sharded`), keyed by the
module's own parameter names either way so that a checkpoint loads under any plan. Whether a state
must be gathered is read from the tensors (sharded ``DTensor`` parameters), not from the plan.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist
from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from parti_lightning.checkpoint.names import named_optimizer_state
from parti_lightning.checkpoint.parts import (
    gather_optimizer_parts,
    gather_parts,
    restrict_optimizer_to_module,
    restrict_to_module,
)
from parti_lightning.checkpoint.pending import PendingSave
from parti_lightning.checkpoint.sharded import (
    CheckpointError,
    checkpoint_kind,
    gathered_rng_states,
    is_sharded_checkpoint,
    load_sharded,
    restore_rng_state,
    save_sharded,
    sharded_model_state,
    sharded_optimizer_state,
)
from parti_lightning.lightning_adapters.data_position import keep_global_batch, records_at_save
from parti_lightning.mesh import ParallelMesh
from parti_lightning.parallel import holds_part_of_the_model, holds_sharded_tensors
from parti_lightning.parallel.full_state import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from parti_lightning.plan import ResolvedPlan

StateDictType = Literal["auto", "sharded", "full"]


class CheckpointHooks(ParallelStrategy):
    """Lightning's checkpoint hooks for plan-independent checkpoints; :class:`~parti_lightning.PartiStrategy` is one."""

    # Set by the strategy's constructor and `setup`.
    _requested_state_dict_type: StateDictType
    _restored_sharded: bool  # the last `load_checkpoint` already restored model and optimizers
    # Where a checkpoint written mid-epoch left the epoch's data (see lightning_adapters.data_position).
    data_position: dict[str, int] | None = None
    # The gradient accumulation the Trainer was configured with, where a resume changed it (keep_global_batch).
    configured_accumulation: int | None = None
    # A sharded checkpoint being written in the background (`Trainer(plugins=[AsyncCheckpointIO()])`), and the
    # process group its writer's collectives run on, apart from training's.
    _pending_save: PendingSave | None = None
    _background_group: Any = None
    resolved_plan: ResolvedPlan
    mesh: ParallelMesh | None

    @property
    def _state_dict_type(self) -> str:
        """What this run writes: ``"auto"`` decided for the plan (see ``checkpoint_kind``)."""
        return checkpoint_kind(self._requested_state_dict_type, self.resolved_plan)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self._state_dict_type == "full":
            path = self.broadcast(filepath)
            # Every rank's RNG states, as a sharded checkpoint keeps them: a resumed run draws the same
            # dropout masks as one never interrupted. Stock Lightning ignores the extra key.
            rng = gathered_rng_states()
            if self.is_global_zero:
                checkpoint = {**checkpoint, "parti": {"rng": rng, **self._data_at_save()}}
                if is_sharded_checkpoint(path):
                    shutil.rmtree(path)
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError("PartiStrategy(state_dict_type='sharded') writes through torch.distributed.checkpoint:"
                            " storage_options are not supported; use state_dict_type='full' for a CheckpointIO.")
        path = str(self.broadcast(filepath))
        if "://" in path:
            raise NotImplementedError(
                f"sharded checkpoints are written to a local or mounted file system, not {path!r}: use"
                " PartiStrategy(state_dict_type='full') for a remote URL, or save to a mounted path."
            )
        meta = {"parti": {"plan": self.resolved_plan.to_dict(), "world_size": self.world_size,
                          "num_nodes": self.num_nodes, **self._data_at_save()}}
        self._wait_for_checkpoint()  # one save in flight at a time, in order
        background = isinstance(self.checkpoint_io, AsyncCheckpointIO)
        if background and dist.is_initialized() and self._background_group is None:
            self._background_group = dist.new_group(backend="gloo")
        self._pending_save = save_sharded(path, checkpoint, meta, background=background,
                                          group=self._background_group)

    def _wait_for_checkpoint(self) -> None:
        """Let the sharded checkpoint being written in the background finish (raise if it failed)."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            pending.wait()

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        # `ModelCheckpoint` removes the checkpoint a new one replaces right after asking for the new one: while
        # that is written in the background, the old one stays until the new one is whole.
        pending = self._pending_save
        if pending is None:
            return super().remove_checkpoint(filepath)
        remove_now = super().remove_checkpoint
        pending.then(lambda: remove_now(filepath))
        return None

    @override
    def teardown(self) -> None:
        try:
            self._wait_for_checkpoint()
        finally:
            super().teardown()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Always tensors and plain containers only: a checkpoint is data, and unpickling arbitrary
        # objects would run whatever code a crafted file carries. parti's own checkpoints need nothing more.
        if weights_only is False:
            rank_zero_info("parti: checkpoints are always loaded as weights only; ignoring the request to unpickle.")
        self._wait_for_checkpoint()
        path = Path(self.broadcast(checkpoint_path))
        self._restored_sharded = False
        module = self.lightning_module
        assert module is not None and module._trainer is not None
        fitting = module._trainer.state.fn == TrainerFn.FITTING
        if not path.is_dir():
            checkpoint = super().load_checkpoint(path, weights_only=True)
            if fitting:
                self._restore_data(checkpoint.get("parti", {}))
            return checkpoint
        if not is_sharded_checkpoint(path):
            raise CheckpointError(
                f"{path} is a directory but not a complete parti checkpoint (no meta.pt or .metadata): it was"
                " not written by parti, or its save did not finish."
            )
        meta = load_sharded(path, module, self.optimizers if fitting else (), strict=module.strict_loading)
        parti = meta.pop("parti")
        if fitting:
            self._restore_data(parti)
        self._restored_sharded = True
        if fitting and parti.get("optimizers") and "optimizer_states" not in meta:
            meta["optimizer_states"] = [None] * len(parti["optimizers"])  # restored above; Lightning checks the key
        return meta

    def _data_at_save(self) -> dict[str, Any]:
        """Where the epoch's data is and the global batch, for exact resume on any world size."""
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is None or not trainer.training:
            return {}
        return records_at_save(trainer, self.configured_accumulation)

    def _restore_data(self, parti: Mapping[str, Any]) -> None:
        self._restore_rng(parti)
        self.data_position = parti.get("data")
        trainer = self.lightning_module._trainer  # type: ignore[union-attr]
        self.configured_accumulation = keep_global_batch(trainer, parti.get("batch"),
                                                         self.distributed_sampler_kwargs["num_replicas"])

    def _restore_rng(self, parti: Mapping[str, Any]) -> None:
        states = parti.get("rng", [])
        if not states:
            rank_zero_info("parti: the checkpoint holds no RNG states (written by stock Lightning, or converted);"
                           " RNGs left as seeded.")
            return
        if len(states) != self.world_size:
            rank_zero_info(
                f"parti: the checkpoint was written by {len(states)} processes, this run has {self.world_size}:"
                " random number generators continue from this run's seeds, not the checkpoint's."
            )
            return
        restore_rng_state(states[self.global_rank])

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Sharded parameters and optimizers exist only after `setup`; loading then works for every plan.
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        if self._state_dict_type == "sharded":
            # What this rank holds, keyed by the module's own names; `save_checkpoint` writes the shards.
            return sharded_model_state(self.lightning_module)
        # Gathered and keyed by the module's own names under every plan: a plain Lightning state dict.
        module = self.lightning_module
        if self._holds_one_stage(module):
            # Each pipeline rank's stage (its tensor-parallel shards made whole first), united on rank 0.
            part = (
                full_state_dict(module, rank0_only=False)
                if holds_sharded_tensors(module)
                else {key: value.detach().cpu() for key, value in module.state_dict().items()}
            )
            assert self.mesh is not None
            return gather_parts(module, part, self.mesh.pipeline_group)
        if holds_sharded_tensors(module):
            return full_state_dict(module)
        return module.state_dict()

    def _holds_one_stage(self, module: Any) -> bool:
        return self.mesh is not None and self.mesh.pipeline_enabled and holds_part_of_the_model(module)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        if self._restored_sharded:
            return  # `load_checkpoint` read the weights straight into the module
        module = self.lightning_module
        state = checkpoint["state_dict"]
        if self._holds_one_stage(module):
            # A whole model's weights, of which this rank holds its stage's and the replicated ones.
            state = restrict_to_module(module, state)
        if holds_sharded_tensors(module):
            load_full_state_dict(module, state, strict=strict)
        else:
            module.load_state_dict(state, strict=strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # Keyed by parameter name rather than position, so it loads under any other plan.
        assert self.lightning_module is not None
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        module = self.lightning_module
        if self._state_dict_type == "sharded":
            return sharded_optimizer_state(module, optimizer)
        if self._holds_one_stage(module):
            assert self.mesh is not None
            part = full_optimizer_state_dict(module, optimizer, rank0_only=False)
            return gather_optimizer_parts(module, part, self.mesh.pipeline_group)
        return full_optimizer_state_dict(module, optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        assert self.lightning_module is not None
        if self._restored_sharded:
            return
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            state = named_optimizer_state(state, self.lightning_module, optimizer)
            if self._holds_one_stage(self.lightning_module):
                state = restrict_optimizer_to_module(self.lightning_module, state)
            load_full_optimizer_state_dict(self.lightning_module, optimizer, state)
