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
in whole (:mod:`~parti_lightning.checkpoint.files`); hidden names are skipped here. A published checkpoint
that is damaged all the same (a file missing or cut short: :mod:`~parti_lightning.checkpoint.integrity`) is
passed over for the one before, with a warning.

Steps lost: while it trains, such a run keeps the number of its last finished step in a small hidden file in
its checkpoint folder (:class:`ProgressRecord`). The run that resumes reads it before it overwrites it, and
logs how many steps the previous run had finished beyond the checkpoint: the work the failure cost.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from parti_lightning.checkpoint.integrity import damage

RESUME_MODES = ("never", "auto")
_EXTENSION = ModelCheckpoint.FILE_EXTENSION
PROGRESS_FILE = ".parti-progress.json"


def checkpoint_folders(trainer: Any) -> list[Path]:
    """The folders of the Trainer's ``ModelCheckpoint`` callbacks, resolved as Lightning resolves them.

    With a logger and no ``dirpath``, a folder is under the logger's version, which a restarted job counts
    anew: give ``ModelCheckpoint(dirpath=...)`` for a run that is to resume itself.
    """
    return [Path(c.dirpath or c._ModelCheckpoint__resolve_ckpt_dir(trainer))  # type: ignore[attr-defined]
            for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]


def newest_checkpoint(trainer: Any, also: Sequence[Path] = ()) -> Path | None:
    """The most recently written whole checkpoint (a file or a parti directory) in the run's checkpoint folders.

    ``also``: more candidates (Lightning's SLURM requeue checkpoint). A damaged one (a file missing or cut
    short) is passed over for the one before it, with a warning.
    """
    found = [p for folder in checkpoint_folders(trainer) if folder.is_dir() for p in folder.iterdir()
             if p.name.endswith(_EXTENSION) and not p.name.startswith(".") and p.exists()]  # not a dangling link
    found += [p for p in also if p.exists()]
    # A link (`save_last="link"`) and the checkpoint it names are the same save: the newest write wins either way.
    for path in sorted(found, key=lambda p: os.stat(p).st_mtime, reverse=True):
        reason = damage(path)
        if reason is None:
            return path
        rank_zero_warn(f"parti: resume='auto' passes over {path}: {reason}. Trying the checkpoint before it.")
    return None


class ProgressRecord(Callback):
    """Keeps the number of the run's last finished step in each checkpoint folder; logs the steps a resume lost.

    The file is written by global rank 0 after every step (a few bytes, replaced whole: ``os.replace``), and
    read by the next run before its first step. Lost steps are those the previous run finished after the
    checkpoint it resumes from was written.
    """

    def __init__(self) -> None:
        self.previous_step: int | None = None
        self.resumed_from: str | None = None
        self._files: list[Path] = []

    def read(self, trainer: Any, resumed_from: Path | None) -> None:
        steps = [_read_step(folder / PROGRESS_FILE) for folder in checkpoint_folders(trainer)]
        self.previous_step = max((s for s in steps if s is not None), default=None)
        self.resumed_from = None if resumed_from is None else str(resumed_from)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The folders are known once the callbacks are set up: resolved once here, not at every step.
        folders = checkpoint_folders(trainer) if trainer.is_global_zero else []
        self._files = [folder / PROGRESS_FILE for folder in folders]
        for file in self._files:
            file.parent.mkdir(parents=True, exist_ok=True)
        if self.resumed_from is None or self.previous_step is None:
            return
        lost = max(self.previous_step - trainer.global_step, 0)
        rank_zero_info(f"parti: resumed at step {trainer.global_step} from {self.resumed_from}; the run before had"
                       f" finished step {self.previous_step}: {lost} step(s) lost, to be trained again.")
        self.previous_step = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for file in self._files:
            staging = file.with_name(f"{PROGRESS_FILE}.tmp")
            staging.write_text(json.dumps({"global_step": trainer.global_step}))
            os.replace(staging, file)


def _read_step(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def install() -> None:
    """Wrap Lightning's checkpoint-path selection once (see the module docstring)."""
    select = _CheckpointConnector._select_ckpt_path
    if getattr(select, "_parti_wrapped", False):
        return

    @functools.wraps(select)
    def select_ckpt_path(self: _CheckpointConnector, state_fn: TrainerFn, ckpt_path: Any, *args: Any,
                         **kwargs: Any) -> Any:
        trainer = self.trainer
        if state_fn == TrainerFn.FITTING and getattr(trainer.strategy, "resume", None) == "auto":
            newest = None
            if ckpt_path is None:
                # Lightning's own choice here: the checkpoint its SLURM auto-requeue wrote, if any.
                requeued = self._hpc_resume_path if SLURMEnvironment.detect() else None
                newest = newest_checkpoint(trainer, [Path(requeued)] if requeued else [])
                if newest is None:
                    rank_zero_info("parti: resume='auto' found no checkpoint of this run: training from the start.")
                else:
                    rank_zero_info(f"parti: resume='auto' resumes from the run's newest checkpoint, {newest}.")
                    ckpt_path = str(newest)
            _progress_record(trainer).read(trainer, newest)
        return select(self, state_fn, ckpt_path, *args, **kwargs)

    select_ckpt_path._parti_wrapped = True  # type: ignore[attr-defined]
    _CheckpointConnector._select_ckpt_path = select_ckpt_path  # type: ignore[method-assign]


def _progress_record(trainer: Any) -> ProgressRecord:
    """The Trainer's :class:`ProgressRecord`, added to its callbacks the first time (one per Trainer)."""
    record = next((c for c in trainer.callbacks if isinstance(c, ProgressRecord)), None)
    if record is None:
        record = ProgressRecord()
        trainer.callbacks.append(record)
    return record
