"""A picture of a plan report: the chosen plan on its mesh, and every candidate's memory and time.

``parti-lightning plan --plot FILE.png`` draws it; matplotlib is an optional extra
(``pip install 'parti-lightning[plot]'``). Three panels:

- the chosen plan's ranks, one row per pipeline stage (with the blocks it holds), each rank labelled
  with its place on the data, shard and tensor axes, and which layers tensor parallelism splits;
- each candidate's predicted peak memory per rank, stacked by kind, against the usable budget and the
  whole budget;
- each candidate's predicted time per sample (a step over its data-parallel ranks, as the planner
  compares them), the chosen one marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from parti_lightning.planner.search import PlanReport

GIB = 1024**3
# Memory parts in the order they stack; "measured" is the correction from earlier runs (may be negative).
PARTS = ("parameters", "gradients", "optimizer", "activations", "in_flight", "allocator", "overhead", "measured")
_AXES = ("pipeline", "data", "shard", "tensor")


def plot_report(report: PlanReport, path: str | Path | None = None) -> Figure:
    """Draw ``report``; write it to ``path`` (the format from its suffix) when given. Returns the figure.

    Raises:
        ModuleNotFoundError: matplotlib is not installed, with the command that installs it.
    """
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "drawing a plan needs matplotlib: pip install 'parti-lightning[plot]'", name="matplotlib"
        ) from err

    rows = len(report.candidates)
    # No pyplot: a Figure of its own leaves the caller's backend and global state alone.
    figure = Figure(figsize=(16, 4.5 + 0.32 * rows), layout="constrained")
    grid = figure.add_gridspec(2, 2, height_ratios=[1.4, max(2.0, 0.3 * rows)], width_ratios=[3, 2])
    _draw_mesh(figure.add_subplot(grid[0, :]), report)
    labels = [("→ " if c.chosen else "") + c.label for c in report.candidates][::-1]
    _draw_memory(figure.add_subplot(grid[1, 0]), report, labels)
    _draw_time(figure.add_subplot(grid[1, 1]), report)
    figure.suptitle(
        f"parti plan for {report.profile.name} ({report.profile.parameter_count / 1e6:,.1f}M parameters),"
        f" world size {report.world_size}: {report.chosen.describe()}",
        fontsize=11,
    )
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def _draw_mesh(ax: object, report: PlanReport) -> None:
    plan = report.chosen
    shape = plan.mesh_shape
    per_stage = shape["data"] * shape["shard"] * shape["tensor"]
    for stage in range(shape["pipeline"]):
        for i in range(per_stage):
            # Ranks in mesh order (pipeline, data, shard, tensor): the tensor axis varies fastest.
            d, rest = divmod(i, shape["shard"] * shape["tensor"])
            s, t = divmod(rest, shape["tensor"])
            ax.add_patch(_box(i, -stage, f"C{stage % 10}"))
            ax.text(i + 0.45, -stage + 0.4, f"rank {stage * per_stage + i}\nd{d} s{s} t{t}", ha="center",
                    va="center", fontsize=8)
    ax.set_xlim(-0.05, max(per_stage, 4))
    ax.set_ylim(-shape["pipeline"] + 0.9, 0.9)
    ax.set_yticks([-stage + 0.4 for stage in range(shape["pipeline"])], _stage_names(report), fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    mesh = " × ".join(f"{axis}={shape[axis]}" for axis in _AXES)
    split = _tensor_layers(report) if shape["tensor"] > 1 else "none (tensor=1)"
    ax.set_title(f"chosen plan's mesh: {mesh}, storage={plan.storage}; tensor-split layers of each block: {split}",
                 fontsize=9, loc="left")


def _box(x: float, y: float, color: str) -> object:
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch((x, y), 0.9, 0.8, boxstyle="round,pad=0.02", facecolor=color, alpha=0.35, edgecolor=color)


def _stage_names(report: PlanReport) -> list[str]:
    from parti_lightning.planner.explain import stage_blocks

    blocks = report.profile.blocks
    if report.chosen.pipeline == 1:
        return [f"all {len(blocks)} blocks" if blocks else "whole model"]
    return [f"stage {i}: {names}" for i, names in enumerate(stage_blocks(report))]


def _tensor_layers(report: PlanReport) -> str:
    """The matrices of the first block, which tensor parallelism splits in every block (by the planner's count)."""
    first = report.profile.blocks[0].name + "."
    names = [p.name[len(first) :].rsplit(".", 1)[0] for p in report.profile.parameters
             if p.name.startswith(first) and len(p.shape) == 2]
    return ", ".join(dict.fromkeys(names)) or "none"


def _draw_memory(ax: object, report: PlanReport, labels: list[str]) -> None:
    candidates = report.candidates[::-1]  # the table's first row at the top
    y = range(len(candidates))
    left = [0.0] * len(candidates)
    for k, part in enumerate(PARTS):
        widths = [c.estimate.memory.get(part, 0) / GIB for c in candidates]
        if not any(widths):
            continue
        ax.barh(y, widths, left=left, label=part, color=f"C{k}", alpha=0.8)
        left = [a + w for a, w in zip(left, widths, strict=True)]
    # The peak may be the setup's (the model built whole before it is split), beyond the step's parts.
    ax.scatter([c.peak_bytes / GIB for c in candidates], list(y), marker="|", s=120, color="black", zorder=3,
               label="peak (step or setup)")
    if report.keeps_margins:  # what the planner keeps free beyond the peak: it must fit too
        ax.barh(y, [c.estimate.margin_bytes / GIB for c in candidates], left=[c.peak_bytes / GIB for c in candidates],
                label="margin", color="none", edgecolor="gray", hatch="///")
    ax.axvline(report.usable_bytes / GIB, color="black", linestyle="--", linewidth=1,
               label=f"usable ({report.headroom:.0%} headroom)")
    ax.axvline(report.budget_bytes / GIB, color="red", linewidth=1, label="budget")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("predicted peak memory per rank (GiB)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("memory per rank, by kind", fontsize=9, loc="left")


def _draw_time(ax: object, report: PlanReport) -> None:
    candidates = report.candidates[::-1]
    per_sample = [c.step_seconds / c.plan.data_parallel_size * 1e3 for c in candidates]
    colors = ["tab:green" if c.chosen else ("lightgray" if not c.fits else "tab:blue") for c in candidates]
    ax.barh(range(len(candidates)), per_sample, color=colors)
    ax.set_yticks(range(len(candidates)), [""] * len(candidates))
    ax.set_xlabel("predicted step time ÷ data-parallel ranks (ms; lower trains faster)")
    ax.set_title("time (green: chosen, gray: does not fit)", fontsize=9, loc="left")
