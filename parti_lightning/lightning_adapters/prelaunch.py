"""What the strategy checks before anything is launched: its arguments, the device and backend, the plan.

Every check here runs in the launching process, while the ``Trainer`` is built or just before its
launcher starts the ranks, so a bad input fails once, with one clear message, and nothing is left running.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from parti_lightning.lightning_adapters.auto_resume import RESUME_MODES
from parti_lightning.plan import AUTO, PlanLike, ResolvedPlan

BACKENDS = ("gloo", "nccl")
STATE_DICT_TYPES = ("auto", "sharded", "full")


def check_arguments(
    memory_budget: int | None, planner_headroom: float | None, backend: str | None, state_dict_type: str,
    resume: str = "never",
) -> None:
    """Raise ``ValueError`` for a ``PartiStrategy`` argument out of its range."""
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r}: choose 'never' or 'auto'.")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
        raise ValueError(f"memory_budget={memory_budget!r}: give a positive number of bytes per rank, or None.")
    if planner_headroom is not None and not 0 <= planner_headroom < 1:
        raise ValueError(f"planner_headroom={planner_headroom!r}: the fraction kept free, in [0, 1), or None.")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"process_group_backend={backend!r}: choose one of {BACKENDS} or None.")
    if state_dict_type not in STATE_DICT_TYPES:
        raise ValueError(f"state_dict_type={state_dict_type!r}: choose 'auto', 'sharded' or 'full'.")


def is_auto(plan: PlanLike) -> bool:
    """Whether ``plan`` asks the planner to choose (``"auto"``); an ``"auto"`` preset with fields is refused."""
    if isinstance(plan, Mapping) and str(plan.get("preset", "")).strip().lower() == AUTO:
        raise ValueError(
            f"plan={dict(plan)!r}: the planner chooses every field of an 'auto' plan; give plan='auto' alone,"
            " or a preset (ddp, zero1, zero2, zero3, hybrid) with your fields."
        )
    return isinstance(plan, str) and plan.strip().lower() == AUTO


def positive_timedelta(name: str, value: float | timedelta) -> timedelta:
    """``value`` (seconds or a ``timedelta``) as a ``timedelta``; ``ValueError`` unless positive."""
    result = value if isinstance(value, timedelta) else timedelta(seconds=float(value))
    if result.total_seconds() <= 0:
        raise ValueError(f"{name}={value!r} must be positive.")
    return result


def check_backend(device_type: str, backend: str) -> None:
    """The process-group backend against the devices (``"cpu"`` or ``"cuda"``) and this build of torch."""
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(
            f"process_group_backend='nccl' needs CUDA devices, but this run is on {device_type}:"
            " use 'gloo' (or leave it unset)."
        )
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise ValueError(f"process_group_backend={backend!r} is not available in this build of torch.")


def check_plan(plan: ResolvedPlan, device_type: str) -> None:
    """The plan resolved for the world size (resolving it already refused a mesh that does not fit), with a
    note for settings that will do nothing."""
    if plan.activation_checkpointing == "auto":
        raise NotImplementedError(
            "plan.activation_checkpointing='auto' is decided by the planner only with plan='auto': with a"
            " fixed plan, use 'blocks' or 'none'."
        )
    if plan.storage != "replicated" and plan.shard == 1:
        rank_zero_info(f"parti: storage={plan.storage!r} over shard=1 rank shards nothing; training replicated.")
    if plan.offload == "cpu" and device_type == "cpu":
        rank_zero_info("parti: offload='cpu' on a CPU run keeps storage where it already is (no effect).")
