"""Memory soak: does a rank's process memory grow over a long run, after warm-up, beyond noise?

Trains the example's character GPT, small (2 blocks of width 64, context 64, batch 8 per rank), on the
example's text for ``--steps`` optimizer steps (default 2,000, about 5 epochs) with
``PartiStrategy(plan=...)`` on 2 CPU processes, one subprocess per plan (Lightning's launcher re-runs
the script for rank 1), with validation every ``--val-every`` steps and the module's own
``self.log(..., sync_dist=True)`` every step, as an ordinary run does. A callback samples each rank's
resident memory (psutil RSS) every ``--sample-every`` steps, with glibc's own count of the bytes
malloc has handed out and not freed (``mallinfo2``: heap in use plus mmapped blocks), and each rank
writes its samples to a file of its own.

Per plan and rank it reports: the RSS at the end of warm-up (step ``--warmup``) and at the last step,
the difference in MiB and in %, a least-squares line through every sample from the warm-up step to
the end (its slope in KiB per 100 steps, and its rise over the whole window, "fitted growth"), the
noise (standard deviation of the residuals around that line) and the change of malloc's in-use
bytes over the same window. The verdict is "no growth beyond noise" when the fitted growth is below
``--noise-factor`` (2) × the noise, or below ``--tolerance-pct`` (1 %) of the warm-up RSS; otherwise
"growth". Where RSS rises but malloc's in-use bytes do not, the growth is the allocator keeping
freed memory (fragmentation), not live objects; where both rise, something holds on to memory. The
"late slope" fits the second half of the window alone: a leak keeps its slope there, while a warm-up
longer than ``--warmup`` (first epoch, first validation, allocator heaps settling) flattens out.
``--quick`` runs lie almost entirely within that warm-up, so their verdict says little.

Note on the allocator: in ZeRO-2/3 CPU ranks parti fixes glibc's mmap threshold at 128 KiB (see
``parti_lightning.accelerator.release_freed_memory``), so large tensors get their own mappings,
returned to the OS on free; ddp ranks run with glibc's dynamic threshold. A ``MALLOC_MMAP_THRESHOLD_``
in the environment is passed on to every run (and parti then leaves it alone).

    python benchmarks/memory_soak.py                    # ddp and zero3, 2,000 steps each: about 2.5 minutes on 2 cores
    python benchmarks/memory_soak.py --quick            # 300 steps, warm-up 100: a smoke run of the script
    python benchmarks/memory_soak.py --plans ddp zero1 zero2 zero3 --steps 5000 --sample-every 50
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
KIB = 1024
PLANS = ("ddp", "zero1", "zero2", "zero3", "hybrid")
_WORKER_ARGS = ("plan", "devices", "layers", "width", "heads", "block_size", "batch_size", "steps", "val_every",
                "sample_every")


# ------------------------------------------------------------------------------------------- worker


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_counter() -> Any:
    """A function returning (bytes malloc has handed out and not freed, heap bytes it holds), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def count() -> tuple[int, int]:
        info = mallinfo2()
        # uordblks: allocated from the heaps (all arenas); hblkhd: blocks served by their own mmap.
        return info.uordblks + info.hblkhd, info.arena

    return count


