"""Runs that stop in the middle of an epoch and resume on another number of ranks, for test_fault_tolerance.py.

``python tests/helpers/epoch_run.py DEVICES JOBS.json`` runs each job of the list in one launch of DEVICES
processes. A job fits checkpoint_run's ``Net`` for one epoch of ``SAMPLES`` numbered samples, recording which
sample numbers each rank trained on, to ``job["ids"]`` (rank R writes ``<ids>.R.json``), and its final state
(gathered, keyed by name) to ``<ids>.pt``. With ``save_at`` it writes a checkpoint after that step and stops
there; with ``ckpt`` it resumes one and goes to the epoch's end; with ``every_seconds`` it writes one whenever
that much training time has passed (``ModelCheckpoint(train_time_interval=...)``). ``"dropout": false`` zeroes
``Net``'s dropout, for runs compared across world sizes: each rank draws its own masks, so no two world sizes
draw the same ones.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_run import BATCH, SEED, Net, gathered_state
from scenarios import make_dataset

SAMPLES = 96


class NumberedNet(Net):
    """``Net`` whose batches carry each sample's number, which the step records."""

    def __init__(self) -> None:
        super().__init__(samples=SAMPLES)
        self.seen: list[int] = []

    def train_dataloader(self) -> DataLoader:
        x, y = make_dataset().tensors
        numbers = torch.arange(SAMPLES)
        return DataLoader(TensorDataset(x[:SAMPLES], y[:SAMPLES], numbers), batch_size=BATCH, shuffle=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, numbers = batch
        self.seen += numbers.tolist()
        return super().training_step((x, y), batch_idx)


def run(devices: int, job: dict[str, Any]) -> None:
    from parti_lightning import PartiAccelerator, PartiStrategy

    L.seed_everything(SEED, verbose=False)
    save_at = job.get("save_at")
    callbacks: list[L.Callback] = []
    if save_at:
        callbacks.append(ModelCheckpoint(dirpath=job["dirpath"], every_n_train_steps=save_at))
    if job.get("every_seconds") is not None:
        interval = timedelta(seconds=job["every_seconds"])
        callbacks.append(ModelCheckpoint(dirpath=job["dirpath"], train_time_interval=interval, save_top_k=-1))
    trainer = L.Trainer(
        accelerator=PartiAccelerator(oversubscribe=True), devices=devices,
        strategy=PartiStrategy(plan=job["plan"], state_dict_type=job.get("state_dict_type", "auto")),
        max_epochs=1, max_steps=save_at or -1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, enable_checkpointing=bool(callbacks), limit_val_batches=0,
    )
    module = NumberedNet()
    if not job.get("dropout", True):
        module.encoder[2].p = 0.0
    trainer.fit(module, ckpt_path=job.get("ckpt"))
    with open(f"{job['ids']}.{trainer.global_rank}.json", "w") as file:
        json.dump({"seen": module.seen, "global_step": trainer.global_step, "epoch": trainer.current_epoch,
                   "accumulate": trainer.accumulate_grad_batches}, file)
    state = gathered_state(trainer)
    if trainer.is_global_zero:
        torch.save(state, f"{job['ids']}.pt")


if __name__ == "__main__":
    from pathlib import Path

    import parti_lightning  # noqa: F401

    for each in json.loads(Path(sys.argv[2]).read_text()):
        run(int(sys.argv[1]), each)
