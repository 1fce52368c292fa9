"""Pipeline parallel against replicated data parallel: model-state bytes, peak memory, throughput.

The example's character GPT, scaled deep, trains on 2 CPU ranks at the same global batch:

- ``ddp``: every rank holds the whole model and half the batch; gradients averaged
  (``parallel/data.py``'s ``GradientSynchronizer``);
- ``gpipe M=m``: 2 stages of half the blocks each (``apply_pipeline``), every rank gets the whole
  batch, split into ``m`` micro-batches; the forward's activations are kept for the backward;
- ``1f1b M=m``: the same under 1F1B (``m >= 2``), which recomputes the trunk's forward in the
  backward to hold at most 2 micro-batches' activations (see ``parallel/pipeline_runtime.py``);
- ``interleaved-1f1b M=m``: 1F1B with 2 stages per rank (4 stages of 6 blocks; rank 0 holds the
  first and third), which shortens the bubble to (p-1)/(2m+p-1) for twice the sends.

All train with AdamW at the tier of plain functions (no Trainer), one process group per variant
family (peak RSS is a high-water mark, so ``ddp``, GPipe and 1F1B are separate launches).
Figures are ratios to ``ddp`` measured in the same run: model-state bytes per rank (parameters,
gradients, Adam state) of the trunk and of the whole model, peak resident memory above the
process's size after imports (the largest over the family's M), and throughput (median of timed
steps after warm-up) beside the bubble (p-1)/(m+p-1) both schedules predict. With the recompute,
1F1B's ideal is about 3/4 of GPipe's.

    python benchmarks/pipeline_parallel.py
    python benchmarks/pipeline_parallel.py --layers 24 --width 64 --batch 16 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from parti_lightning.rss import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCHES = (1, 2, 4, 8)
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def _rss_bytes() -> int:
    return peak_rss_bytes()


def _state_bytes(tensors: list[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model_state(model: Any, optimizer: Any, trunk_ids: set[int]) -> dict[str, int]:
    params = list(model.parameters())
    out = {"trunk": 0, "total": 0}
    for p in params:
        state = [p] + ([p.grad] if p.grad is not None else [])
        state += [t for t in optimizer.state.get(p, {}).values() if getattr(t, "dim", lambda: 0)()]
        size = _state_bytes(state)
        out["total"] += size
        out["trunk"] += size if id(p) in trunk_ids else 0
    return out


def _worker(args: argparse.Namespace, rank: int, out: Path) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    import torch
    import torch.distributed as dist

    from parti_lightning.parallel.data import GradientSynchronizer
    from parti_lightning.parallel.pipeline import apply_pipeline

    from char_gpt import CharGPT

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    baseline = _rss_bytes()
    world = dist.get_world_size()
    results: dict[str, Any] = {}
    variants = ["ddp"] if args.family == "ddp" else [f"{args.family} M={m}" for m in _micro_batches(args.family)]
    for variant in variants:
        torch.manual_seed(0)
        model = CharGPT(n_layer=args.layers, n_embd=args.width, n_head=4, block_size=args.seq)
        trunk_ids = {id(p) for block in model.blocks for p in block.parameters()}
        vocab = model.hparams.vocab_size
        if variant == "ddp":
            sync = GradientSynchronizer(model, dist.group.WORLD)
            per_rank = args.batch // world
            pp = None
        else:
            m = int(variant.split("=")[1])
            pp = apply_pipeline(
                model, dist.group.WORLD, micro_batches=m, schedule=args.family, device=torch.device("cpu"),
                stages_per_rank=_stages_per_rank(args.family),
            )
            per_rank = args.batch
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for step in range(args.warmup + args.steps):
            gen = torch.Generator().manual_seed(step)
            tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)
            if variant == "ddp":
                tokens = tokens[rank * per_rank : (rank + 1) * per_rank]
            dist.barrier()
            start = time.perf_counter()
            loss = model._loss(model(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
            if pp is None:
                sync.sync()
            optimizer.step()
            times.append(time.perf_counter() - start)
            if step < args.warmup + args.steps - 1:
                optimizer.zero_grad()
        state = _model_state(model, optimizer, trunk_ids)
        results[variant] = {
            "samples_per_s": args.batch / statistics.median(times[args.warmup :]),
            "trunk_state": state["trunk"],
            "total_state": state["total"],
        }
        if pp is None:
            sync.remove()  # its own twin process group, released before the default group goes
        del model, optimizer, pp
    results["peak_rss_above_imports"] = _rss_bytes() - baseline
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.destroy_process_group()


def _launch(args: argparse.Namespace, family: str, out: Path) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        command = [sys.executable, __file__, "--worker", str(rank), "--family", family, "--out", str(out)]
        command += ["--layers", str(args.layers), "--width", str(args.width), "--seq", str(args.seq)]
        command += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        procs.append(subprocess.Popen(command, env=env, cwd=REPO))
    for proc in procs:
        if proc.wait(timeout=args.timeout) != 0:
            raise RuntimeError(f"a {family} rank failed")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--family", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.worker >= 0:
        _worker(args, args.worker, Path(args.out))
        return

    with tempfile.TemporaryDirectory() as tmp:
        runs = {family: _launch(args, family, Path(tmp) / f"{family}.json") for family in ("ddp", *SCHEDULES)}
    base = runs["ddp"][0]["ddp"]
    base_rss = max(r["peak_rss_above_imports"] for r in runs["ddp"])
    print(f"CharGPT {args.layers} blocks x width {args.width}, seq {args.seq}, global batch {args.batch}, 2 CPU ranks")
    print("| variant | trunk state / rank (ratio) | model state / rank (ratio) | samples/s (ratio) | bubble |")
    print("|---|---|---|---|---|")
    print(
        f"| ddp | {base['trunk_state'] / 2**20:.2f} MiB (1.00) | {base['total_state'] / 2**20:.2f} MiB (1.00) |"
        f" {base['samples_per_s']:.1f} (1.00) | - |"
    )
    for family in SCHEDULES:
        for m in _micro_batches(family):
            row = [r[f"{family} M={m}"] for r in runs[family]]
            trunk = max(r["trunk_state"] for r in row)
            total = max(r["total_state"] for r in row)
            rate = row[0]["samples_per_s"]
            print(
                f"| {family} M={m} | {trunk / 2**20:.2f} MiB ({trunk / base['trunk_state']:.2f}) | {total / 2**20:.2f}"
                f" MiB ({total / base['total_state']:.2f}) | {rate:.1f} ({rate / base['samples_per_s']:.2f}) |"
                f" {1 / (_stages_per_rank(family) * m + 1):.2f} |"
            )
    print(f"peak RSS above imports, max over ranks (and over M): ddp {base_rss / 2**20:.1f} MiB", end="")
    for family in SCHEDULES:
        rss = max(r["peak_rss_above_imports"] for r in runs[family])
        print(f", {family} {rss / 2**20:.1f} MiB ({rss / base_rss:.2f})", end="")
    print()


def _stages_per_rank(schedule: str) -> int:
    return 2 if schedule.startswith("interleaved") else 1


def _micro_batches(schedule: str) -> list[int]:
    # 1F1B needs at least as many micro-batches as the 2 stages.
    return [m for m in MICRO_BATCHES if schedule == "gpipe" or m >= 2]


if __name__ == "__main__":
    main()