def _worker(args: argparse.Namespace) -> None:
    import psutil

    sys.path.insert(0, str(REPO / "examples"))
    import lightning as L

    from parti_lightning import PartiStrategy

    from char_gpt import CharDataModule, CharGPT

    process = psutil.Process()
    malloc_count = _malloc_counter()

    class RssSampler(L.Callback):
        """RSS and malloc's in-use bytes after every ``sample_every``-th optimizer step (and before the first)."""

        def __init__(self) -> None:
            self.samples: list[dict[str, Any]] = []
            self.val_runs: list[int] = []

        def _sample(self, step: int) -> None:
            sample: dict[str, Any] = {"step": step, "t": time.perf_counter(), "rss": process.memory_info().rss,
                                      "py_blocks": sys.getallocatedblocks()}
            if malloc_count is not None:
                sample["malloc_in_use"], sample["malloc_heap"] = malloc_count()
            self.samples.append(sample)

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._sample(0)

        def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
            # global_step counts finished optimizer steps; a validation due at this step runs after this hook.
            step = trainer.global_step
            if step % args.sample_every == 0 or step == args.steps:
                self._sample(step)

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.val_runs.append(trainer.global_step)

    L.seed_everything(0, verbose=False)
    sampler = RssSampler()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=PartiStrategy(plan=args.plan), max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # Validation by global step across epochs (an epoch here is ~410 steps, shorter than the interval).
        val_check_interval=args.val_every, check_val_every_n_epoch=None, callbacks=[sampler],
    )
    model = CharGPT(n_layer=args.layers, n_embd=args.width, n_head=args.heads, block_size=args.block_size)
    data = CharDataModule(block_size=args.block_size, batch_size=args.batch_size)
    trainer.fit(model, datamodule=data)
    result = {
        "rank": trainer.global_rank,
        "num_params": sum(p.numel() for p in model.parameters()),
        "epochs": trainer.current_epoch,
        "val_runs": sampler.val_runs,
        "samples": sampler.samples,
        "malloc_mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- runner


def _run(args: argparse.Namespace, plan: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    run_args = {**vars(args), "plan": plan}
    command = [sys.executable, __file__, "--worker", "--out", str(out)]
    for name in _WORKER_ARGS:
        command += [f"--{name.replace('_', '-')}", str(run_args[name])]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK")}
    log = out / "stderr.txt"
    start = time.perf_counter()
    with log.open("w") as stderr:
        proc = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    wall = time.perf_counter() - start
    ranks = sorted(out.glob("rank*.json"))
    if proc.returncode != 0 or len(ranks) != args.devices:
        tail = "\n".join(log.read_text().strip().splitlines()[-20:])
        raise SystemExit(f"{plan} failed (exit code {proc.returncode}):\n{tail}")
    return {"wall": wall, "ranks": [json.loads(path.read_text()) for path in ranks]}


# ----------------------------------------------------------------------------------------- analysis


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line ys ≈ a + b·xs: (a, b, standard deviation of the residuals)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    intercept = mean_y - slope * mean_x
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    # ddof 2: two parameters were fitted.
    noise = math.sqrt(sum(r * r for r in residuals) / (len(xs) - 2)) if len(xs) > 2 else 0.0
    return intercept, slope, noise


def _analyse(rank: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    samples = rank["samples"]
    window = [s for s in samples if args.warmup <= s["step"] <= args.steps]
    if len(window) < 3:
        raise SystemExit(f"only {len(window)} samples from step {args.warmup} on: lower --sample-every")
    first, last = window[0], window[-1]
    steps = [float(s["step"]) for s in window]
    _, slope, noise = _fit(steps, [float(s["rss"]) for s in window])
    span = last["step"] - first["step"]
    fitted = slope * span
    by_noise = fitted < args.noise_factor * noise
    by_tolerance = fitted < args.tolerance_pct / 100 * first["rss"]
    if by_noise:
        verdict = f"no growth (< {args.noise_factor:g}σ)"
    elif by_tolerance:
        verdict = f"no growth (< {args.tolerance_pct:g} %)"
    else:
        verdict = "GROWTH"
    # The second half of the window alone: a leak keeps its slope there, a long warm-up flattens out.
    late = [s for s in window if s["step"] >= first["step"] + span / 2]
    _, late_slope, late_noise = _fit([float(s["step"]) for s in late], [float(s["rss"]) for s in late])
    _, blocks_slope, _ = _fit(steps, [float(s["py_blocks"]) for s in window])
    row: dict[str, Any] = {
        "rank": rank["rank"],
        "rss_start": samples[0]["rss"],
        "warmup_step": first["step"],
        "rss_warmup": first["rss"],
        "end_step": last["step"],
        "rss_end": last["rss"],
        "rss_max": max(s["rss"] for s in window),
        "growth_bytes": last["rss"] - first["rss"],
        "growth_pct": 100 * (last["rss"] - first["rss"]) / first["rss"],
        "slope_bytes_per_100_steps": 100 * slope,
        "fitted_growth_bytes": fitted,
        "noise_bytes": noise,
        "samples_in_fit": len(window),
        "late_from_step": late[0]["step"],
        "late_slope_bytes_per_100_steps": 100 * late_slope,
        "late_fitted_growth_bytes": late_slope * (last["step"] - late[0]["step"]),
        "late_noise_bytes": late_noise,
        "py_blocks_warmup": first["py_blocks"],
        "py_blocks_end": last["py_blocks"],
        "py_blocks_fitted_growth": blocks_slope * span,
        "no_growth": by_noise or by_tolerance,
        "verdict": verdict,
    }
    if "malloc_in_use" in first:
        _, malloc_slope, malloc_noise = _fit(steps, [float(s["malloc_in_use"]) for s in window])
        row.update({
            "malloc_in_use_warmup": first["malloc_in_use"],
            "malloc_in_use_end": last["malloc_in_use"],
            "malloc_fitted_growth_bytes": malloc_slope * span,
            "malloc_noise_bytes": malloc_noise,
            "malloc_heap_warmup": first["malloc_heap"],
            "malloc_heap_end": last["malloc_heap"],
        })
    return row


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--plans", nargs="+", default=["ddp", "zero3"], choices=PLANS)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64, help="n_embd")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="first step of the fit window (default 200)")
    parser.add_argument("--val-every", type=int, default=None, help="validate every N steps (default 500)")
    parser.add_argument("--sample-every", type=int, default=None, help="sample RSS every N steps (default 20)")
    parser.add_argument("--noise-factor", type=float, default=2.0, help="verdict: fitted growth < this × noise")
    parser.add_argument("--tolerance-pct", type=float, default=1.0, help="verdict: or < this %% of warm-up RSS")
    parser.add_argument("--quick", action="store_true", help="300 steps, warm-up 100, validation every 100")
    parser.add_argument("--json", default="", help="also write the results (with every sample) to this file")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.steps = 300
    defaults = {"warmup": 100, "val_every": 100, "sample_every": 5} if args.quick else \
        {"warmup": 200, "val_every": 500, "sample_every": 20}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0 <= args.warmup < args.steps:
        parser.error("need 0 <= --warmup < --steps")

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 200))
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for plan in args.plans:
            runs[plan] = _run(args, plan, Path(tmp) / plan)
            print(f"{plan}: {args.steps} steps in {runs[plan]['wall']:.0f} s", flush=True)
    wall = time.perf_counter() - started

    rank0 = runs[args.plans[0]]["ranks"][0]
    rows = {plan: [_analyse(rank, args) for rank in run["ranks"]] for plan, run in runs.items()}
    table = Table(title=f"Per-rank RSS over {args.steps} steps (CharGPT {args.layers}×{args.width},"
                        f" {rank0['num_params'] / 1e3:.0f}k parameters, batch {args.batch_size}×{args.block_size} per"
                        f" rank, {args.devices} CPU ranks, validation every {args.val_every} steps, RSS every"
                        f" {args.sample_every} steps); MiB unless stated")
    for column in ("plan", "rank", "RSS start", f"RSS @{args.warmup}", f"RSS @{args.steps}", "growth", "growth %",
                   "slope KiB/100 steps", "fitted growth", "noise σ", "late slope KiB/100 steps",
                   "malloc in-use fitted", "py blocks fitted", "verdict"):
        table.add_column(column, justify="right")
    for plan, plan_rows in rows.items():
        for row in plan_rows:
            malloc = row.get("malloc_fitted_growth_bytes")
            table.add_row(plan, str(row["rank"]), f"{row['rss_start'] / MIB:.1f}", f"{row['rss_warmup'] / MIB:.1f}",
                          f"{row['rss_end'] / MIB:.1f}", f"{row['growth_bytes'] / MIB:+.2f}",
                          f"{row['growth_pct']:+.2f}", f"{row['slope_bytes_per_100_steps'] / KIB:+.1f}",
                          f"{row['fitted_growth_bytes'] / MIB:+.2f}", f"{row['noise_bytes'] / MIB:.2f}",
                          f"{row['late_slope_bytes_per_100_steps'] / KIB:+.1f}",
                          "-" if malloc is None else f"{malloc / MIB:+.2f}", f"{row['py_blocks_fitted_growth']:+,.0f}",
                          row["verdict"], end_section=row is plan_rows[-1])
    console.print(table)
    first = rows[args.plans[0]][0]
    console.print(
        f"RSS start: before the first step. Fit: least squares over the {first['samples_in_fit']} samples from step"
        f" {args.warmup} to {args.steps}; fitted growth = slope × {args.steps - args.warmup} steps; noise σ = std of"
        f" its residuals. Late slope: the same fit from step {first['late_from_step']} on (a leak keeps its slope"
        " there, a long warm-up flattens). malloc in-use: the same fit for glibc's bytes in use (mallinfo2: live"
        " malloc allocations, torch's tensors included); py blocks: for sys.getallocatedblocks() (live Python"
        " objects, which pymalloc keeps in its own mmapped arenas, outside mallinfo). Verdict: no growth (beyond"
        f" noise) when the fitted growth is < {args.noise_factor:g}σ or < {args.tolerance_pct:g} % of RSS"
        f" @{args.warmup}, else GROWTH. zero2/zero3 CPU ranks run with glibc's mmap threshold fixed at 128 KiB by"
        " parti; ddp/zero1 with glibc's dynamic threshold."
    )
    console.print(f"wall time {wall / 60:.1f} min (" + ", ".join(f"{p} {r['wall']:.0f} s" for p, r in runs.items())
                  + ")")
    results = {
        "steps": args.steps, "warmup": args.warmup, "sample_every": args.sample_every, "val_every": args.val_every,
        "num_params": rank0["num_params"], "wall_s": wall,
        "no_growth": all(row["no_growth"] for plan_rows in rows.values() for row in plan_rows),
        "plans": {plan: {"wall_s": runs[plan]["wall"], "ranks": plan_rows} for plan, plan_rows in rows.items()},
    }
    if args.json:
        full = {**results, "samples": {plan: {r["rank"]: r["samples"] for r in run["ranks"]}
                                       for plan, run in runs.items()}}
        Path(args.json).write_text(json.dumps(full, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
