"""``PartiStrategy(resume="auto")``: ``fit`` without ``ckpt_path`` resumes from the run's newest checkpoint.

A job restarted by torchrun (``--max-restarts``), requeued by SLURM, or simply run again, should go on from
where it was saved, with nobody editing ``ckpt_path``. Lightning passes ``ckpt_path`` from ``Trainer.fit`` to
its run as a local value, resolved by its checkpoint connector's ``_select_ckpt_path`` before any strategy
hook runs (under torchrun there is no launcher either), so no strategy API can supply one. Importing
``parti_lightning`` wraps that one method, as :mod:`~parti_lightning.lightning_adapters.compiled` wraps
Lightning's compile check: for a fit under a strategy that asks for it, with no ``ckpt_path`` given, the
path becomes the newest checkpoint in the folders of the run's ``ModelCheckpoint`` callbacks. Every other
call goes to Lightning's method unchanged.

Half-written checkpoints are never candidates: parti writes a checkpoint under a hidden name and swaps it
in whole (:mod:`~parti_lightning.checkpoint.files`); hidden names are skipped here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

RESUME_MODES = ("never", "auto")
_EXTENSION = ModelCheckpoint.FILE_EXTENSION


def newest_checkpoint(trainer: Any) -> Path | None:
    """The most recently written checkpoint (a file or a parti directory) in the run's checkpoint folders.

    The folders are those of the Trainer's ``ModelCheckpoint`` callbacks, resolved as Lightning resolves them.
    With a logger and no ``dirpath``, that folder is under the logger's version, which a restarted job counts
    anew: give ``ModelCheckpoint(dirpath=...)`` for a run that is to resume itself.
    """
    found: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        folder = Path(callback.dirpath or callback._ModelCheckpoint__resolve_ckpt_dir(trainer))  # type: ignore[attr-defined]
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.name.endswith(_EXTENSION) and not p.name.startswith(".")]
    # A link (`save_last="link"`) and the checkpoint it names are the same save: the newest write wins either way.
    return max(found, key=lambda p: os.stat(p).st_mtime, default=None)


def install() -> None:
    """Wrap Lightning's checkpoint-path selection once (see the module docstring)."""
    select = _CheckpointConnector._select_ckpt_path
    if getattr(select, "_parti_wrapped", False):
        return

    @functools.wraps(select)
    def select_ckpt_path(self: _CheckpointConnector, state_fn: TrainerFn, ckpt_path: Any, *args: Any,
                         **kwargs: Any) -> Any:
        trainer = self.trainer
        if ckpt_path is None and state_fn == TrainerFn.FITTING and getattr(trainer.strategy, "resume", None) == "auto":
            newest = newest_checkpoint(trainer)
            if newest is None:
                rank_zero_info("parti: resume='auto' found no checkpoint of this run: training from the start.")
            else:
                rank_zero_info(f"parti: resume='auto' resumes from the run's newest checkpoint, {newest}.")
                ckpt_path = str(newest)
        return select(self, state_fn, ckpt_path, *args, **kwargs)

    select_ckpt_path._parti_wrapped = True  # type: ignore[attr-defined]
    _CheckpointConnector._select_ckpt_path = select_ckpt_path  # type: ignore[method-assign]
