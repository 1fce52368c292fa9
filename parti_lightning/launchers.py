"""Process launch: Lightning's own launchers, with one fix for CPU ranks started by ``spawn``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies.launchers.multiprocessing import (
    _disable_module_memory_sharing,
    _MultiProcessingLauncher,
)
from typing_extensions import override


class PartiMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher.

    Lightning stops spawned CPU workers from sharing the parent's module memory only when the
    accelerator is its own ``CPUAccelerator``; ours is a ``PartiAccelerator``, so we apply the same
    guard by device type. Without it every rank would train the same shared tensors.
    """

    @override
    def _wrapping_function(self, process_idx: int, trainer: Any, function: Any, args: Any, kwargs: Any,
                           return_queue: Any, global_states: Any = None) -> None:
        devices = self._strategy.parallel_devices or []
        if self._start_method == "spawn" and devices and devices[0].type == "cpu":
            args, kwargs = _disable_module_memory_sharing((args, kwargs))
        super()._wrapping_function(process_idx, trainer, function, args, kwargs, return_queue, global_states)
