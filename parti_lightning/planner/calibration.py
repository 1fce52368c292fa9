"""Measured corrections to the planner's predictions, kept per machine shape and kind of plan.

After the first steps of a ``plan="auto"`` run, the strategy's step meter compares the measured step
time and peak memory with what the planner predicted. Their ratio to the uncorrected prediction is
kept in ``calibration.json`` beside the hardware cache, under the machine shape's key (as for the
hardware profile), the model (:func:`model_key`: its name, size and batch) and the plan's kind
(:func:`plan_kind`). The next plan of that model on this machine multiplies each kind's predictions
by its ratio (:func:`corrected`), and its table says so; the last measurement replaces the previous.

Why per model and not per machine alone: what the cost model leaves out (the allocator's slack,
DTensor's per-operation overhead, the strategy's per-step collectives) is a fixed cost as much as a
proportional one, so a ratio measured on a small model would mis-correct a large one (a tiny model's
step measured here at 23× its prediction, most of it fixed).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from parti_lightning.plan import ResolvedPlan
from parti_lightning.planner.cost import Estimate
from parti_lightning.planner.hardware import cache_key, default_cache_dir, read_cache
from parti_lightning.planner.profile import ModelProfile

CACHE_FILE = "calibration.json"
# Beyond these, a measurement is reported as off from the prediction (the planner's accuracy aims).
MEMORY_MARGIN = 0.15
TIME_MARGIN = 0.25


@dataclass(frozen=True)
class Correction:
    """Measured over predicted, for one kind of plan on one machine shape.

    Attributes:
        memory: peak memory per rank, measured over the uncorrected prediction.
        time: step time, measured over the uncorrected prediction.
    """

    memory: float = 1.0
    time: float = 1.0


def plan_kind(plan: ResolvedPlan) -> str:
    """What a correction is kept under: the storage level and the techniques on, not their degrees."""
    parts = [plan.storage]
    if plan.tensor > 1:
        parts.append("tensor")
    if plan.pipeline > 1:
        parts.append(f"pipeline-{plan.schedule}")
    if plan.activation_checkpointing != "none":
        parts.append("checkpointing")
    return "+".join(parts)


def corrected(estimate: Estimate, correction: Correction | None) -> Estimate:
    """``estimate`` with its peak memory and step time multiplied by ``correction``, in a ``measured`` part each."""
    if correction is None:
        return estimate
    overhead = estimate.memory.get("overhead", 0)
    memory = {**estimate.memory, "measured": round(estimate.step_bytes * (correction.memory - 1))}
    # The setup peak (model built whole, plus the overhead) scales by the same ratio.
    setup = round((estimate.setup_bytes + overhead) * correction.memory) - overhead if estimate.setup_bytes else 0
    time = {**estimate.time, "measured": estimate.seconds * (correction.time - 1)}
    return Estimate(memory, setup, time, round(estimate.margin_bytes * correction.memory))


def machine_key(device_type: str, ranks_per_node: int) -> str:
    """The machine shape's key, the hardware cache's."""
    return cache_key(device_type, ranks_per_node)


def model_key(profile: ModelProfile) -> str:
    """Which model a correction was measured on: its name, parameter count and batch size."""
    return f"{profile.name}|{profile.parameter_count} parameters|batch {profile.batch_size}"


def load(machine: str, model: str, cache_dir: str | Path | None = None) -> dict[str, Correction]:
    """The corrections measured for ``model`` on the machine shape ``machine``, by plan kind; empty if none."""
    entries = read_cache(_path(cache_dir)).get(machine, {}).get(model, {})
    corrections = {}
    for kind, value in entries.items():
        try:
            corrections[kind] = Correction(**value)
        except TypeError:
            continue  # written by another version: measured again on the next run
    return corrections


def record(machine: str, model: str, kind: str, correction: Correction, cache_dir: str | Path | None = None) -> Path:
    """Keep ``correction`` for ``model``'s plans of ``kind`` on machine shape ``machine``; returns the file written."""
    path = _path(cache_dir)
    entries = read_cache(path)
    entries.setdefault(machine, {}).setdefault(model, {})[kind] = asdict(correction)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a temporary file, then renamed: two runs finishing at once leave one valid file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=2)
    os.replace(tmp, path)
    return path


def _path(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / CACHE_FILE
