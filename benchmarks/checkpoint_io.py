"""Sharded checkpoints against one gathered file: save and load time, extra memory per rank, size on disk.

Trains the example's character GPT scaled up (default 8 blocks of width 768: 57M parameters, fp32
AdamW) for a few steps on 2 CPU processes under ``zero3`` (and ``ddp``), then, at the end of
training, saves a checkpoint with ``PartiStrategy(state_dict_type=...)`` ``"full"`` (gathered on rank
0, one file) or ``"sharded"`` (DCP, every rank writes its part), and loads it back into the same
model and optimizer, one subprocess per setting (Lightning's launcher re-runs this script for rank 1).

- save / load: wall time of ``trainer.save_checkpoint`` and of the strategy's load of model and
  optimizer state, between barriers, on rank 0;
- extra memory: the largest rise of each rank's resident memory over its value just before the save
  (and the load), sampled every 5 ms by a thread; the table shows the larger rank's;
- size: bytes on disk.

    python benchmarks/checkpoint_io.py            # about 3 minutes on 2 cores
    python benchmarks/checkpoint_io.py --quick    # 4 blocks of width 256 (3M parameters)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2


class _PeakRss:
    """The largest resident-memory rise of this process while the block runs."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.rise = 0

    def __enter__(self) -> _PeakRss:
        self._base = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.rise = max(self.rise, self._process.memory_info().rss - self._base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rise = max(self.rise, self._process.memory_info().rss - self._base)


def _worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "examples"))
    from parti_lightning import PartiStrategy

    from char_gpt import CharDataModule, CharGPT

    class Measure(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            strategy = trainer.strategy
            path = os.path.join(args.out, "checkpoint.ckpt")
            dist.barrier()
            with _PeakRss() as save_rss:
                start = time.perf_counter()
                trainer.save_checkpoint(path)
                save_s = time.perf_counter() - start
            dist.barrier()
            with _PeakRss() as load_rss:
                start = time.perf_counter()
                checkpoint = strategy.load_checkpoint(path)
                strategy.load_model_state_dict(checkpoint)
                strategy.load_optimizer_state_dict(checkpoint)
                dist.barrier()
                load_s = time.perf_counter() - start
            rises = [None] * dist.get_world_size()
            dist.all_gather_object(rises, (save_rss.rise, load_rss.rise))
            if trainer.is_global_zero:
                files = [f for f in Path(path).rglob("*") if f.is_file()] if Path(path).is_dir() else [Path(path)]
                size = sum(f.stat().st_size for f in files)
                result = {"save_s": save_s, "load_s": load_s, "size": size,
                          "save_rise": max(r[0] for r in rises), "load_rise": max(r[1] for r in rises)}
                Path(args.out, "result.json").write_text(json.dumps(result))

    L.seed_everything(0, verbose=False)
    model = CharGPT(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64), block_size=128)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        strategy=PartiStrategy(plan=args.plan, state_dict_type=args.kind), callbacks=[Measure()],
    )
    trainer.fit(model, datamodule=CharDataModule(block_size=128, batch_size=2))


def _run(args: argparse.Namespace, plan: str, kind: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="parti-ckpt-bench-") as out:
        command = [sys.executable, __file__, "--worker", "--out", out, "--plan", plan, "--kind", kind,
                   "--layers", str(args.layers), "--width", str(args.width), "--steps", str(args.steps)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
        result_file = Path(out, "result.json")
        if done.returncode != 0 or not result_file.exists():
            tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            raise RuntimeError(f"{plan}/{kind} failed ({done.returncode}):\n{tail}")
        return json.loads(result_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--plans", nargs="+", default=["zero3", "ddp"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 blocks of width 256")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.layers, args.width = 4, 256
    print(f"model: {args.layers} blocks of width {args.width}; 2 CPU ranks; fp32 AdamW")
    print("| plan | checkpoint | save s | load s | extra MiB on save | extra MiB on load | on disk MiB |")
    print("|---|---|---|---|---|---|---|")
    for plan in args.plans:
        results = {kind: _run(args, plan, kind) for kind in ("full", "sharded")}
        for kind, r in results.items():
            print(f"| {plan} | {kind} | {r['save_s']:.2f} | {r['load_s']:.2f} | {r['save_rise'] / MIB:.0f} |"
                  f" {r['load_rise'] / MIB:.0f} | {r['size'] / MIB:.0f} |")
        full, sharded = results["full"], results["sharded"]
        print(f"| {plan} | sharded ÷ full | {sharded['save_s'] / full['save_s']:.2f} |"
              f" {sharded['load_s'] / full['load_s']:.2f} |"
              f" {sharded['save_rise'] / max(full['save_rise'], 1):.2f} |"
              f" {sharded['load_rise'] / max(full['load_rise'], 1):.2f} | {sharded['size'] / full['size']:.2f} |")


if __name__ == "__main__":
    main()
