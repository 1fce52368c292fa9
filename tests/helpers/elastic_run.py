"""A run under torchrun's elastic rendezvous (``--nnodes=1:2``) that loses a node and gets one back, for
test_fault_tolerance.py.

``python -m torch.distributed.run --nnodes=1:2 --nproc-per-node=2 ... tests/helpers/elastic_run.py OUT STEPS``
fits checkpoint_run's ``Net`` under zero3 with ``PartiStrategy(resume="auto")`` and a checkpoint every 2 steps,
to ``STEPS``. Each step ends with a short sleep, so that the test can take a node away, or add one, in the
middle of the run. Global rank 0 writes, per start of the workers, the world size and the steps it finished,
to ``OUT/start-<world size>-<process id>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from checkpoint_run import SEED, Net


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[int] = []
        self.started = time.time()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.steps.append(trainer.global_step)
        if trainer.is_global_zero:
            # Per process: the restart count alone does not tell a start apart (a membership change restarts the
            # workers without counting, and a node that joins later counts from 0).
            (self.out / f"start-{trainer.world_size}-{os.getpid()}.json").write_text(
                json.dumps({"world": trainer.world_size, "steps": self.steps,
                            "accumulate": trainer.accumulate_grad_batches, "started": self.started})
            )
        time.sleep(0.5)


if __name__ == "__main__":
    import parti_lightning  # noqa: F401
    from parti_lightning import PartiAccelerator, PartiStrategy

    out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    L.seed_everything(SEED, verbose=False)
    trainer = L.Trainer(
        accelerator=PartiAccelerator(oversubscribe=True), devices=2, num_nodes=int(os.environ["GROUP_WORLD_SIZE"]),
        strategy=PartiStrategy(plan="zero3", resume="auto"), max_steps=max_steps, logger=False,
        callbacks=[Record(out), ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=2, save_last=True)],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(Net(samples=96))
