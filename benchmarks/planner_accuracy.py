"""How well the planner predicts and chooses: per-rank peak memory and step time against real CPU runs.

For each model (the example's character GPT at a few sizes) and each plan (ddp, zero1, zero2, zero3,
each with and without activation checkpointing of the blocks; tensor and pipeline parallel over both ranks),
the planner's prediction
(``parti_lightning.planner.estimate`` on a meta-device profile and this machine's cached hardware
profile) is set against a real run: ``Trainer(accelerator="cpu", devices=2, strategy=PartiStrategy(plan))``
in a subprocess, as ``benchmarks/storage_memory.py`` runs them (Lightning's launcher re-runs this
script for the other ranks). ``--ranks 4`` runs every plan on 4 ranks instead (tensor and pipeline degree
2 with data parallelism 2; more ranks than cores are shared, and slow).

Then the choice, over a grid of cells: each model, with no memory limit and with a budget in the middle of
each gap between two consecutive plans' measured peaks (so that only the plans measured below it fit, each
with half the gap as margin; gaps under 3%, the spread of one plan's peak between runs, get none;
``--cells peaks`` puts the budgets at the peaks themselves, where a plan fits only if its prediction is
exact or over). In each cell the planner chooses
among the plans of the grid from its predictions (``choose_plan(..., plans=...)``), and the choice is right
when it fits (measured) and its measured time per sample is within the planner's tie tolerance (5%) of the
fastest plan that fits. The budget is the usable memory, the planner's headroom already taken off: with
exact predictions every cell would be right. (``--headroom 0.1`` puts the planner's default headroom on
top of it: the planner then passes over every plan within 10% of the budget, which is what headroom is
for, and is judged wrong for it.)

- measured memory: the larger rank's peak RSS (``VmHWM``; ``ru_maxrss`` would carry this driver's over exec)
  minus its RSS just before the model is
  built (interpreter, torch, Lightning and parti already imported). Predicted: the planner's peak less
  its per-process overhead (the measured RSS of a bare rank), so both count what the model and its
  training add. Process-group buffers, the dataloader and allocator slack are in the measurement and
  not in the model: that is part of the error this reports.
- measured step time: the median interval between rank 0's ``on_train_batch_end`` calls after
  ``--warmup`` steps.

    python benchmarks/planner_accuracy.py --quick   # one 3M-parameter model, 6 plans: about 3 minutes on 2 cores
    python benchmarks/planner_accuracy.py           # two models (3M, 19M), 11 plans: about 15 minutes
    python benchmarks/planner_accuracy.py --measured a.json b.json   # predictions again, runs pooled: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
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

from parti_lightning.rss import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
PLANS: dict[str, dict[str, str]] = {
    "ddp": {"preset": "ddp"}, "ddp+ac": {"preset": "ddp", "activation_checkpointing": "blocks"},
    "zero1": {"preset": "zero1"}, "zero1+ac": {"preset": "zero1", "activation_checkpointing": "blocks"},
    "zero2": {"preset": "zero2"}, "zero2+ac": {"preset": "zero2", "activation_checkpointing": "blocks"},
    "zero3": {"preset": "zero3"}, "zero3+ac": {"preset": "zero3", "activation_checkpointing": "blocks"},
    # Model parallel over two ranks (each tensor or pipeline group gets the batch a data-parallel rank gets).
    "tp": {"preset": "tp", "tensor": 2}, "pp": {"preset": "pp", "pipeline": 2},
    "pp1f1b": {"preset": "pp", "pipeline": 2, "schedule": "1f1b"},
}
TIE_TOLERANCE = 0.05  # the planner's default
# The spread of one plan's measured peak between runs here (tensor parallel on 4x256: 153 and 158 MiB).
MIN_GAP = 0.03
QUICK_PLANS = ("ddp", "ddp+ac", "zero1", "zero2", "zero3", "zero3+ac")


def _model(layers: int, width: int, block_size: int) -> Any:
    sys.path.insert(0, str(REPO / "examples"))
    from char_gpt import CharGPT

    return CharGPT(n_layer=layers, n_embd=width, n_head=max(1, width // 64), block_size=block_size)


# ------------------------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> None:
    import lightning as L
    import psutil

    from parti_lightning import PartiAccelerator, PartiStrategy

    sys.path.insert(0, str(REPO / "examples"))
    from char_gpt import CharDataModule

    baseline = psutil.Process().memory_info().rss
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            stamps.append(time.perf_counter())

    L.seed_everything(0, verbose=False)
    model = _model(args.layers, args.width, args.block_size)
    trainer = L.Trainer(
        accelerator=PartiAccelerator("cpu", oversubscribe=True), devices=args.ranks,
        strategy=PartiStrategy(plan=json.loads(args.plan)), max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[Stamp()],
    )
    trainer.fit(model, datamodule=CharDataModule(block_size=args.block_size, batch_size=args.batch_size))
    intervals = [b - a for a, b in zip(stamps[args.warmup - 1 : -1], stamps[args.warmup :], strict=True)]
    result = {"baseline": baseline, "peak": peak_rss_bytes(),
              "step_s": statistics.median(intervals)}
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _run(args: argparse.Namespace, layers: int, width: int, plan: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    value = json.dumps(_plan_value(plan, args.ranks))
    command = [sys.executable, __file__, "--worker", "--out", str(out), "--plan", value,
               "--layers", str(layers), "--width", str(width), "--batch-size", str(args.batch_size),
               "--block-size", str(args.block_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--ranks", str(args.ranks)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if len(ranks) != args.ranks:
        raise SystemExit(f"{plan} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if done.returncode:  # both ranks finished and wrote their results; the crash came at shutdown
        print(f"{plan}: exit code {done.returncode} after both ranks wrote their results", flush=True)
    return {"memory": max(r["peak"] - r["baseline"] for r in ranks), "step_s": ranks[0]["step_s"]}


# --------------------------------------------------------------------------------------------- main


def _plan_value(plan: str, ranks: int) -> dict[str, Any]:
    """The plan as given to the strategy: model-parallel plans keep degree 2 and add data parallelism beyond 2 ranks."""
    value: dict[str, Any] = dict(PLANS[plan])
    if ("tensor" in value or "pipeline" in value) and ranks > 2:
        value["data"] = ranks // 2
    return value


def _resolved(plan: str, ranks: int) -> Any:
    from parti_lightning.plan import PartitionPlan

    return PartitionPlan.from_value(_plan_value(plan, ranks)).resolve(ranks, ranks)


def _predict(args: argparse.Namespace, layers: int, width: int, plans: list[str]) -> tuple[dict, Any, Any]:
    import torch

    from parti_lightning.planner import HardwareProfile, estimate, profile_model
    from parti_lightning.planner.timing import time_blocks

    batch = torch.zeros(args.batch_size, args.block_size, dtype=torch.long)
    with torch.device("meta"):
        model = _model(layers, width, args.block_size)
    profile = time_blocks(model, (batch, batch), profile_model(model, (batch, batch)), ranks_per_node=args.ranks)
    hardware = HardwareProfile.measure("cpu", ranks_per_node=args.ranks)
    predictions = {}
    for name in plans:
        est = estimate(profile, hardware, _resolved(name, args.ranks), args.ranks)
        predictions[name] = {"memory": est.peak_bytes - hardware.process_overhead_bytes, "step_s": est.seconds}
    return predictions, profile, hardware


def _choice(profile: Any, hardware: Any, plans: list[str], ranks: int, budget: float | None, headroom: float,
            ) -> str | None:
    """The planner's choice among ``plans`` with ``budget`` bytes per rank above the process's own (None: no limit)."""
    from parti_lightning.planner import NoPlanFits, choose_plan

    if budget is not None:
        # The budget as a user gives it (the whole rank's memory), so that the headroom applies to it all.
        hardware = dataclasses.replace(hardware, memory_bytes=int(budget) + hardware.process_overhead_bytes)
    resolved = [_resolved(p, ranks) for p in plans]
    try:
        chosen = choose_plan(profile, hardware, world_size=ranks, ranks_per_node=ranks, headroom=headroom,
                             tie_tolerance=TIE_TOLERANCE, plans=resolved).chosen
    except NoPlanFits:
        return None
    return plans[resolved.index(chosen)]


def _budgets(peaks: list[float], at: str) -> list[float]:
    """Each cell's budget, largest first: each measured peak (``"peaks"``), or the middle (geometric) of each gap
    between consecutive peaks (``"gaps"``): there the plans on either side have half the gap as margin, where
    a budget equal to a plan's peak asks its prediction to be exact to the byte. Gaps narrower than a run's
    own spread (``MIN_GAP``) get no cell: which side of one a plan falls on is the measurement's noise."""
    ordered = sorted(set(peaks), reverse=True)
    if at == "peaks":
        return ordered
    gaps = zip(ordered, ordered[1:], strict=False)
    return [math.sqrt(high * low) for high, low in gaps if high > low * (1 + MIN_GAP)]


