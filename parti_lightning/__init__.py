"""parti-lightning: partitioned training for unmodified Lightning modules."""

from parti_lightning.plan import PartitionPlan, PlanError

__all__ = ["PartitionPlan", "PlanError"]
__version__ = "0.1.0"
