"""Per-rank memory and throughput of ZeRO-0/1/2/3 (``plan="ddp"``, ``"zero1"``, ``"zero2"``, ``"zero3"``).

Trains the example's character GPT, scaled to about 100M parameters (14 blocks of width 768, 12
heads: 99.5M), on the example's text with ``PartiStrategy(plan=...)`` on 2 CPU processes, one
subprocess per plan (Lightning's launcher re-runs the script for rank 1), and reports per rank:

- the tensor bytes the rank holds, from ``parti_lightning.parallel.state_bytes.rank_state_bytes``
  (parameters, gradients, optimizer state), taken in ``on_before_optimizer_step`` of the second step,
  when the gradients of that step and the AdamW state of the first both exist; with its ratio to ddp's
  and to the ideal: a single process's total (16 bytes per parameter for fp32 AdamW) divided by the
  number of ranks;
- the process's peak resident memory (``VmHWM``, read at the end of the run) and
  its resident memory when the bytes were counted (psutil), with the ratio to ddp's;
- throughput: samples/s over windows of steps after a warm-up, timed on rank 0; the median window.

Every plan runs twice, under two settings of glibc's allocator (``--malloc``): ``glibc``, its
defaults, and ``mmap128k``, ``MALLOC_MMAP_THRESHOLD_=131072``. With the defaults the mmap threshold
rises to the size of each large block freed (up to 32 MiB), after which FSDP's gathered units and
gradient buffers come from malloc's heap, which keeps them resident once freed: ZeRO-2/3 then hold
about twice their tensor bytes, more than ddp in all. A fixed threshold gives every large tensor its
own mapping, returned to the OS on free (RSS tracks tensor bytes), at the price of page faults.
Since this was measured, parti fixes the threshold itself in the CPU ranks of ZeRO-2/3 plans
(``parti_lightning.accelerator.release_freed_memory``), so the ``glibc`` rows show what a user gets
by default: glibc's defaults for ddp and zero1, the fixed threshold for zero2 and zero3. The
``mmap128k`` rows apply the fixed threshold to every plan.

Then, for ``--budget-plans`` (ddp and zero3) under each allocator setting, the largest number of
blocks (width fixed) whose run completes ``--budget-steps`` steps with every rank's peak RSS within
``--budget-gib``. The budget is enforced by measurement, not by ``RLIMIT_AS``: the parent polls the
ranks' RSS and stops a run that goes over, and a run that finishes counts only if both ranks'
peak RSS are within the budget. An address-space limit would count virtual reservations (thread
stacks, glibc's per-thread malloc arenas, gloo's buffers: the table's VSZ column) that are never
resident, so it would refuse runs whose resident memory is well inside the budget. The search fits
peak RSS against the number of blocks from two runs (half the table's size, and the table's run),
then verifies the prediction by real runs until it brackets the answer (a size that fits, and the
next one that does not).

    python benchmarks/storage_memory.py                 # defaults below: about 9 minutes on 2 cores
    python benchmarks/storage_memory.py --quick         # 3M parameters, 0.5 GiB budget: about 3 minutes
    python benchmarks/storage_memory.py --plans ddp zero3 --malloc mmap128k --layers 12 --budget-gib 3 --steps 11

Throughput from 2 windows of 3 steps is noisy under the glibc defaults (windows of one run differ by
up to 25%); use ``--rounds 2`` or more ``--steps`` when the speed ratios matter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from parti_lightning.rss import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
MIB = 1024**2
PLANS = ("ddp", "zero1", "zero2", "zero3")
# glibc's malloc serves a request above its mmap threshold with a fresh mapping, returned to the OS
# on free, and anything below from its heaps, which keep freed memory. The threshold starts at 128 KiB
# but rises to the size of each freed mapping (up to 32 MiB), so once a few MiB-sized tensors were
# freed, later ones of that size (FSDP's gathered units and gradient buffers) come from the heap and
# their memory stays resident after they are freed. Setting the threshold (any MALLOC_*_ tunable)
# turns the dynamic adjustment off.
MALLOC: dict[str, dict[str, str]] = {"glibc": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
_WORKER_ARGS = ("plan", "devices", "layers", "width", "batch_size", "block_size", "steps", "warmup", "window_steps")


# ------------------------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> None:
    import psutil

    sys.path.insert(0, str(REPO / "examples"))
    import lightning as L

    from parti_lightning import PartiStrategy
    from parti_lightning.parallel.state_bytes import rank_state_bytes

    from char_gpt import CharDataModule, CharGPT

    baseline_rss = psutil.Process().memory_info().rss  # interpreter + torch + lightning, no model yet

    class MemoryProbe(L.Callback):
        """Counts the rank's tensor bytes once (second step, before the optimizer step) and stamps every step."""

        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.state_bytes: dict[str, int] = {}
            self.rss_at_count = 0
            self.vms_at_count = 0

        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            # global_step counts finished optimizer steps: 1 means the AdamW state exists, and this
            # step's gradients (reduced, or reduce-scattered under ZeRO-2/3) are still there.
            if trainer.global_step == 1 and not self.state_bytes:
                self.state_bytes = rank_state_bytes(pl_module, trainer.optimizers)
                info = psutil.Process().memory_info()
                self.rss_at_count, self.vms_at_count = info.rss, info.vms

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            self.stamps.append(time.perf_counter())

    L.seed_everything(0, verbose=False)
    probe = MemoryProbe()
    model = CharGPT(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64),
                    block_size=args.block_size)
    num_params = sum(p.numel() for p in model.parameters())
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=PartiStrategy(plan=args.plan), max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[probe],
    )
    data = CharDataModule(block_size=args.block_size, batch_size=args.batch_size)
    trainer.fit(model, datamodule=data)
    result = {
        "rank": trainer.global_rank,
        "num_params": num_params,
        "baseline_rss": baseline_rss,
        "peak_rss": peak_rss_bytes(),  # this process's own peak: ru_maxrss would carry the launcher's over exec
        "rss_at_count": probe.rss_at_count,
        "vms_at_count": probe.vms_at_count,
        "state_bytes": probe.state_bytes,
        "stamps": probe.stamps,
    }
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- runner


