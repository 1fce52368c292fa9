"""Steady-state training throughput: ``strategy="parti"`` against Lightning's ``strategy="ddp"``.

Both train the example's character GPT on the same text, world size, batch and seed, in one run of
this script. A third variant, ``parti-unpinned``, is parti with CPU core pinning turned off
(``PartiAccelerator(pin_cores=False)``). Runs alternate between the variants so that slow drift of
a shared machine hits both alike. Each run skips warm-up steps, then times fixed windows of steps on
rank 0; the figure per strategy is the median window throughput over every run, and the result is the
ratio parti / ddp (above 1.0: parti is faster).

    python benchmarks/ddp_throughput.py                 # 2 CPU processes, defaults below
    python benchmarks/ddp_throughput.py --rounds 3 --devices 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    import lightning as L

    import parti_lightning  # noqa: F401

    from char_gpt import CharDataModule, CharGPT

    class WindowTimer(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            self.stamps.append(time.perf_counter())

    L.seed_everything(0, verbose=False)
    timer = WindowTimer()
    steps = args.warmup + args.windows * args.window_steps
    # "parti-unpinned": parti with the OS left to place ranks on cores, to show what pinning buys.
    pinned = args.strategy != "parti-unpinned"
    accelerator = "cpu" if pinned else parti_lightning.PartiAccelerator(pin_cores=False)
    strategy = "parti" if args.strategy.startswith("parti") else args.strategy
    trainer = L.Trainer(
        accelerator=accelerator, devices=args.devices, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )
    model = CharGPT(n_layer=args.layers, n_embd=args.width, block_size=args.block_size)
    data = CharDataModule(block_size=args.block_size, batch_size=args.batch_size)
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        stamps = timer.stamps[args.warmup - 1 :]
        global_batch = args.batch_size * args.devices
        rates = [
            global_batch * args.window_steps / (stamps[(i + 1) * args.window_steps] - stamps[i * args.window_steps])
            for i in range(args.windows)
        ]
        Path(args.out).write_text(json.dumps(rates))


def _run(strategy: str, args: argparse.Namespace, out: Path) -> list[float]:
    command = [sys.executable, __file__, "--worker", "--strategy", strategy, "--out", str(out)]
    for name in ("devices", "batch_size", "block_size", "layers", "width", "warmup", "windows", "window_steps"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK")}
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="parti", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="runs per strategy, alternating")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    from rich.console import Console
    from rich.table import Table

    rates: dict[str, list[float]] = {"parti": [], "ddp": [], "parti-unpinned": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for strategy in rates:
                rates[strategy] += _run(strategy, args, Path(tmp) / f"{strategy}{round_}.json")
    medians = {s: statistics.median(r) for s, r in rates.items()}
    table = Table(title=f"Training throughput, {args.devices} CPU processes, global batch "
                        f"{args.batch_size * args.devices} × {args.block_size} characters")
    for column in ("strategy", "median samples/s", "min", "max", "windows", "ratio to ddp"):
        table.add_column(column, justify="right")
    for strategy, values in rates.items():
        table.add_row(strategy, f"{medians[strategy]:.1f}", f"{min(values):.1f}", f"{max(values):.1f}",
                      str(len(values)), f"{medians[strategy] / medians['ddp']:.3f}")
    Console().print(table)
    print(json.dumps({"parti_over_ddp": medians["parti"] / medians["ddp"], **{f"{s}_samples_per_s": m
                                                                              for s, m in medians.items()}}))


if __name__ == "__main__":
    main()
