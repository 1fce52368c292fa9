"""What a lost rank costs: time from the kill to the first new step, steps lost, and checkpointing's overhead.

Trains the example's character GPT scaled up (57M parameters: 8 blocks of width 768; 100M: 12 of width 832;
fp32 AdamW) on 2 CPU ranks under ``torchrun --max-restarts=1`` with ``PartiStrategy(resume="auto")``, three
launches per size:

- ``none``: no checkpoints: the baseline step time;
- ``sync``: a checkpoint every ``--every`` steps (synchronous: the ranks wait for the write), the newest also as
  ``last``: a link to it (``--save-last link``, one save per trigger) or a copy (``copy``: two saves);
- ``async``: as ``sync``, written in the background (``Trainer(plugins=[AsyncCheckpointIO()])``);
- ``kill``: as ``sync``, and rank 1 SIGKILLs itself in the middle of step ``--kill-at + 1``; torchrun stops
  rank 0 and starts both again, and the run resumes from its newest checkpoint by itself.

It prints, per size: the mean step time of ``none``, ``sync`` and ``async`` over the same steps (after
``--warmup``), the seconds one save adds to training (the difference over the saves in that span), synchronous
and asynchronous, and the overhead that makes at one checkpoint a minute; the seconds from the kill to the
end of the first step after it (torchrun noticing, stopping and starting the ranks, imports, the process
group, the checkpoint's load, the step itself), and the steps lost as the resumed run's log counts them.

    python benchmarks/fault_tolerance.py             # about 9 minutes on 2 cores
    python benchmarks/fault_tolerance.py --quick     # 4 blocks of width 256 (3M parameters)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIZES = {"57M": (8, 768), "100M": (12, 832)}


def _worker(args: argparse.Namespace) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    sys.path.insert(0, str(REPO / "examples"))
    from parti_lightning import PartiStrategy

    from char_gpt import CharDataModule, CharGPT

    out, attempt = Path(args.out), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    class Clock(L.Callback):
        """Rank 0's time at the end of each step; rank 1's kill, on the first attempt."""

        def __init__(self) -> None:
            self.ends: dict[int, float] = {}

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            self.ends[trainer.global_step] = time.time()
            if trainer.is_global_zero:
                Path(out, f"steps-{attempt}.json").write_text(json.dumps(self.ends))

        def on_before_optimizer_step(self, trainer: L.Trainer, *_: Any) -> None:
            if args.kill_at and attempt == 0 and trainer.global_step == args.kill_at and trainer.global_rank == 1:
                Path(out, "killed.json").write_text(json.dumps(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)

    L.seed_everything(0, verbose=False)
    model = CharGPT(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64), block_size=128)
    callbacks: list[L.Callback] = [Clock()]
    if args.every:
        save_last = True if args.save_last == "copy" else "link"
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=args.every, save_top_k=1,
                                         save_last=save_last))
    from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

    trainer = L.Trainer(
        plugins=[AsyncCheckpointIO()] if args.background else None,
        accelerator="cpu", devices=2, max_steps=args.steps, logger=False, enable_checkpointing=bool(args.every),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        strategy=PartiStrategy(plan=args.plan, resume="auto"), callbacks=callbacks,
    )
    trainer.fit(model, datamodule=CharDataModule(block_size=128, batch_size=2))


def _launch(args: argparse.Namespace, layers: int, width: int, every: int, kill_at: int,
            background: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="parti-fault-bench-") as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "--max-restarts=1", "--monitor-interval=0.5", __file__, "--worker", "--out", out,
                   "--plan", args.plan, "--layers", str(layers), "--width", str(width), "--steps", str(args.steps),
                   "--every", str(every), "--kill-at", str(kill_at), "--save-last", args.save_last,
                   *(["--background"] if background else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{command} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        steps = [{int(k): v for k, v in json.loads(p.read_text()).items()}
                 for p in sorted(Path(out).glob("steps-*.json"))]
        result: dict[str, Any] = {"steps": steps}
        if kill_at:
            killed = json.loads(Path(out, "killed.json").read_text())
            result["kill_to_step_s"] = min(steps[1].values()) - killed
            lost = re.search(r"(\d+) step\(s\) lost", done.stdout + done.stderr)
            result["lost"] = int(lost.group(1)) if lost else None
        return result


def _span(ends: dict[int, float], warmup: int) -> tuple[int, int, float]:
    """The first and last step counted (after ``warmup``) and the seconds between their ends."""
    first, last = warmup, max(ends)
    return first, last, ends[last] - ends[first]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="zero3")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    parser.add_argument("--kill-at", type=int, default=9, help="rank 1 dies in the step after this one")
    parser.add_argument("--save-last", choices=["link", "copy"], default="link",
                        help="ModelCheckpoint's `last`: a link to the newest (one save per trigger) or a copy (two)")
    parser.add_argument("--quick", action="store_true", help="4 blocks of width 256")
    parser.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    sizes = {"3M": (4, 256)} if args.quick else {name: SIZES[name] for name in args.sizes}
    print(f"plan {args.plan}, 2 CPU ranks, {args.steps} steps, a checkpoint every {args.every} steps (`last` a"
          f" {args.save_last}); rank 1 killed in step {args.kill_at + 1}")
    header = ("| size | step s, none | step s, sync | step s, async | s per save, sync | s per save, async |"
              " at one a minute, sync | at one a minute, async | kill → next step s | steps lost |")
    rows = [header, "|" + "---|" * 10]
    for name, (layers, width) in sizes.items():
        none = _launch(args, layers, width, every=0, kill_at=0)
        sync = _launch(args, layers, width, every=args.every, kill_at=0)
        background = _launch(args, layers, width, every=args.every, kill_at=0, background=True)
        kill = _launch(args, layers, width, every=args.every, kill_at=args.kill_at)
        first, last, base_s = _span(none["steps"][0], args.warmup)
        spans = [_span(run["steps"][0], args.warmup)[2] for run in (sync, background)]
        # A save at step s runs after that step's end is taken: those of steps first..last-1 fall in the span.
        saves = max(sum(1 for step in range(first, last) if step % args.every == 0), 1)
        steps = last - first
        per_save = [(span - base_s) / saves for span in spans]
        rows.append(f"| {name} | {base_s / steps:.3f} | {spans[0] / steps:.3f} | {spans[1] / steps:.3f} |"
                    f" {per_save[0]:.2f} | {per_save[1]:.2f} | {per_save[0] / 60:+.1%} | {per_save[1] / 60:+.1%} |"
                    f" {kill['kill_to_step_s']:.1f} | {kill['lost']} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
