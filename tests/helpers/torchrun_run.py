"""Trains under torchrun (used by test_cli.py): Lightning sees TorchElastic's environment and launches nothing."""

from __future__ import annotations

import lightning as L

import parti_lightning  # noqa: F401

from scenarios import SEED, ToyRegressor

if __name__ == "__main__":
    L.seed_everything(SEED, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="parti", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(ToyRegressor())
    env = type(trainer.strategy.cluster_environment).__name__
    print(f"rank {trainer.global_rank}/{trainer.world_size} env={env} launched={trainer.strategy.launcher.procs}")
