"""The planner: measure the model and the hardware, then choose the fastest plan that fits.

    profile = profile_model(module, example_batch(module, dataloader))
    hardware = HardwareProfile.measure("cpu", ranks_per_node=2)
    report = choose_plan(profile, hardware, world_size=2)
    print(report)            # why this plan; report.chosen is the resolved PartitionPlan
"""

from __future__ import annotations

from parti_lightning.planner.batch import example_batch
from parti_lightning.planner.cost import Estimate, estimate
from parti_lightning.planner.hardware import HardwareProfile
from parti_lightning.planner.profile import BlockProfile, ModelProfile, ParameterInfo, profile_model
from parti_lightning.planner.search import Candidate, NoPlanFits, PlanReport, candidate_plans, choose_plan

__all__ = [
    "BlockProfile",
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
]
