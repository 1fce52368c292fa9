"""Drop-in behaviour in one 2-rank launch, for test_dropin.py: what an existing Lightning script does.

``python tests/helpers/dropin_run.py OUT`` runs, in the same two processes, one after the other:

1. ``fit`` with ``strategy="parti"`` (plan ddp) and plain SGD (no optimizer state), checkpointing every
   2 steps; every rank raises at step 3 and the script catches it;
2. ``fit(ckpt_path=last.ckpt)`` in the same processes: resumes from the single file (the default for ddp);
3. a ``fit`` with Lightning's own ``ddp`` writing a checkpoint, resumed under parti zero1 and zero3;
4. zero3 with the default checkpoint (a directory), then ``validate(ckpt_path="best")`` and
   ``fit(ckpt_path=<directory>)``;
5. the process group destroyed, and a plain ``torch.distributed.init_process_group``;
6. rank 1 still busy for a while after rank 0 has exited (it must be left to finish).

Every rank prints ``ENV <stage> <value of GLOO_SOCKET_IFNAME>`` during and after each run, and rank 0
prints ``RESULT {json}`` at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import parti_lightning  # noqa: F401
from parti_lightning import PartiAccelerator, PartiStrategy

from scenarios import make_dataset

FAIL_AT = 3


class StatelessSGD(L.LightningModule):
    """Plain SGD without momentum: the optimizer holds no per-parameter state."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fail_at = fail_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError(f"deliberate failure on rank {self.global_rank}")
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(), batch_size=8)


class RecordStart(L.Callback):
    """Prints the interface variable while the run is on, and keeps the step training resumed at."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.start_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        _print_env(f"{self.stage}-during")


def _print_env(stage: str) -> None:
    print(f"ENV {stage} rank{os.environ.get('LOCAL_RANK', '0')} {os.environ.get('GLOO_SOCKET_IFNAME')!r}", flush=True)


def _trainer(strategy: Any, max_steps: int, stage: str, **kwargs: Any) -> tuple[L.Trainer, RecordStart]:
    record = RecordStart(stage)
    trainer = L.Trainer(
        accelerator=PartiAccelerator(oversubscribe=True) if isinstance(strategy, PartiStrategy) else "cpu",
        devices=2, strategy=strategy, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record, *kwargs.pop("callbacks", [])], **kwargs,
    )
    return trainer, record


def _weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    from parti_lightning.parallel.full_state import full_state_dict

    return full_state_dict(module, rank0_only=False)


def main(out: Path) -> None:
    result: dict[str, Any] = {}
    _print_env("start")

    # 1. Every rank raises at step 3; the script catches it and goes on in the same processes.
    saver = ModelCheckpoint(dirpath=out / "a", every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer, _ = _trainer(PartiStrategy(plan="ddp"), 6, "fit1", callbacks=[saver], limit_val_batches=0)
    try:
        trainer.fit(StatelessSGD(fail_at=FAIL_AT))
    except RuntimeError as err:
        print(f"CAUGHT rank{trainer.global_rank}: {err}", flush=True)
    _print_env("fit1-after")
    result["a_files"] = sorted(p.name for p in (out / "a").iterdir())
    result["a_last_is_file"] = (out / "a" / "last.ckpt").is_file()

    # 2. Resume from the single file, stateless optimizer, same processes.
    trainer, record = _trainer(PartiStrategy(plan="ddp"), 6, "fit2", limit_val_batches=0,
                               enable_checkpointing=False)
    module = StatelessSGD()
    trainer.fit(module, ckpt_path=out / "a" / "last.ckpt")
    _print_env("fit2-after")
    result["resumed_at"], result["resumed_to"] = record.start_step, trainer.global_step
    result["load_from_checkpoint"] = torch.equal(
        StatelessSGD.load_from_checkpoint(out / "a" / "last.ckpt").net[0].weight,
        torch.load(out / "a" / "last.ckpt", weights_only=True)["state_dict"]["net.0.weight"],
    )

    # 3. A checkpoint written by Lightning's own ddp, resumed under parti zero1 and zero3.
    trainer, _ = _trainer("ddp", 4, "lightning-ddp", limit_val_batches=0, enable_checkpointing=False)
    module = StatelessSGD()
    trainer.fit(module)
    trainer.save_checkpoint(out / "ddp.ckpt")
    ddp_weights = {k: v.clone() for k, v in module.state_dict().items()}
    for plan in ("zero1", "zero3"):
        trainer, record = _trainer(PartiStrategy(plan=plan), 6, f"ddp-as-{plan}", limit_val_batches=0,
                                   enable_checkpointing=False)
        module = StatelessSGD()
        restored: dict[str, Any] = {}
        trainer.callbacks.append(_Capture(restored))
        trainer.fit(module, ckpt_path=out / "ddp.ckpt")
        result[f"ddp_as_{plan}"] = {
            "resumed_at": record.start_step,
            "weights_equal": all(torch.equal(restored["weights"][k], v) for k, v in ddp_weights.items()),
        }

    # 4. ZeRO-3 writes a directory by default; Lightning's entry points read it.
    saver = ModelCheckpoint(dirpath=out / "z", monitor="val_loss", save_top_k=1, every_n_train_steps=2)
    trainer, _ = _trainer(PartiStrategy(plan="zero3"), 4, "zero3", callbacks=[saver], limit_val_batches=2,
                          val_check_interval=2)
    module = StatelessSGD()
    trainer.fit(module)
    best = Path(saver.best_model_path)
    result["zero3_best"], result["zero3_best_is_dir"] = best.name, best.is_dir()
    if trainer.is_global_zero:  # MyModule.load_from_checkpoint, on the directory made a file
        from parti_lightning.convert import checkpoint_file, load_consolidated

        loaded = StatelessSGD.load_from_checkpoint(checkpoint_file(best)).net[0].weight
        result["load_from_checkpoint_dir"] = torch.equal(loaded, load_consolidated(best)["state_dict"]["net.0.weight"])
    metrics = trainer.validate(module, ckpt_path="best", verbose=False)
    result["validated"] = "val_loss" in metrics[0]
    trainer, record = _trainer(PartiStrategy(plan="zero3"), 6, "zero3-resume", limit_val_batches=0,
                               enable_checkpointing=False)
    trainer.fit(StatelessSGD(), ckpt_path=best)
    result["zero3_resumed_at"] = record.start_step
    _print_env("zero3-after")

    # 5. The process's own process group afterwards: not pinned by parti.
    dist.destroy_process_group()
    _print_env("plain-before")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{int(os.environ['MASTER_PORT']) + 1}",
                            rank=int(os.environ.get("LOCAL_RANK", 0)), world_size=2)
    total = torch.ones(1)
    dist.all_reduce(total)
    result["plain_all_reduce"] = total.item()
    dist.destroy_process_group()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)
    else:
        # Still busy when rank 0 exits, past the launcher's grace: a recovered run's ranks must not be ended.
        time.sleep(8)
        print("FINISHED rank1", flush=True)


class _Capture(L.Callback):
    """Keeps the whole weights as training resumes (gathered under ZeRO-3)."""

    def __init__(self, into: dict[str, Any]) -> None:
        self.into = into

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.into["weights"] = _weights(pl_module)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
