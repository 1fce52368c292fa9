"""A run in which one rank fails at step 5 (used by test_failures.py).

``python tests/helpers/failing_run.py RANK MODE [WORLD_SIZE [PLAN]]`` (PLAN a preset; ``tp`` and ``pp`` train a model
with repeated blocks, split by tensor or pipeline parallelism), MODE one of:

- ``raise``: the rank's ``training_step`` raises;
- ``worker``: a dataloader worker of the rank raises;
- ``callback``: a callback's ``on_train_batch_end`` raises on the rank;
- ``sigkill``: the rank is killed with SIGKILL mid-step;
- ``hang``: the rank stops taking part in collectives without dying (sleeps); `timeout` is 8 s;
- ``names``: the rank logs a metric name of its own with ``sync_dist=True``;
- ``caught``: the rank's ``training_step`` raises while the others sleep (busy, not in a collective);
  the script catches the exception and ends normally.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from parti_lightning import PartiAccelerator, PartiStrategy

from scenarios import BATCH, BlockRegressor, ToyRegressor, make_dataset

HANG_TIMEOUT_S = 8
FAILING_STEP = 5


def _boom(where: str, rank: int) -> RuntimeError:
    return RuntimeError(f"boom from the user's {where} on rank {rank}")


class FailingModule(ToyRegressor):
    def __init__(self, failing_rank: int, mode: str) -> None:
        super().__init__()
        self.failing_rank = failing_rank
        self.mode = mode

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        failing = batch_idx == FAILING_STEP and self.global_rank == self.failing_rank
        if batch_idx == FAILING_STEP and self.mode == "names":
            name = "loss_of_a_rank" if self.global_rank == self.failing_rank else "loss"
            self.log(name, torch.tensor(1.0), sync_dist=True)
        elif failing and self.mode == "hang":
            print(f"rank {self.global_rank} hangs at {time.time():.3f}", flush=True)
            time.sleep(600)
        elif failing and self.mode == "sigkill":
            print(f"rank {self.global_rank} killed at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        elif failing and self.mode in ("raise", "caught"):
            raise _boom("training_step", self.global_rank)
        elif batch_idx == FAILING_STEP and self.mode == "caught":
            time.sleep(600)
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        if self.mode != "worker":
            return super().train_dataloader()
        return DataLoader(_FailingDataset(self.global_rank == self.failing_rank), batch_size=BATCH, num_workers=1)


class FailingBlockModule(FailingModule, BlockRegressor):
    """The same failures in a model with repeated blocks, for tensor- and pipeline-parallel plans."""


class _FailingDataset(Dataset):
    def __init__(self, fails: bool) -> None:
        self.data = make_dataset()
        self.fails = fails

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        if self.fails and index >= FAILING_STEP * BATCH * 2:  # the sampler's indices reach this by step 5
            raise _boom("dataloader worker", int(os.environ.get("LOCAL_RANK", 0)))
        return self.data[index]


class FailingCallback(L.Callback):
    def __init__(self, failing_rank: int) -> None:
        self.failing_rank = failing_rank

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == FAILING_STEP and trainer.global_rank == self.failing_rank:
            raise _boom("callback", trainer.global_rank)


if __name__ == "__main__":
    failing_rank, mode = int(sys.argv[1]), sys.argv[2]
    world_size = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    plan = sys.argv[4] if len(sys.argv) > 4 else "auto"
    trainer = L.Trainer(
        accelerator=PartiAccelerator(oversubscribe=True), devices=world_size,
        strategy=PartiStrategy(plan=plan, timeout=HANG_TIMEOUT_S), max_steps=20, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[FailingCallback(failing_rank)] if mode == "callback" else [],
    )
    try:
        module_class = FailingBlockModule if plan in ("tp", "pp") else FailingModule
        trainer.fit(module_class(failing_rank, mode))
    except RuntimeError as err:
        if mode != "caught":
            raise
        print(f"the script caught at {time.time():.3f}: {err}", flush=True)
