"""Step time with each block compiled (``torch.compile``, CPU inductor) against eager, under ddp, tensor=2, pipeline=2.

What ``trainer.fit(torch.compile(model))`` does under parti, without the Trainer: the plan is applied with
``parallelize(model, ParallelMesh(plan, "cpu"), run_example=..., batch_size=..., compiler=...)``, where
``compiler`` is ``torch.compile(model).dynamo_ctx`` (what Lightning's ``from_compiled`` records and parti's
strategy hands over), so each repeated block's ``forward`` is compiled after partitioning
(``parallel/compile.py``'s ``compile_blocks``); the eager variant passes ``compiler=None``. The model is the
example's ``CharGPT`` (``examples/char_gpt.py``) at a modest size, trained on the example's text with plain
functions: forward, cross entropy, backward and optimizer step inside ``Parallelized.step_context()``,
``sync_gradients()``, clipping at norm 1 by ``Parallelized.clip_grad_norm_``, foreach AdamW. Plans: ``ddp``
(parti's data=2: gradients averaged by its ``GradientSynchronizer``), ``tensor`` (tensor=2, automatic rules
verified at setup) and ``pipeline`` (pipeline=2, GPipe, ``--micro-batches``).

Every (plan, variant) runs in its own pair of gloo CPU processes (one intra-op thread each, each pinned to its
own core), with a fresh, empty inductor cache directory, so that the compiled variant's first step pays the
whole compile (forward and backward graphs) as a first run does. Reported: the first step's time (compile
included) and the steady step time (median of the timed steps after ``--warmup`` further steps, each
started after a barrier, rank 0's clock); the ratios compiled / eager of each plan, and every variant's step
time over eager ddp's, all measured in the same run; the graphs dynamo compiled (``unique_graphs``) and its
recompilations per rank; the first and last loss (compiled and eager should agree closely).

    python benchmarks/compile_speed.py                             # about 10 minutes on 2 CPU cores
    python benchmarks/compile_speed.py --plans ddp,tensor --layers 2 --width 128 --steps 3
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

from _harness import REPO, finish_worker, launch_ranks, ratio, run_worker, table_head, worker_rank

PLANS: dict[str, dict[str, Any]] = {
    "ddp": {"preset": "ddp"},
    "tensor": {"tensor": 2},
    "pipeline": {"pipeline": 2, "schedule": "gpipe"},
}
VARIANTS = ("eager", "compiled")


# ------------------------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> None:
    rank = worker_rank(args.pin)
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "examples"))
    from parti_lightning.mesh import ParallelMesh
    from parti_lightning.parallel import parallelize
    from parti_lightning.plan import PartitionPlan

    from char_gpt import CharGPT, load_vocab, read_text

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = CharGPT(block_size=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.width)
    params = sum(p.numel() for p in model.parameters())
    vocab = load_vocab()
    tokens = torch.tensor(vocab.encode(read_text()), dtype=torch.long)

    def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, tokens.numel() - args.seq - 1, (args.batch,), generator=torch.Generator().manual_seed(step)
        )
        windows = torch.stack([tokens[s : s + args.seq + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    value = dict(PLANS[args.plan])
    if args.plan == "pipeline":
        value["micro_batches"] = args.micro_batches
    plan = PartitionPlan.from_value(value).resolve(world)
    mesh = ParallelMesh(plan, "cpu")
    dp, dp_rank = mesh.data_parallel_size, mesh.data_parallel_rank
    share = args.batch // dp
    own = slice(dp_rank * share, (dp_rank + 1) * share)
    first = global_batch(0)[0][own]

    def run_example() -> Any:  # as the strategy runs it: the first batch, no gradients, RNG restored
        with torch.no_grad(), torch.random.fork_rng():
            return model(first)

    compiler = None
    if args.variant == "compiled":
        compiler = torch.compile(model, backend=args.backend).dynamo_ctx
    started = time.perf_counter()
    parallel = parallelize(model, mesh, run_example=run_example, batch_size=share, compiler=compiler)
    setup_s = time.perf_counter() - started
    compiled_blocks = sum(bool(getattr(m, "_parti_compiled_forward", False)) for m in model.modules())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def train_step(step: int) -> float:
        x, y = (t[own] for t in global_batch(step))
        loss = model._loss(model(x), y)
        with parallel.step_context():
            loss.backward()
        parallel.sync_gradients()
        with parallel.step_context():
            parallel.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach()
        if dp > 1:
            dist.all_reduce(value, group=mesh.data_parallel_group)
            value = value / dp
        return value.item()

    times, losses = [], []
    for step in range(1 + args.warmup + args.steps):
        dist.barrier()
        begin = time.perf_counter()
        try:
            losses.append(train_step(step))
        except BaseException:
            print(f"rank {rank}: step {step} failed (step 0 is the first)", flush=True)
            raise
        times.append(time.perf_counter() - begin)
    dist.barrier()
    from torch._dynamo.utils import counters

    result = {
        "rank": rank,
        "params": params,
        "setup_s": setup_s,
        "first_step_s": times[0],
        "step_s": statistics.median(times[1 + args.warmup :]),
        "times": times,
        "losses": losses,
        "compiled_blocks": compiled_blocks,
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
        "graph_breaks": sum(counters["graph_break"].values()),
        "describe": parallel.describe(),
    }
    finish_worker(Path(args.out, f"{args.plan}-{args.variant}-{rank}.json"), result)


# ------------------------------------------------------------------------------------------- parent


def _launch(args: argparse.Namespace, plan: str, variant: str, out: Path) -> list[dict[str, Any]] | str:
    keys = ("layers", "width", "heads", "seq", "batch", "micro_batches", "steps", "warmup", "backend")
    worker_args = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys] + ([] if args.pin else ["--no-pin"])
    name = f"{plan}-{variant}"
    cache = out / f"inductor-{name}"  # empty: the compiled variant's first step compiles everything
    command = [sys.executable, __file__, "--worker", f"--plan={plan}", f"--variant={variant}", f"--out={out}",
               *worker_args]
    return launch_ranks(command, name=name, out=out, world=2, timeout=args.timeout,
                        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)}, cwd=REPO)


def _table(args: argparse.Namespace, runs: dict[tuple[str, str], Any], plans: list[str]) -> str:
    ok = [rows for rows in runs.values() if isinstance(rows, list)]
    params = ok[0][0]["params"] if ok else 0
    base = runs.get(("ddp", "eager"))
    base_step = base[0]["step_s"] if isinstance(base, list) else None
    lines = [
        f"CharGPT {args.layers} x {args.width} ({args.heads} heads), {params / 1e6:.2f}M parameters, global batch"
        f" {args.batch} x {args.seq} characters, 2 CPU ranks (gloo, 1 thread each{', pinned' if args.pin else ''}),"
        f" torch.compile backend {args.backend!r} on each block; step: median of {args.steps} timed steps after the"
        f" first + {args.warmup}; pipeline: GPipe, {args.micro_batches} micro-batches",
        "",
        *table_head(
            "plan", "variant", "first step (s)", "of which compile, vs eager's first (s)", "step (s)",
            "compiled / eager", "x eager ddp", "samples/s", "setup (s)", "blocks compiled (r0)", "graphs (r0/r1)",
            "recompiles (r0/r1)", "graph breaks (r0/r1)", "loss first / last",
        ),
    ]
    for plan in plans:
        eager = runs.get((plan, "eager"))
        for variant in VARIANTS:
            rows = runs.get((plan, variant))
            if rows is None:
                continue
            if not isinstance(rows, list):
                lines.append(f"| {plan} | {variant} | FAILED: {rows.splitlines()[0]} |")
                continue
            r0, r1 = rows
            eager_ok = isinstance(eager, list)
            compiling = eager_ok and variant != "eager"
            compile_s = f"{r0['first_step_s'] - eager[0]['first_step_s']:.1f}" if compiling else "-"
            to_eager = ratio(r0["step_s"], eager[0]["step_s"] if eager_ok else None)
            lines.append(
                f"| {plan} | {variant} | {r0['first_step_s']:.1f} | {compile_s} | {r0['step_s']:.3f} | {to_eager}"
                f" | {ratio(r0['step_s'], base_step)} | {args.batch / r0['step_s']:.1f} | {r0['setup_s']:.1f}"
                f" | {r0['compiled_blocks']}"
                f" | {r0['unique_graphs']}/{r1['unique_graphs']} | {r0['recompiles']}/{r1['recompiles']}"
                f" | {r0['graph_breaks']}/{r1['graph_breaks']} | {r0['losses'][0]:.4f} / {r0['losses'][-1]:.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="global batch (windows per step, all ranks)")
    parser.add_argument("--micro-batches", type=int, default=4, help="pipeline micro-batches (GPipe)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps after the first, before the timed ones")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--plans", default=",".join(PLANS), help="comma-separated subset of: " + ",".join(PLANS))
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each rank to its own core")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    parser.add_argument("--json", help="write every rank's figures here")
    parser.add_argument("--work", help="keep the ranks' logs and results here (default: a temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", choices=tuple(PLANS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(_worker, args)
        return
    plans = args.plans.split(",")
    if unknown := [p for p in plans if p not in PLANS]:
        parser.error(f"unknown plan(s): {', '.join(unknown)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="parti-compile-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = {(plan, variant): _launch(args, plan, variant, work) for plan in plans for variant in VARIANTS}
    seconds = time.perf_counter() - started
    for plan in plans:
        rows = runs[(plan, "compiled")]
        if isinstance(rows, list):
            print(f"[{plan}, compiled, rank 0]")
            print("\n".join(rows[0]["describe"]) or "data parallel")
            print()
    print(_table(args, runs, plans))
    print()
    for (plan, variant), rows in runs.items():
        if isinstance(rows, list):
            print(f"{plan} {variant}: rank 0 step times (s) [{', '.join(f'{t:.3f}' for t in rows[0]['times'])}]")
        else:
            print(f"{plan} {variant}: FAILED\n{rows}")
    print(f"\nwall time {seconds:.0f} s; command: python benchmarks/compile_speed.py " + " ".join(sys.argv[1:]))
    if args.json:
        record = {"args": vars(args), "seconds": seconds, "runs": {f"{p}-{v}": r for (p, v), r in runs.items()}}
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