def _cells(model: str, profile: Any, hardware: Any, plans: list[str], measured: dict, ranks: int,
           headroom: float, at: str) -> list[dict]:
    """One cell per budget: none, then one per measured peak or per gap between them (see ``_budgets``)."""
    per_sample = {p: measured[p]["step_s"] / _resolved(p, ranks).data_parallel_size for p in plans}
    cells = []
    for budget in [None, *_budgets([measured[p]["memory"] for p in plans], at)]:
        fits = [p for p in plans if budget is None or measured[p]["memory"] <= budget]
        fastest = min(fits, key=per_sample.__getitem__)
        chosen = _choice(profile, hardware, plans, ranks, budget, headroom)
        right = chosen in fits and per_sample[chosen] <= per_sample[fastest] * (1 + TIE_TOLERANCE)
        cells.append({"model": model, "budget_mib": None if budget is None else budget / MIB, "fits": fits,
                      "chosen": chosen, "measured_fastest": fastest, "right": right,
                      "chosen_vs_fastest": per_sample[chosen] / per_sample[fastest] if chosen in fits else None})
    return cells


def _keep_fastest(runs: dict[str, dict[str, Any]], plan: str, run: dict[str, Any]) -> None:
    """Keep ``run`` as ``plan``'s if it is the plan's first or fastest: this machine's neighbours slow whole runs."""
    if plan not in runs or run["step_s"] < runs[plan]["step_s"]:
        runs[plan] = run


