"""Fits BlockRegressor with ``plan="auto"`` on 2 CPU ranks: ``auto_run.py [BUDGET_BYTES|0 [TIMEOUT_S]]``."""

from __future__ import annotations

import sys

import lightning as L

from parti_lightning import PartiStrategy

from scenarios import BlockRegressor

if __name__ == "__main__":
    budget = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "0" else None
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 600.0
    L.seed_everything(1, verbose=False)
    strategy = PartiStrategy(plan="auto", memory_budget=budget, timeout=timeout)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=12,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(BlockRegressor())
    measured = trainer.strategy._step_meter.measured
    print(f"rank {trainer.global_rank}: trained under {trainer.strategy.resolved_plan.describe()}; measured {measured}")
