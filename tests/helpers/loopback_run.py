"""Trains 2 ranks with ``strategy="parti"`` and, mid-training, prints every listening socket of the run.

Used by test_multinode.py. Lightning's launcher re-runs this script for rank 1 as a child of rank 0,
so rank 0's process tree is the whole run. The listing is taken between two barriers, when every rank
has its process group and collectives set up and none has started tearing them down.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import psutil

import parti_lightning  # noqa: F401

from scenarios import SEED, ToyRegressor


def listening_sockets(root: psutil.Process) -> list[dict[str, Any]]:
    """The LISTEN sockets (TCP, IPv4 and IPv6) of ``root`` and all its descendants."""
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue  # a helper process that exited meanwhile
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                found.append({"pid": process.pid, "ip": conn.laddr.ip, "port": conn.laddr.port})
    return found


class ListListeningSockets(L.Callback):
    def __init__(self, at_batch: int = 1) -> None:
        self.at_batch = at_batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx != self.at_batch:
            return
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            print("LISTENING " + json.dumps(listening_sockets(psutil.Process())), flush=True)
        trainer.strategy.barrier()


if __name__ == "__main__":
    L.seed_everything(SEED, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="parti", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ListListeningSockets()],
    )
    trainer.fit(ToyRegressor())
