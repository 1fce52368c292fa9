"""The planner's report as a rich table, and as plain text for logs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from parti_lightning.planner import cost

if TYPE_CHECKING:
    from parti_lightning.planner.search import PlanReport

GIB = 1024**3


def report_table(report: PlanReport) -> Table:
    """Every candidate with its predicted peak per rank and step time; the chosen one marked."""
    profile = report.profile
    title = (f"parti plan for {profile.name} ({profile.parameter_count / 1e6:,.1f}M parameters) at world size"
             f" {report.world_size}: budget {report.budget_bytes / GIB:.2f} GiB per rank, usable"
             f" {report.usable_bytes / GIB:.2f} GiB ({report.headroom:.0%} headroom)")
    margins = report.keeps_margins
    table = Table(title=title)
    for column in ("", "plan", "mesh p×d×s×t", "peak GiB/rank", *(["margin GiB"] if margins else []), "state GiB",
                   "activations GiB", "in flight GiB", "step s", "verdict"):
        table.add_column(column, justify="left" if column in ("plan", "verdict") else "right")
    for candidate in report.candidates:
        memory = candidate.estimate.memory
        states = memory["parameters"] + memory["gradients"] + memory["optimizer"]
        margin = [f"{candidate.estimate.margin_bytes / GIB:.3f}"] if margins else []
        table.add_row(
            "→" if candidate.chosen else "", candidate.label,
            "×".join(str(candidate.plan.mesh_shape[axis]) for axis in ("pipeline", "data", "shard", "tensor")),
            f"{candidate.peak_bytes / GIB:.3f}", *margin, f"{states / GIB:.3f}", f"{memory['activations'] / GIB:.3f}",
            f"{memory['in_flight'] / GIB:.3f}", f"{candidate.step_seconds:.3f}", candidate.reason,
            style="bold green" if candidate.chosen else ("dim" if not candidate.fits else None),
        )
    return table


def footnotes(report: PlanReport) -> list[str]:
    """What the numbers rest on."""
    hw = report.hardware
    lines = [
        f"hardware: {hw.device_type} {hw.device_name}, {hw.flops_per_s / 1e9:,.0f} GFLOP/s per rank,"
        f" collectives {hw.bandwidth_bytes_per_s / 1e9:.2f} GB/s ({hw.bandwidth_source}),"
        f" per-process overhead {(hw.process_overhead_bytes + hw.step_fixed_bytes) / GIB:.2f} GiB (in every peak:"
        f" the bare rank, and {hw.step_fixed_bytes / 2**20:.0f} MiB its first step adds whatever the model)",
        f"model: {report.profile.step_flops / 1e9:,.2f} GFLOP per step at batch {report.profile.batch_size},"
        f" profiled via {report.profile.source}; dtype as built (mixed precision is not modelled); state: parameters,"
        " gradients and optimizer state",
        "step time = compute + recompute + optimizer + communication (no overlap assumed) + Lightning's loop"
        f" ({hw.step_overhead_s * 1e3:.1f} ms measured) + DTensor's dispatch under tensor parallelism"
        f" ({hw.dtensor_call_s * 1e6:.0f} µs a call measured); plans are compared"
        " per sample (step time over the data-parallel ranks: a tensor or pipeline step trains fewer samples)",
    ]
    if report.keeps_margins:
        shares = ", ".join(f"{technique} {share:g}" for technique, share in cost.HEAP_MARGIN_SHARES.items())
        lines.append("a plan fits when its peak and its margin do: the margin is a share of the freed heap glibc"
                     " keeps in a CPU rank, the part of the peak that varies from model to model, the largest of"
                     f" those its techniques take ({shares})")
    timing = report.profile.block_timing
    if timing is not None:
        sizes = ", ".join(f"{seconds * 1e3:.1f} ms at {samples}" for samples, seconds in timing.seconds)
        lines.append(f"compute rate from {report.profile.blocks[0].name} timed on {timing.threads} thread(s), forward"
                     f" and backward: {sizes} samples per call ({timing.operations} operator calls)")
    if report.corrections:
        measured = "; ".join(
            f"{kind} memory ×{c.memory:.2f}, time ×{c.time:.2f}" for kind, c in report.corrections.items()
        )
        lines.append(f"corrected by earlier runs of this model on this machine (measured / predicted, by kind of plan):"
                     f" {measured}")
    chosen = report.chosen
    if chosen.pipeline > 1 and report.profile.blocks:
        stages = "; ".join(f"{i}: {blocks}" for i, blocks in enumerate(stage_blocks(report)))
        lines.append(f"pipeline stages of the chosen plan (balanced by forward FLOPs): {stages}")
    return lines + [f"note: {note}" for note in report.notes]


def stage_blocks(report: PlanReport) -> list[str]:
    """The blocks of each predicted stage of the chosen plan (``"blocks.0 .. blocks.3"``), cut as a run cuts them."""
    from parti_lightning.parallel.pipeline.cuts import stage_starts
    from parti_lightning.planner.profile import stage_costs

    names = [b.name for b in report.profile.blocks]
    starts = stage_starts(names, report.chosen.pipeline, costs=stage_costs(report.profile))
    ends = [*starts[1:], len(names)]
    return [names[a] + (f" .. {names[b - 1]}" if b - a > 1 else "") for a, b in zip(starts, ends, strict=True)]


def render_text(report: PlanReport, width: int = 170) -> str:
    console = Console(width=width, record=True, file=_Null(), color_system=None)
    console.print(report_table(report))
    for line in footnotes(report):
        console.print(line, highlight=False, markup=False)
    return console.export_text()


class _Null:
    """A file that drops what is written (the recording console keeps its own copy)."""

    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass
