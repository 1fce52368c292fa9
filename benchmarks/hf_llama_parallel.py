"""A Hugging Face Llama at its library defaults under ddp, ``tensor=2`` and ``pipeline=2`` on 2 CPU ranks.

The model is ``LlamaForCausalLM(LlamaConfig(...))`` with only its sizes set (hidden 768, 12 layers, 12 heads,
intermediate 2048, vocabulary 32000: 134.1M parameters; the embedding and head are untied, as Llama ships);
everything else is the library's default, caches included (``use_cache=True``: every training forward makes
a ``DynamicCache``). The loss is the model's own, from ``labels=``. Random token ids, the same global batch
for every mode; plain functions (no Trainer): forward, backward, gradient clipping at norm 1, foreach AdamW.
Each mode runs in its own pair of gloo CPU processes (one intra-op thread each, each pinned to its own core
as ``PartiAccelerator`` pins it), one mode after the other, so that peak resident memory is per mode:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``; each rank trains on half of the global batch.
- ``tensor``: ``parallelize(model, ParallelMesh(tensor=2))``: rules from the model's own ``tp_plan``,
  verified at setup on the first batch; both ranks train on the whole global batch.
- ``pipeline``: ``parallelize(model, ParallelMesh(pipeline=2, micro_batches=8, schedule="gpipe"))``:
  the 12 decoder layers in 2 stages; both ranks run the whole global batch in 8 micro-batches.

Reported per mode and rank, each as a ratio to ``ddp`` measured in the same run: throughput (global
samples/s, timed on rank 0 between barriers over the timed steps after warm-up), peak resident memory
(``VmHWM``, ``parti_lightning.rss.peak_rss_bytes``, also above the process's size after imports), and the
bytes of parameters + gradients + AdamW state the rank holds (``rank_state_bytes``; a ``DTensor`` counts
its local shard), taken after the second step's optimizer step. Also: the tensor-parallel report (which
layers were split, every fall-back and its reason), the pipeline stages, setup time, and the first loss
(the same batch in every mode: the losses should agree).

    python benchmarks/hf_llama_parallel.py                               # about 4 minutes on 2 CPU cores
    python benchmarks/hf_llama_parallel.py --rounds 3 --steps 6          # throughput: median of 3 rounds
    python benchmarks/hf_llama_parallel.py --layers 2 --hidden 128 --heads 4 --intermediate 256 --vocab 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import MIB, finish_worker, launch_ranks, ratio, run_worker, table_head, worker_rank

MODES = ("ddp", "tensor", "pipeline")


# ------------------------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> None:
    rank = worker_rank(args.pin)
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from parti_lightning.parallel.state_bytes import rank_state_bytes
    from parti_lightning.rss import peak_rss_bytes

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    rss_after_imports = peak_rss_bytes()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=args.intermediate, vocab_size=args.vocab,
    )
    model = LlamaForCausalLM(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.model.layers.parameters())

    def global_batch(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + step)
        return torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)

    result: dict[str, Any] = {"rank": rank, "params": params, "block_params": block_params,
                              "use_cache": config.use_cache, "attn": config._attn_implementation}
    started = time.perf_counter()
    parallel = None
    if args.mode == "ddp":
        share = args.batch // world
        own = slice(rank * share, (rank + 1) * share)
        net: Any = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from parti_lightning.mesh import ParallelMesh
        from parti_lightning.parallel import parallelize
        from parti_lightning.plan import PartitionPlan

        own = slice(None)  # tensor and pipeline ranks see the same whole batch
        plan_value: dict[str, Any] = (
            {"tensor": world} if args.mode == "tensor"
            else {"pipeline": world, "micro_batches": args.micro_batches, "schedule": "gpipe"}
        )
        plan = PartitionPlan.from_value(plan_value).resolve(world)
        mesh = ParallelMesh(plan, "cpu")
        first = global_batch(0)

        def run_example() -> Any:  # as the strategy runs it: the first batch, no gradients, RNG restored
            with torch.no_grad(), torch.random.fork_rng():
                return model(input_ids=first, labels=first)

        parallel = parallelize(model, mesh, run_example=run_example, batch_size=args.batch)
        net = model
        result["describe"] = parallel.describe()
        report = parallel.tensor_report
        if report is not None:
            result["tensor"] = {
                "source": report.source,
                "split_layers": sum(row.layout != "replicate" for row in report.rows),
                "rows": [[row.name, row.layout, row.source, row.note] for row in report.rows],
                "fallbacks": [list(f) for f in report.fallbacks],
            }
        if parallel.pipeline is not None:
            result["stages"] = parallel.pipeline.stages
    result["setup_s"] = time.perf_counter() - started
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step_context() -> Any:
        import contextlib

        return parallel.step_context() if parallel is not None else contextlib.nullcontext()

    def train_step(step: int) -> float:
        ids = global_batch(step)[own]
        loss = net(input_ids=ids, labels=ids).loss
        with step_context():
            loss.backward()
        if parallel is not None:
            parallel.sync_gradients()
        with step_context():
            if parallel is not None:
                parallel.clip_grad_norm_(model.parameters(), 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        if step == 1:
            result["state"] = rank_state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach()
        if args.mode == "ddp":  # each rank's loss is of its half: the global batch's is their mean
            dist.all_reduce(value)
            value = value / world
        return value.item()

    step_times = []
    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            timed_start = time.perf_counter()
        begin = time.perf_counter()
        losses.append(train_step(step))
        step_times.append(time.perf_counter() - begin)
    dist.barrier()
    seconds = time.perf_counter() - timed_start
    result.update(
        samples_per_s=args.batch * args.steps / seconds,
        median_step_s=statistics.median(step_times[args.warmup:]),
        step_times=step_times,
        losses=losses,
        peak_rss=peak_rss_bytes(),
        rss_after_imports=rss_after_imports,
    )
    finish_worker(Path(args.out, f"{args.mode}-{rank}.json"), result)


# ------------------------------------------------------------------------------------------- parent


def _run_mode(args: argparse.Namespace, mode: str, out: Path) -> list[dict[str, Any]] | str:
    keys = ("layers", "hidden", "heads", "intermediate", "vocab", "seq", "batch", "micro_batches", "steps", "warmup")
    worker_args = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]
    worker_args += [] if args.pin else ["--no-pin"]
    command = [sys.executable, __file__, "--worker", f"--mode={mode}", f"--out={out}", *worker_args]
    return launch_ranks(command, name=mode, out=out, world=args.devices, timeout=args.timeout, mark_failed=False)


def _table(args: argparse.Namespace, results: dict[str, Any]) -> str:
    ddp = results.get("ddp") if isinstance(results.get("ddp"), list) else None
    any_rows = next((r for r in results.values() if isinstance(r, list)), None)
    if any_rows is None:  # every mode failed: their reasons, nothing to tabulate
        return "\n".join(f"{mode}: {result}" for mode, result in results.items())
    first = any_rows[0]
    lines = [
        f"LlamaForCausalLM at library defaults (use_cache={first['use_cache']}, attention"
        f" {first['attn']}): hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate"
        f" {args.intermediate}, vocab {args.vocab}: {first['params'] / 1e6:.1f}M parameters"
        f" ({first['block_params'] / 1e6:.1f}M in the decoder layers); global batch {args.batch} x {args.seq} tokens,"
        f" {args.devices} CPU ranks (gloo, 1 thread each{', pinned' if args.pin else ''}), {args.steps} timed steps"
        f" after {args.warmup}; pipeline: GPipe, {args.micro_batches} micro-batches; {args.rounds} round(s):"
        f" samples/s is the median over rounds (each round's in brackets), everything else the first round's",
        "",
        *table_head(
            "mode", "rank", "params+grads+AdamW (MiB)", "x ddp", "peak RSS (MiB)", "x ddp",
            "peak RSS above imports (MiB)", "x ddp", "samples/s (global)", "x ddp", "median step (s)", "setup (s)",
            "first loss",
        ),
    ]
    for mode in MODES:
        rows = results.get(mode)
        if rows is None:
            continue
        if not isinstance(rows, list):
            lines.append(f"| {mode} | - | FAILED: {rows.splitlines()[0]} |")
            continue
        for rank, row in enumerate(rows):
            base = ddp[rank] if ddp else None
            state = row["state"]["total"]
            above = row["peak_rss"] - row["rss_after_imports"]
            base_above = base["peak_rss"] - base["rss_after_imports"] if base else None
            rate = rows[0]["samples_per_s"]
            each = ", ".join(f"{x:.3f}" for x in row["rounds"])
            lines.append(
                f"| {mode} | {rank} | {state / MIB:.0f} | {ratio(state, base and base['state']['total'])}"
                f" | {row['peak_rss'] / MIB:.0f} | {ratio(row['peak_rss'], base and base['peak_rss'])}"
                f" | {above / MIB:.0f} | {ratio(above, base_above)}"
                f" | {rate:.3f} [{each}] | {ratio(rate, ddp and ddp[0]['samples_per_s'])}"
                f" | {row['median_step_s']:.2f} | {row['setup_s']:.1f} | {row['losses'][0]:.5f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step, all ranks)")
    parser.add_argument("--micro-batches", type=int, default=8, help="pipeline micro-batches (GPipe)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ",".join(MODES))
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each rank to its own core")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per mode")
    parser.add_argument("--rounds", type=int, default=1, help="launches of each mode; throughput is their median")
    parser.add_argument("--json", help="write every rank's figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(_worker, args)
        return
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    if args.batch % args.devices:
        parser.error(f"--batch {args.batch} must be divisible by --devices {args.devices}")
    started = time.perf_counter()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="parti-llama-bench-") as tmp:
        # Rounds alternate the modes, so that slow drift of a shared machine hits all of them alike.
        for _ in range(args.rounds):
            rounds.append({mode: _run_mode(args, mode, Path(tmp)) for mode in modes})
    seconds = time.perf_counter() - started
    results = json.loads(json.dumps(rounds[0]))  # a copy: `rounds` keeps each round's own figures
    for mode in modes:
        if isinstance(results[mode], list):
            per_round = [one[mode][0]["samples_per_s"] for one in rounds if isinstance(one[mode], list)]
            for row in results[mode]:
                row["rounds"] = per_round
                row["samples_per_s"] = statistics.median(per_round)
    for mode in modes:
        rows = results[mode]
        if isinstance(rows, list) and "describe" in rows[0]:
            print(f"[{mode}, rank 0]")
            print("\n".join(rows[0]["describe"]))
            fallbacks = sorted({tuple(f) for row in rows for f in row.get("tensor", {}).get("fallbacks", [])})
            if "tensor" in rows[0]:
                print(f"split layers: {rows[0]['tensor']['split_layers']}; fall-backs: {len(fallbacks)}")
                for unit, reason in fallbacks:
                    print(f"  fell back: {unit}: {reason}")
            print()
    print(_table(args, results))
    print()
    for mode in modes:
        rows = results[mode]
        if isinstance(rows, list):
            times = ", ".join(f"{t:.2f}" for t in rows[0]["step_times"])
            losses = ", ".join(f"{v:.4f}" for v in rows[0]["losses"])
            print(f"{mode}: rank 0 step times (s) [{times}]; losses [{losses}]")
        else:
            print(f"{mode}: FAILED\n{rows}")
    print(f"\nwall time {seconds:.0f} s; command: python benchmarks/hf_llama_parallel.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