def _run(args: argparse.Namespace, plan: str, layers: int, steps: int, out: Path, malloc: str,
         budget: float | None = None) -> dict[str, Any]:
    """One training run in a subprocess (both ranks); the per-rank results, or why there are none."""
    out.mkdir(parents=True, exist_ok=True)
    run_args = {**vars(args), "plan": plan, "layers": layers, "steps": steps}
    command = [sys.executable, __file__, "--worker", "--out", str(out)]
    for name in _WORKER_ARGS:
        command += [f"--{name.replace('_', '-')}", str(run_args[name])]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK")
           and not k.startswith("MALLOC_")}
    env.update(MALLOC[malloc])
    log = out / "stderr.txt"
    start = time.perf_counter()
    with log.open("w") as stderr:
        # A session of its own, so that a run over budget can be stopped with both of its ranks.
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
        polled_peak = _watch(proc, budget)
    wall = time.perf_counter() - start
    ranks = sorted(out.glob("rank*.json"))
    if polled_peak < 0:
        return {"ok": False, "why": f"over budget (stopped at {-polled_peak / GIB:.3f} GiB RSS)", "wall": wall}
    if proc.returncode != 0 or len(ranks) != args.devices:
        tail = log.read_text().strip().splitlines()[-15:]
        return {"ok": False, "why": f"exit code {proc.returncode}", "log": "\n".join(tail), "wall": wall}
    results = [json.loads(path.read_text()) for path in ranks]
    return {"ok": True, "ranks": results, "wall": wall}


def _watch(proc: subprocess.Popen, budget: float | None) -> int:
    """Wait for ``proc``; with a budget, stop its session once a rank's RSS exceeds it (returns minus that RSS)."""
    import psutil

    if budget is None:
        proc.wait()
        return 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            members = [parent, *parent.children(recursive=True)]
            worst = max(member.memory_info().rss for member in members)
        except psutil.Error:
            worst = 0  # a rank just ended; its peak is still checked afterwards
        if worst > budget:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this script started for the run
            proc.wait()
            return -worst
        time.sleep(0.1)
    return 0


