"""A 2-rank run in which one rank fails at step 5 (used by test_failures.py).

``python tests/failing_run.py RANK [raise|hang|names]``: the rank raises, stops taking part in
collectives without dying (sleeps; the strategy's `timeout` is 8 seconds), or logs a metric name of its
own with ``sync_dist=True``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import torch

from parti_lightning import PartiStrategy

from scenarios import ToyRegressor

HANG_TIMEOUT_S = 8


class FailingModule(ToyRegressor):
    def __init__(self, failing_rank: int, mode: str) -> None:
        super().__init__()
        self.failing_rank = failing_rank
        self.mode = mode

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 5 and self.mode == "names":
            name = "loss_of_a_rank" if self.global_rank == self.failing_rank else "loss"
            self.log(name, torch.tensor(1.0), sync_dist=True)
        elif batch_idx == 5 and self.global_rank == self.failing_rank:
            if self.mode == "hang":
                print(f"rank {self.global_rank} hangs at {time.time():.3f}", flush=True)
                time.sleep(600)
            raise RuntimeError(f"boom from the user's training_step on rank {self.global_rank}")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    mode = sys.argv[2] if len(sys.argv) > 2 else "raise"
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=PartiStrategy(timeout=HANG_TIMEOUT_S), max_steps=20, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(FailingModule(int(sys.argv[1]), mode))
