"""A 2-rank run in which one rank raises in training_step at step 5 (used by test_failures.py)."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
import torch

import parti_lightning  # noqa: F401

from scenarios import ToyRegressor


class FailingModule(ToyRegressor):
    def __init__(self, failing_rank: int) -> None:
        super().__init__()
        self.failing_rank = failing_rank

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 5 and self.global_rank == self.failing_rank:
            raise RuntimeError(f"boom from the user's training_step on rank {self.global_rank}")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="parti", max_steps=20, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(FailingModule(int(sys.argv[1])))
