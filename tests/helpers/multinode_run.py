"""Trains under torchrun as ``num_nodes`` × ``devices`` ranks; global rank 0 saves the final parameters.

Usage (from test_multinode.py): ``torchrun ... tests/helpers/multinode_run.py OUT DEVICES NUM_NODES``. Every
rank prints one line saying where it sits in the run, so the test can check Lightning read torchrun's
variables and parti started no process of its own.
"""

from __future__ import annotations

import sys

import lightning as L
import torch

import parti_lightning  # noqa: F401
from parti_lightning import PartiAccelerator

from scenarios import SEED, ToyRegressor

STEPS = 4


def main(out: str, devices: int, num_nodes: int) -> None:
    L.seed_everything(SEED, verbose=False)
    module = ToyRegressor()
    trainer = L.Trainer(
        # 4 ranks on a 2-core machine: each gets one core, shared (1 thread per rank under either layout).
        accelerator=PartiAccelerator(oversubscribe=True), devices=devices, num_nodes=num_nodes, strategy="parti",
        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    strategy = trainer.strategy
    print(
        f"rank {trainer.global_rank}/{trainer.world_size} node={trainer.node_rank} local={trainer.local_rank}"
        f" env={type(strategy.cluster_environment).__name__} launched={strategy.launcher.procs}"
        f" sampler={strategy.distributed_sampler_kwargs} steps={trainer.global_step}",
        flush=True,
    )
    if trainer.is_global_zero:
        torch.save({name: p.detach().clone() for name, p in module.named_parameters()}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
