"""Fits BlockRegressor with ``plan="auto"`` on 2 CPU ranks; ``python tests/auto_run.py [MEMORY_BUDGET_BYTES]``."""

from __future__ import annotations

import sys

import lightning as L

from parti_lightning import PartiStrategy

from scenarios import BlockRegressor

if __name__ == "__main__":
    budget = int(sys.argv[1]) if len(sys.argv) > 1 else None
    L.seed_everything(1, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=PartiStrategy(plan="auto", memory_budget=budget), max_steps=12,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(BlockRegressor())
    measured = trainer.strategy._step_meter.measured
    print(f"rank {trainer.global_rank}: trained under {trainer.strategy.resolved_plan.describe()}; measured {measured}")