def _earlier_runs(paths: list[str], model: str, plans: list[str]) -> dict[str, dict[str, Any]]:
    """The measured memory and step time of each of ``plans`` on ``model`` in earlier ``--json`` files: of each
    plan, its fastest run in any of them (as ``--repeats`` keeps the fastest)."""
    runs: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["model"].split()[0] == model:
                _keep_fastest(runs, row["plan"], {"memory": row["measured_mib"] * MIB, "step_s": row["measured_s"]})
    missing = [plan for plan in plans if plan not in runs]
    if missing:
        raise SystemExit(f"{', '.join(paths)}: no run of {model} under {', '.join(missing)}")
    return {plan: runs[plan] for plan in plans}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["4x256", "6x512"], help="blocks x width, e.g. 4x256")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one 3M-parameter model, 6 plans, 6 steps")
    parser.add_argument("--ranks", type=int, default=2, help="processes per run (one node)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per plan, round-robin; the fastest is kept")
    parser.add_argument("--headroom", type=float, default=0.0, help="headroom on top of each cell's usable budget")
    parser.add_argument("--cells", choices=("gaps", "peaks"), default="gaps",
                        help="budgets between consecutive measured peaks, or at each peak")
    parser.add_argument("--json", default="", help="also write the rows and cells to this file")
    parser.add_argument("--measured", nargs="*", default=[], help="predict again against the runs of earlier --json "
                        "files (no new runs; the fastest run of each plan across them): a cost-model change judged "
                        "on the same measurements, or more repeats pooled")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.models, args.plans, args.steps = ["4x256"], list(QUICK_PLANS), 6

    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    rows, cells = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            layers, width = (int(v) for v in model.split("x"))
            predicted, profile, hardware = _predict(args, layers, width, args.plans)
            measured = _earlier_runs(args.measured, model, args.plans) if args.measured else {}
            # Round-robin repeats, the fastest kept: this machine's neighbours slow whole runs down, not steps.
            for repeat in range(0 if args.measured else args.repeats):
                for plan in args.plans:
                    run = _run(args, layers, width, plan, Path(tmp, f"{model}-{plan}-{repeat}"))
                    print(f"{model} {plan}: {run['memory'] / MIB:.0f} MiB, {run['step_s']:.3f} s", flush=True)
                    _keep_fastest(measured, plan, {"memory": run["memory"], "step_s": run["step_s"]})
            label = f"{model} ({profile.parameter_count / 1e6:.1f}M)"
            model_cells = _cells(label, profile, hardware, args.plans, measured, args.ranks, args.headroom,
                                 args.cells)
            cells.extend(model_cells)
            chosen, fastest = model_cells[0]["chosen"], model_cells[0]["measured_fastest"]  # the unlimited budget
            for plan in args.plans:
                p, m = predicted[plan], measured[plan]
                rows.append({"model": label, "plan": plan,
                             "predicted_mib": p["memory"] / MIB, "measured_mib": m["memory"] / MIB,
                             "memory_error_pct": 100 * (p["memory"] - m["memory"]) / m["memory"],
                             "predicted_s": p["step_s"], "measured_s": m["step_s"],
                             "time_error_pct": 100 * (p["step_s"] - m["step_s"]) / m["step_s"],
                             "chosen": plan == chosen, "measured_fastest": plan == fastest})
    table = Table(title=f"Planner predictions vs {args.ranks}-rank CPU runs (batch {args.batch_size}×{args.block_size}"
                        " per data-parallel rank, fp32 AdamW); memory = peak RSS − RSS before the model")
    for column in ("model", "plan", "pred MiB", "meas MiB", "mem err %", "pred s", "meas s", "time err %",
                   "planner's choice", "measured fastest per sample"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["model"], row["plan"], f"{row['predicted_mib']:.0f}", f"{row['measured_mib']:.0f}",
                      f"{row['memory_error_pct']:+.0f}", f"{row['predicted_s']:.3f}", f"{row['measured_s']:.3f}",
                      f"{row['time_error_pct']:+.0f}", "→" if row["chosen"] else "",
                      "✓" if row["measured_fastest"] else "")
    console.print(table)
    choices = Table(title=f"The planner's choice per budget, {args.headroom:.0%} headroom (right: it fits, and is"
                          " within 5% of the measured fastest per sample)")
    for column in ("model", "budget MiB", "plans that fit (measured)", "planner's choice", "measured fastest",
                   "choice / fastest", "right"):
        choices.add_column(column, justify="right")
    for cell in cells:
        ratio = cell["chosen_vs_fastest"]
        choices.add_row(cell["model"], "none" if cell["budget_mib"] is None else f"{cell['budget_mib']:.0f}",
                        str(len(cell["fits"])), str(cell["chosen"]), cell["measured_fastest"],
                        "-" if ratio is None else f"{ratio:.2f}", "✓" if cell["right"] else "✗")
    console.print(choices)
    right = sum(cell["right"] for cell in cells)
    console.print(f"chosen right in {right} of {len(cells)} cells ({100 * right / len(cells):.0f}%)")
    console.print(f"wall time {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cells": cells}, indent=2))


if __name__ == "__main__":
    main()
