"""parti-lightning: partitioned training for unmodified Lightning modules.

Importing the package registers ``strategy="parti"`` (and ``parti_spawn``, ``parti_<preset>``) and
``accelerator="parti"`` with Lightning.
"""

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from parti_lightning.accelerator import PartiAccelerator
from parti_lightning.plan import PartitionPlan, PlanError
from parti_lightning.strategy import PartiStrategy

__all__ = ["PartiAccelerator", "PartiStrategy", "PartitionPlan", "PlanError"]
__version__ = "0.1.0"


def _register() -> None:
    if "parti" not in StrategyRegistry:
        PartiStrategy.register_strategies(StrategyRegistry)
    if "parti" not in AcceleratorRegistry:
        PartiAccelerator.register_accelerators(AcceleratorRegistry)


_register()
