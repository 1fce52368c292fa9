"""A run that loses a rank and resumes by itself under torchrun, for test_fault_tolerance.py.

``python -m torch.distributed.run --nproc-per-node=2 --max-restarts=1 tests/helpers/fault_run.py OUT PLAN DATA EVERY``
runs two fits of checkpoint_run's ``Net`` to ``MAX_STEPS``, with 4 steps per epoch at the plan's data-parallel
degree ``DATA`` (a checkpoint every 4 steps ends an epoch; every 3, the one at step 6 is in the middle of one):

1. ``straight``: uninterrupted; writes its final state (gathered, keyed by name) to ``OUT/straight.pt``.
2. ``resumed``: ``PartiStrategy(resume="auto")``, a checkpoint every ``EVERY`` steps in ``OUT/ckpts``; on
   torchrun's first attempt rank 1 SIGKILLs itself in the middle of step ``KILL_AT + 1`` (gradients made,
   before the optimizer step). torchrun stops the other rank and starts both again: the script runs anew,
   skips the fit whose result is written, and the second fit resumes with no ``ckpt_path``. Its final state
   goes to ``OUT/resumed.pt``.
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

from checkpoint_run import BATCH, SEED, Net, gathered_state

MAX_STEPS = 10
KILL_AT = 6
STEPS_PER_EPOCH = 4


class KillMidStep(L.Callback):
    """SIGKILLs rank 1 once its gradients for step ``step + 1`` are made, on torchrun's first attempt only."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.global_step == self.step and trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)


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


def fit(out: Path, plan: Any, data: int, every: int, name: str) -> None:
    from parti_lightning import PartiAccelerator, PartiStrategy

    if (out / f"{name}.pt").exists():
        return  # done on an earlier attempt
    resumed = name == "resumed"
    L.seed_everything(SEED, verbose=False)
    callbacks: list[L.Callback] = [Final(out / f"{name}.pt")]
    if resumed:
        callbacks += [ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=every, save_top_k=-1,
                                      save_last=True), KillMidStep(KILL_AT)]
    trainer = L.Trainer(
        accelerator=PartiAccelerator(oversubscribe=True), devices=2,
        strategy=PartiStrategy(plan=plan, resume="auto" if resumed else "never"),
        max_steps=MAX_STEPS, callbacks=callbacks, logger=False, enable_checkpointing=resumed,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(Net(samples=STEPS_PER_EPOCH * BATCH * data))


if __name__ == "__main__":
    import json

    import parti_lightning  # noqa: F401

    out_dir, plan_value, data_degree, every_steps = Path(sys.argv[1]), json.loads(sys.argv[2]), *map(int, sys.argv[3:5])
    for run_name in ("straight", "resumed"):
        fit(out_dir, plan_value, data_degree, every_steps, run_name)
