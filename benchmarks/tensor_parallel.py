"""Tensor parallel (``tensor=2``) against replicated data parallel (torch DDP) at the same global batch.

Trains the example's character GPT (``examples/char_gpt.py``, ``CharGPT``, separate q/k/v, so the
Megatron layout applies) on the example's text, with plain functions (no Trainer): forward, cross
entropy, backward, gradient clipping at norm 1, foreach AdamW. Each mode runs in its own pair of CPU
processes (gloo, one intra-op thread each), one mode after the other, so that peak resident memory
is per mode:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``; each rank trains on half of the global batch.
- ``tensor``: ``parti_lightning.parallel.tensor.apply_tensor_parallel`` over both ranks (automatic
  rules, verified at setup); both ranks train on the whole global batch, each on its half of every
  block's matrices.

Per rank it reports the bytes of parameters + gradients + AdamW state the rank holds (a DTensor
counted by its local shard), for the blocks' weights and for the whole model, taken after the second
step's optimizer step; peak resident memory (``VmHWM``); throughput (global samples/s, timed on
rank 0 between barriers after warm-up steps); and the collectives of one step: for ``tensor``, counted
by torch's ``CommDebugMode``; for ``ddp``, whose all-reduces run inside DDP's C++ reducer (which
``CommDebugMode`` does not see), the number of DDP's gradient buckets after its first step (one
all-reduce each per step). Ratios are to ``ddp`` measured in the same run.

    python benchmarks/tensor_parallel.py                                  # ~100M parameters (14 x 768)
    python benchmarks/tensor_parallel.py --layers 4 --width 512 --heads 8 # smaller, for a busy machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import MIB, REPO, free_port, rank_env

from parti_lightning.rss import peak_rss_bytes

MODES = ("ddp", "tensor")


# ------------------------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "examples"))
    from char_gpt import CharGPT, load_vocab, read_text

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = CharGPT(block_size=args.block_size, n_layer=args.layers, n_head=args.heads, n_embd=args.width)
    params = sum(p.numel() for p in model.parameters())
    vocab = load_vocab()
    tokens = torch.tensor(vocab.encode(read_text()), dtype=torch.long)

    def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, tokens.numel() - args.block_size - 1, (args.batch_size,), generator=torch.Generator().manual_seed(step)
        )
        windows = torch.stack([tokens[s : s + args.block_size + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    if args.mode == "ddp":
        share = args.batch_size // world
        own = slice(rank * share, (rank + 1) * share)
        net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model)
        step_context: Any = contextlib.nullcontext
        layout = ""
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from parti_lightning.parallel.tensor import apply_tensor_parallel, tensor_parallel_step

        own = slice(None)  # the ranks of one tensor group see the same batch
        example = global_batch(-1)[0][:2]
        report = apply_tensor_parallel(model, init_device_mesh("cpu", (world,)), run_example=lambda: model(example))
        net, step_context, layout = model, tensor_parallel_step, report.describe()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    held: dict[str, int] = {}

    def train_step(step: int) -> float:
        x, y = (t[own] for t in global_batch(step))
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        with step_context():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        if step == 1:
            held.update(_held_bytes(model, optimizer))
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for step in range(args.warmup):
        train_step(step)
    dist.barrier()
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        train_step(step)
    dist.barrier()
    seconds = time.perf_counter() - start
    collectives = _count_collectives(args.mode, net, train_step, args.warmup + args.steps)
    result = {
        "rank": rank,
        "samples_per_s": args.batch_size * args.steps / seconds,
        "held": held,
        "peak_rss": peak_rss_bytes(),
        "params": params,
        "collectives": collectives,
        "layout": layout,
    }
    Path(args.out, f"{args.mode}-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _local(tensor: Any) -> Any:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _held_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds, for the blocks and in all."""
    held = {"blocks": 0, "all": 0}
    for name, param in model.named_parameters():
        tensors = [param, param.grad, *optimizer.state.get(param, {}).values()]
        size = sum(_local(t).numel() * _local(t).element_size() for t in tensors if hasattr(t, "numel") and t.dim())
        held["all"] += size
        held["blocks"] += size if name.startswith("blocks.") else 0
    return held


def _count_collectives(mode: str, net: Any, train_step: Any, step: int) -> str:
    if mode == "ddp":
        # DDP's buckets as rebuilt after the first step (its logging data records the buckets of the first step).
        buckets = len(net.reducer._get_zeros_like_grad_buckets())
        return f"{buckets} all_reduce (DDP buckets)"
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        train_step(step)
    counts = {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items() if n}
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))


# ------------------------------------------------------------------------------------------- parent


def _run_mode(args: argparse.Namespace, mode: str, out: Path) -> list[dict[str, Any]]:
    port = free_port()
    worker_args = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("layers", "width", "heads", "block_size", "batch_size", "steps", "warmup")
    ]
    procs = []
    for rank in range(args.devices):
        command = [sys.executable, __file__, "--worker", f"--mode={mode}", f"--out={out}", *worker_args]
        procs.append(subprocess.Popen(command, env=rank_env(rank, args.devices, port)))
    try:
        for proc in procs:
            if proc.wait(timeout=args.timeout):
                raise SystemExit(f"{mode}: a rank exited with code {proc.returncode}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [json.loads((out / f"{mode}-{rank}.json").read_text()) for rank in range(args.devices)]


def _table(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> str:
    ddp = results["ddp"]
    params = ddp[0]["params"]
    lines = [
        f"CharGPT {args.layers} x {args.width} ({args.heads} heads), {params / 1e6:.1f}M parameters, global batch"
        f" {args.batch_size} x {args.block_size} characters, {args.devices} CPU ranks, {args.steps} timed steps"
        f" after {args.warmup}, {args.rounds} round(s); samples/s: median over rounds (each round's figure in"
        f" brackets); bytes and RSS: first round",
        "",
        "| mode | rank | block weights + grads + AdamW (MiB) | ratio to ddp | whole model (MiB) | ratio to ddp"
        " | peak RSS (MiB) | ratio to ddp | samples/s | ratio to ddp | collectives per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        for rank, row in enumerate(results[mode]):
            base, held = ddp[rank]["held"], row["held"]
            lines.append(
                f"| {mode} | {rank} | {held['blocks'] / MIB:.1f} | {held['blocks'] / base['blocks']:.3f}"
                f" | {held['all'] / MIB:.1f} | {held['all'] / base['all']:.3f}"
                f" | {row['peak_rss'] / MIB:.0f} | {row['peak_rss'] / ddp[rank]['peak_rss']:.2f}"
                f" | {row['samples_per_s']:.2f} [{', '.join(f'{x:.2f}' for x in row['rounds'])}]"
                f" | {row['samples_per_s'] / ddp[0]['samples_per_s']:.2f}"
                f" | {row['collectives']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (windows per step, all ranks)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mode")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode; throughput is their median")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.batch_size % args.devices:
        parser.error(f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}")
    with tempfile.TemporaryDirectory(prefix="parti-tp-bench-") as tmp:
        # Rounds alternate the modes, so that slow drift of a shared machine hits both alike.
        rounds = [{mode: _run_mode(args, mode, Path(tmp)) for mode in MODES} for _ in range(args.rounds)]
    results = rounds[0]
    for mode in MODES:
        for rank, row in enumerate(results[mode]):
            row["rounds"] = [one[mode][rank]["samples_per_s"] for one in rounds]
            row["samples_per_s"] = statistics.median(row["rounds"])
    print(results["tensor"][0]["layout"])
    print()
    print(_table(args, results))
    print()
    print("command: python benchmarks/tensor_parallel.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
