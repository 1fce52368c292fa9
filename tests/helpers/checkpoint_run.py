"""Training runs that write and resume sharded checkpoints, for test_checkpoint.py.

``python tests/helpers/checkpoint_run.py DEVICES JOBS.json`` runs each job of the JSON list in order in one
launch of DEVICES processes (later Trainers reuse the process group). A job fits ``Net`` under a plan,
optionally from a checkpoint, and may write checkpoints (``ModelCheckpoint``), the state it restored,
its per-step losses and its final state, each gathered and keyed by name (rank 0 writes them).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from scenarios import ResidualBlock, make_dataset

SEED = 4321
BATCH = 8  # per rank


class Net(L.LightningModule):
    """Repeated blocks (FSDP units), dropout (consumes the RNG every step), AdamW and a step LR schedule."""

    def __init__(self, samples: int = 160) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.2))
        self.blocks = nn.ModuleList(ResidualBlock(32) for _ in range(2))
        self.head = nn.Linear(32, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.calls += 1
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()

    def train_dataloader(self) -> DataLoader:
        x, y = make_dataset().tensors
        return DataLoader(TensorDataset(x[: self.hparams.samples], y[: self.hparams.samples]), batch_size=BATCH,
                          shuffle=True)


def gathered_state(trainer: L.Trainer) -> dict[str, Any]:
    """Model and optimizer state gathered and keyed by name, whatever the plan. Collective."""
    from parti_lightning.parallel.full_state import full_optimizer_state_dict, full_state_dict

    module = trainer.lightning_module
    optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]
    return {
        "state_dict": full_state_dict(module),
        "optimizer_states": [full_optimizer_state_dict(module, o) for o in optimizers],
        "lr": [group["lr"] for o in trainer.optimizers for group in o.param_groups],
        "global_step": trainer.global_step,
    }


class Record(L.Callback):
    """Writes the restored state at the start of training, and per-step losses and the final state."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.losses: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "restored", gathered_state(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "final", {**gathered_state(trainer), "losses": self.losses})

    def _save(self, trainer: L.Trainer, key: str, value: Any) -> None:
        if self.job.get(key) and trainer.is_global_zero:
            torch.save(value, self.job[key])


class KillDuringSave(L.Callback):
    """SIGKILLs this rank while it writes the checkpoint of step ``step``, after its data, before the index."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from torch.distributed.checkpoint import FileSystemWriter

        original = FileSystemWriter.write_data

        def write_data(writer: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(writer, *args, **kwargs)
            if trainer.global_step == self.step and trainer.global_rank == self.rank:
                result.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        FileSystemWriter.write_data = write_data  # type: ignore[method-assign]


def run(devices: int, job: dict[str, Any]) -> None:
    from parti_lightning import PartiAccelerator, PartiStrategy

    L.seed_everything(job.get("seed", SEED), verbose=False)
    callbacks: list[L.Callback] = [Record(job)]
    if job.get("dirpath"):
        callbacks.append(ModelCheckpoint(dirpath=job["dirpath"], every_n_train_steps=job.get("every", 5),
                                         monitor=job.get("monitor"), mode=job.get("mode", "min"),
                                         save_top_k=job.get("top_k", -1),
                                         save_last=job.get("save_last", True)))
    if job.get("kill_at"):
        callbacks.append(KillDuringSave(job["kill_at"], rank=devices - 1))
    trainer = L.Trainer(
        accelerator=PartiAccelerator(oversubscribe=True),
        devices=devices,
        # Sharded under every plan (not only where "auto" would choose it): these tests are about that form.
        strategy=PartiStrategy(plan=job["plan"], state_dict_type=job.get("state_dict_type", "sharded"),
                               resume=job.get("resume", "never")),
        max_steps=job["max_steps"],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(job.get("dirpath")),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=job.get("limit_val_batches", 0),
    )
    module = Net()
    trainer.fit(module, ckpt_path=job.get("ckpt"))
    if job.get("save"):
        trainer.save_checkpoint(job["save"])
    if job.get("validate"):
        # Weights only: validation loads the module's state and nothing else.
        trainer.validate(module, ckpt_path=job["validate"], verbose=False)
        from parti_lightning.parallel.full_state import full_state_dict

        state = full_state_dict(module)
        if trainer.is_global_zero:
            torch.save({"state_dict": state, "val_loss": trainer.callback_metrics["val_loss"]}, job["validated"])


def main(devices: int, jobs_file: str) -> None:
    import parti_lightning  # noqa: F401

    with open(jobs_file) as file:
        jobs = json.load(file)
    for job in jobs:
        run(devices, job)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
