"""The planner: measure the model and the hardware, then choose the fastest plan that fits.

    batch = example_batch(module, dataloader)
    profile = time_blocks(module, batch, profile_model(module, batch), ranks_per_node=2)  # CPU: a block timed
    hardware = HardwareProfile.measure("cpu", ranks_per_node=2)
    report = choose_plan(profile, hardware, world_size=2)
    print(report)            # why this plan; report.chosen is the resolved PartitionPlan
"""

from __future__ import annotations

from parti_lightning.planner.batch import example_batch
from parti_lightning.planner.cost import Estimate, estimate
from parti_lightning.planner.hardware import HardwareProfile
from parti_lightning.planner.profile import BlockProfile, BlockTiming, ModelProfile, ParameterInfo, profile_model
from parti_lightning.planner.search import Candidate, NoPlanFits, PlanReport, candidate_plans, choose_plan
from parti_lightning.planner.timing import time_blocks

__all__ = [
    "BlockProfile",
    "BlockTiming",
    "Candidate",
    "Estimate",
    "HardwareProfile",
    "ModelProfile",
    "NoPlanFits",
    "ParameterInfo",
    "PlanReport",
    "candidate_plans",
    "choose_plan",
    "estimate",
    "example_batch",
    "profile_model",
    "time_blocks",
]
