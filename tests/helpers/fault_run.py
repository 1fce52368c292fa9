"""A run that loses a rank and resumes by itself under torchrun, for test_fault_tolerance.py.

``python -m torch.distributed.run --nproc-per-node=2 --max-restarts=N tests/helpers/fault_run.py OUT PLAN DATA EVERY
[KILLS]`` runs two fits of checkpoint_run's ``Net`` to ``MAX_STEPS``, with 4 steps per epoch at the plan's data-parallel
degree ``DATA`` (a checkpoint every 4 steps ends an epoch; every 3, the one at step 6 is in the middle of one):

1. ``straight``: uninterrupted; writes its final state (gathered, keyed by name) to ``OUT/straight.pt``.
2. ``resumed``: ``PartiStrategy(resume="auto")``, a checkpoint every ``EVERY`` steps in ``OUT/ckpts``; rank 1
   SIGKILLs itself as ``KILLS`` says, per torchrun attempt (JSON; default ``{"0": ["step", 6]}``):
   ``["step", n]``: in the middle of step ``n + 1`` (gradients made, before the optimizer step);
   ``["load"]``: while the checkpoint is being restored (after the strategy read it, before Lightning's loops).
   torchrun stops the other rank and starts both again: the script runs anew, skips the fit whose result is
   written, and the second fit resumes with no ``ckpt_path``. Its final state goes to ``OUT/resumed.pt``. With
   ``async`` after KILLS, its checkpoints are written in the background (Lightning's ``AsyncCheckpointIO``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

from checkpoint_run import BATCH, SEED, Net, gathered_state

MAX_STEPS = 10
STEPS_PER_EPOCH = 4


class Kill(L.Callback):
    """SIGKILLs rank 1 where ``kills`` says for this torchrun attempt (see the module docstring)."""

    def __init__(self, kills: dict[str, list[Any]]) -> None:
        self.kill = kills.get(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def _die(self, trainer: L.Trainer, where: str, step: int | None = None) -> None:
        if self.kill and self.kill[0] == where and self.kill[1:] in ([], [step]) and trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._die(trainer, "step", trainer.global_step)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Any) -> None:
        self._die(trainer, "load")


class Final(L.Callback):
    """Writes the final state, gathered and keyed by name, and the losses of the steps this attempt ran."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = gathered_state(trainer)
        if trainer.is_global_zero:
            torch.save({**state, "losses": self.losses}, self.path)


def fit(out: Path, plan: Any, data: int, every: int, kills: dict[str, list[Any]], background: bool, name: str) -> None:
    from parti_lightning import PartiAccelerator, PartiStrategy

    if (out / f"{name}.pt").exists():
        return  # done on an earlier attempt
    resumed = name == "resumed"
    L.seed_everything(SEED, verbose=False)
    callbacks: list[L.Callback] = [Final(out / f"{name}.pt")]
    if resumed:
        callbacks += [ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=every, save_top_k=-1,
                                      save_last=True), Kill(kills)]
    trainer = L.Trainer(
        accelerator=PartiAccelerator(oversubscribe=True), devices=2,
        plugins=[AsyncCheckpointIO()] if background and resumed else None,
        strategy=PartiStrategy(plan=plan, resume="auto" if resumed else "never"),
        max_steps=MAX_STEPS, callbacks=callbacks, logger=False, enable_checkpointing=resumed,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(Net(samples=STEPS_PER_EPOCH * BATCH * data))


if __name__ == "__main__":
    import json

    import parti_lightning  # noqa: F401

    out_dir, plan_value, data_degree, every_steps = Path(sys.argv[1]), json.loads(sys.argv[2]), *map(int, sys.argv[3:5])
    kill_schedule = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {"0": ["step", 6]}
    in_background = len(sys.argv) > 6 and sys.argv[6] == "async"
    for run_name in ("straight", "resumed"):
        fit(out_dir, plan_value, data_degree, every_steps, kill_schedule, in_background, run_name)