def _window_rates(rank0: dict[str, Any], args: argparse.Namespace) -> list[float]:
    stamps = rank0["stamps"][args.warmup - 1 :]
    global_batch = args.batch_size * args.devices
    windows = (len(stamps) - 1) // args.window_steps
    return [
        global_batch * args.window_steps / (stamps[(i + 1) * args.window_steps] - stamps[i * args.window_steps])
        for i in range(windows)
    ]


# ------------------------------------------------------------------------------------- budget search


def _peak(run: dict[str, Any]) -> int:
    return max(rank["peak_rss"] for rank in run["ranks"])


def _largest_within(args: argparse.Namespace, plan: str, malloc: str, budget: float, tmp: Path,
                    known: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Largest number of blocks whose run stays within ``budget`` on every rank, by real runs."""
    tried: dict[int, dict[str, Any]] = dict(known)

    def fits(layers: int) -> bool:
        if layers not in tried:
            out = tmp / f"budget-{malloc}-{plan}-{layers}"
            tried[layers] = _run(args, plan, layers, args.budget_steps, out, malloc, budget)
            run = tried[layers]
            status = f"peak {_peak(run) / GIB:.3f} GiB" if run["ok"] else run["why"]
            print(f"  {plan} ({malloc}) n_layer={layers}: {status} ({run['wall']:.0f} s)", flush=True)
        run = tried[layers]
        return run["ok"] and _peak(run) <= budget

    # Two points for a line peak(layers) = a + b * layers; its prediction is where a search starts that
    # gallops away from it until it brackets the answer (a size that fits, the next that does not),
    # then bisects. Every verdict is a real run.
    low = max(1, args.layers // 2)
    points = [n for n in sorted({low, args.layers}) if fits(n) or tried[n]["ok"]]
    if len(points) == 2:
        (x0, x1), (y0, y1) = points, [_peak(tried[n]) for n in points]
        slope = (y1 - y0) / (x1 - x0)
        guess = max(1, math.floor(x0 + (budget - y0) / slope)) if slope > 0 else args.layers
    else:
        guess = low
    budget_left = args.max_search_runs + len(tried)
    lo, hi, step = 0, None, 1
    if fits(guess):
        lo = guess
        while hi is None and len(tried) < budget_left:
            if fits(lo + step):
                lo, step = lo + step, step * 2
            else:
                hi = lo + step
    else:
        hi = guess
        while lo == 0 and hi > 1 and len(tried) < budget_left:
            candidate = max(1, hi - step)
            if fits(candidate):
                lo = candidate
            else:
                hi, step = candidate, step * 2
    while hi is not None and hi - lo > 1 and len(tried) < budget_left:
        middle = (lo + hi) // 2
        lo, hi = (middle, hi) if fits(middle) else (lo, middle)
    best = lo
    params = tried[best]["ranks"][0]["num_params"] if best else 0
    return {"plan": plan, "malloc": malloc, "layers": best, "params": params, "tried": tried,
            "bracketed": hi == best + 1}


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    parser.add_argument("--malloc", nargs="+", default=list(MALLOC), choices=MALLOC,
                        help="glibc allocator settings to compare (see the docstring)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--layers", type=int, default=14, help="blocks (14 × width 768: 99.5M parameters)")
    parser.add_argument("--width", type=int, default=768, help="n_embd; heads = width // 64")
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="steps per table run: warm-up, then timed windows")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (>= 2: bytes are counted in step 2)")
    parser.add_argument("--window-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="table runs per plan, alternating between plans")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="per-rank peak RSS budget (default 2, --quick 0.5); 0 skips the search")
    parser.add_argument("--budget-plans", nargs="+", default=["ddp", "zero3"], choices=PLANS)
    parser.add_argument("--budget-steps", type=int, default=3, help="steps a run must complete within the budget")
    parser.add_argument("--max-search-runs", type=int, default=6, help="runs from the prediction on, per search")
    parser.add_argument("--quick", action="store_true", help="4 blocks of width 256, short runs, 0.5 GiB budget")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.layers, args.width, args.steps, args.window_steps = 4, 256, 6, 2
    if args.budget_gib is None:
        args.budget_gib = 0.5 if args.quick else 2.0
    if args.warmup < 2 or args.steps < args.warmup + args.window_steps:
        parser.error("need --warmup >= 2 and --steps >= warmup + window-steps")

    from rich.console import Console

    console = Console(width=max(Console().width, 150))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, p): [] for m in args.malloc for p in args.plans}
        for round_ in range(args.rounds):
            for malloc, plan in runs:
                run = _run(args, plan, args.layers, args.steps, tmp / f"{malloc}-{plan}{round_}", malloc)
                if not run["ok"]:
                    raise SystemExit(f"{plan} ({malloc}) failed: {run['why']}\n{run.get('log', '')}")
                print(f"{plan} ({malloc}): {run['wall']:.0f} s", flush=True)
                runs[malloc, plan].append(run)
        summary = _tables(console, args, runs)
        search = []
        if args.budget_gib > 0:
            print(f"largest model within {args.budget_gib:g} GiB of peak RSS per rank:", flush=True)
            for malloc in args.malloc:
                for plan in args.budget_plans:
                    known = {args.layers: runs[malloc, plan][0]} if (malloc, plan) in runs else {}
                    search.append(_largest_within(args, plan, malloc, args.budget_gib * GIB, tmp, known))
            _budget_table(console, args, search)
    wall = time.perf_counter() - started
    console.print(f"wall time {wall / 60:.1f} min")
    results = {"table": summary, "budget_gib": args.budget_gib, "wall_s": wall,
               "largest_within_budget": [{k: s[k] for k in ("plan", "malloc", "layers", "params", "bracketed")}
                                         for s in search]}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


def _tables(console: Any, args: argparse.Namespace, runs: dict[tuple[str, str], list[dict[str, Any]]]) -> dict:
    from rich.table import Table

    num_params = next(iter(runs.values()))[0]["ranks"][0]["num_params"]
    ideal = 16 * num_params / args.devices  # fp32 parameter + gradient + two AdamW moments, split N ways
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for (malloc, plan), plan_runs in runs.items():
        ranks = plan_runs[0]["ranks"]  # tensor bytes do not change between rounds
        state = [rank["state_bytes"] for rank in ranks]
        rates = [rate for run in plan_runs for rate in _window_rates(run["ranks"][0], args)]
        rows[malloc, plan] = {
            **{key: max(s[key] for s in state) for key in ("parameters", "gradients", "optimizer_state", "total")},
            "total_per_rank": [s["total"] for s in state],
            "peak_rss_per_rank": [max(run["ranks"][r]["peak_rss"] for run in plan_runs) for r in range(len(ranks))],
            "rss_at_count_per_rank": [rank["rss_at_count"] for rank in ranks],
            "vms_at_count_per_rank": [rank["vms_at_count"] for rank in ranks],
            "baseline_rss": max(rank["baseline_rss"] for rank in ranks),
            "samples_per_s": statistics.median(rates),
            "windows": rates,
        }

    def ratio(malloc: str, plan: str, key: str) -> str:
        ref = rows.get((malloc, "ddp"))
        if ref is None:
            return "-"
        value, base = rows[malloc, plan][key], ref[key]
        value, base = (max(v) if isinstance(v, list) else v for v in (value, base))
        return f"{value / base:.2f}"

    title = (f"Per-rank tensor bytes (rank_state_bytes), CharGPT {args.layers}×{args.width} ({num_params / 1e6:.1f}M"
             f" parameters, fp32 AdamW), {args.devices} CPU ranks; ideal = 16 B × parameters / {args.devices} ="
             f" {ideal / MIB:,.0f} MiB")
    table = Table(title=title)
    for column in ("plan", "params MiB", "grads MiB", "optim MiB", "total MiB (r0 / r1)", "total ×ddp", "total ×ideal"):
        table.add_column(column, justify="right")
    first_malloc = args.malloc[0]  # the allocator does not change what tensors exist
    for plan in args.plans:
        row = rows[first_malloc, plan]
        table.add_row(plan, f"{row['parameters'] / MIB:,.0f}", f"{row['gradients'] / MIB:,.0f}",
                      f"{row['optimizer_state'] / MIB:,.0f}",
                      " / ".join(f"{t / MIB:,.0f}" for t in row["total_per_rank"]),
                      ratio(first_malloc, plan, "total"), f"{row['total'] / ideal:.2f}")
    console.print(table)

    windows = len(next(iter(rows.values()))["windows"])
    table = Table(title=f"Per-rank process memory and throughput (batch {args.batch_size}×{args.block_size} per rank;"
                        f" samples/s: median of {windows} window(s) of {args.window_steps} steps)")
    for column in ("malloc", "plan", "peak RSS GiB (r0 / r1)", "peak ×ddp", "RSS at count GiB",
                   "RSS at count − base", "VSZ at count", "samples/s", "×ddp"):
        table.add_column(column, justify="right")
    for (malloc, plan), row in rows.items():
        above_base = max(row["rss_at_count_per_rank"]) - row["baseline_rss"]
        table.add_row(malloc, plan, " / ".join(f"{p / GIB:.2f}" for p in row["peak_rss_per_rank"]),
                      ratio(malloc, plan, "peak_rss_per_rank"),
                      " / ".join(f"{p / GIB:.2f}" for p in row["rss_at_count_per_rank"]),
                      f"{above_base / GIB:.2f} ({above_base / row['total']:.2f}× tensors)",
                      f"{max(row['vms_at_count_per_rank']) / GIB:.1f}",
                      f"{row['samples_per_s']:.2f}", ratio(malloc, plan, "samples_per_s"),
                      end_section=plan == args.plans[-1])
    console.print(table)
    console.print(f"base = RSS of a rank after importing torch, lightning and parti, before the model:"
                  f" {max(r['baseline_rss'] for r in rows.values()) / GIB:.2f} GiB. RSS at count: when the"
                  " tensor bytes were counted (step 2, before the optimizer step). VSZ in GiB.")
    return {"num_params": num_params, "ideal_bytes_per_rank": ideal,
            "rows": [{"malloc": m, "plan": p, **row} for (m, p), row in rows.items()]}


def _budget_table(console: Any, args: argparse.Namespace, search: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=f"Largest model within {args.budget_gib:g} GiB peak RSS per rank (width {args.width},"
                        f" batch {args.batch_size}×{args.block_size}, {args.budget_steps} steps must complete)")
    for column in ("malloc", "plan", "largest n_layer", "parameters", "×ddp", "its peak RSS GiB",
                   "n_layer + 1: peak RSS GiB", "runs"):
        table.add_column(column, justify="right")
    ddp_params = {s["malloc"]: s["params"] for s in search if s["plan"] == "ddp"}
    for result in search:
        tried, layers = result["tried"], result["layers"]
        fit, above = tried.get(layers), tried.get(layers + 1)
        if above is None:
            outcome = "not tried (search cap)"
        elif above["ok"]:
            outcome = f"{_peak(above) / GIB:.3f}" + (" (over)" if _peak(above) > args.budget_gib * GIB else "")
        else:
            outcome = above["why"]
        base = ddp_params.get(result["malloc"])
        table.add_row(result["malloc"], result["plan"], str(layers), f"{result['params'] / 1e6:.1f}M",
                      f"{result['params'] / base:.2f}" if base else "-",
                      f"{_peak(fit) / GIB:.3f}" if fit else "-", outcome, str(len(tried)),
                      end_section=result["plan"] == args.budget_plans[-1])
    console.print(table)
    console.print("runs: verdicts the search used, the table's own run at the table size included; the budget is"
                  " checked against the larger rank's peak RSS, and a run is stopped once a rank's RSS passes it.")


if __name__ == "__main__":
    main()
