"""Train the character-level GPT of ``char_gpt.py`` on the shipped Python documentation, then sample from it.

Usage (from the repository root)::

    python examples/train_char_gpt.py                       # 2 CPU processes, strategy "parti"
    python examples/train_char_gpt.py --strategy ddp        # the same run with Lightning's DDP
    python examples/train_char_gpt.py --plan tp             # tensor parallel: each layer split over 2 processes
    python examples/train_char_gpt.py --devices 4 --plan '{"preset": "tp", "data": 2}'   # 2-D: tensor × data
    python examples/train_char_gpt.py --devices 1 --max-steps 100

The defaults take a few minutes on a 2-core machine. Lightning starts the second process by running this
script again, so everything happens under ``if __name__ == "__main__"`` and only rank 0 prints the sample.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger

import parti_lightning  # noqa: F401  (registers strategy="parti" with Lightning)
from parti_lightning import PartiStrategy

from char_gpt import CharDataModule, CharGPT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the example's reference run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run = parser.add_argument_group("run")
    run.add_argument("--accelerator", default="cpu")
    run.add_argument("--devices", type=int, default=2, help="processes (or accelerators) to train on")
    run.add_argument("--strategy", default="parti", help='Lightning strategy name, e.g. "parti" or "ddp"')
    run.add_argument(
        "--plan", default=None,
        help='parti plan (with --strategy parti): a preset ("auto", "ddp", "zero3", "tp", ...) or a JSON mapping,'
             ' e.g. \'{"preset": "tp", "data": 2}\'',
    )
    run.add_argument("--max-steps", type=int, default=500)
    run.add_argument("--val-every", type=int, default=100, help="validate every N optimizer steps")
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--out-dir", type=Path, default=Path("runs/char_gpt"), help="checkpoints/ and logs/ go here")
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", default=None, help="text file (default: examples/data/python_docs.txt)")
    data.add_argument("--batch-size", type=int, default=32, help="windows per batch, per process")
    data.add_argument("--block-size", type=int, default=128, help="context length in characters")
    model = parser.add_argument_group("model")
    model.add_argument("--n-layer", type=int, default=4)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--n-embd", type=int, default=128)
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--lr", type=float, default=3e-3)
    model.add_argument("--warmup-steps", type=int, default=30)
    sample = parser.add_argument_group("sampling")
    sample.add_argument("--prompt", default="The ")
    sample.add_argument("--sample-chars", type=int, default=400)
    sample.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args(argv)
    if args.plan is not None and args.strategy != "parti":
        parser.error(f"--plan is a parti plan: use it with --strategy parti, not {args.strategy!r}")
    return args


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading right when training runs by steps.

    With only ``max_steps`` set, Lightning sets ``max_epochs=-1`` and the bar says ``Epoch 9/-2`` (checked against
    Lightning 2.6.6, whose ``_get_train_description`` prints ``max_epochs - 1``); this one names the step training
    runs to instead.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch} (training to step {self.trainer.max_steps})"


def strategy_of(args: argparse.Namespace) -> str | PartiStrategy:
    """The strategy name, or parti with the plan ``--plan`` asks for."""
    if args.plan is None:
        return args.strategy
    plan = json.loads(args.plan) if args.plan.lstrip().startswith("{") else args.plan
    return PartiStrategy(plan=plan)


def build(args: argparse.Namespace) -> tuple[CharGPT, CharDataModule, L.Trainer, ModelCheckpoint]:
    """The model, data and trainer described by ``args``."""
    datamodule = CharDataModule(
        data_path=args.data_path, block_size=args.block_size, batch_size=args.batch_size, seed=args.seed
    )
    model = CharGPT(
        data_path=args.data_path,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
    )
    checkpoint = ModelCheckpoint(
        dirpath=args.out_dir / "checkpoints",
        filename="char-gpt-{step}-{val_loss:.3f}",
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        save_last=True,
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy_of(args),
        max_steps=args.max_steps,
        # Validate on a step count rather than per epoch, so the last validation lands on the last step.
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), StepProgressBar()],
        logger=CSVLogger(save_dir=args.out_dir, name="logs"),
        log_every_n_steps=10,
    )
    return model, datamodule, trainer, checkpoint


def sample_text(model: CharGPT, checkpoint: ModelCheckpoint, args: argparse.Namespace) -> str:
    """A continuation of ``args.prompt`` from the best checkpoint (or the in-memory model if none was saved).

    Reloading the checkpoint rather than using ``model`` keeps this correct for strategies that leave each
    rank holding only part of the parameters, and exercises the checkpoint round trip.
    """
    path = checkpoint.best_model_path or checkpoint.last_model_path
    if path:
        # strategy="parti" writes a file under ddp/zero1 and a directory under ZeRO-2/3: read as a file either way.
        from parti_lightning.convert import checkpoint_file

        model = CharGPT.load_from_checkpoint(checkpoint_file(path), map_location="cpu")
    generator = torch.Generator().manual_seed(args.seed)
    return model.generate(args.prompt, args.sample_chars, temperature=args.temperature, generator=generator)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # With tensors sliced in memory, loader workers would only compete with the training processes for cores.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    L.seed_everything(args.seed, workers=True)
    start = time.perf_counter()
    model, datamodule, trainer, checkpoint = build(args)
    trainer.fit(model, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    if not trainer.is_global_zero:
        return
    val_loss = trainer.callback_metrics.get("val_loss")
    uniform = math.log(datamodule.vocab_size)
    print(f"\nstrategy={args.strategy} devices={args.devices} steps={trainer.global_step} time={elapsed:.0f}s")
    if val_loss is not None:
        print(f"val_loss={float(val_loss):.3f} (uniform guess: ln({datamodule.vocab_size})={uniform:.3f})")
    print(f"best checkpoint: {checkpoint.best_model_path or '(none)'}")
    print(f"\n--- sample (temperature {args.temperature}) ---\n{args.prompt}{sample_text(model, checkpoint, args)}")


if __name__ == "__main__":
    main()
