"""parti-lightning: partitioned training for unmodified Lightning modules.

Importing the package registers ``strategy="parti"`` (and ``parti_spawn``, ``parti_<preset>``) and
``accelerator="parti"`` with Lightning, lets ``Trainer.fit`` take a ``torch.compile``d module for
parti's strategies (compiled per block after partitioning), and lets ``PartiStrategy(resume="auto")`` pick the
checkpoint ``fit`` resumes from, and has a checkpoint written mid-epoch resume with the epoch's next unseen sample.
"""

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from parti_lightning.accelerator import PartiAccelerator
from parti_lightning.lightning_adapters import auto_resume, data_position
from parti_lightning.lightning_adapters.compiled import accept_compiled_modules
from parti_lightning.plan import PartitionPlan, PlanError
from parti_lightning.strategy import PartiStrategy

__all__ = ["PartiAccelerator", "PartiStrategy", "PartitionPlan", "PlanError"]
__version__ = "0.1.0"


def _register() -> None:
    if "parti" not in StrategyRegistry:
        PartiStrategy.register_strategies(StrategyRegistry)
    if "parti" not in AcceleratorRegistry:
        PartiAccelerator.register_accelerators(AcceleratorRegistry)
    accept_compiled_modules()
    auto_resume.install()
    data_position.install()


_register()
