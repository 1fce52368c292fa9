"""Process launch: Lightning's own launchers, with parti's last checks before any process starts."""

from __future__ import annotations

import atexit
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from lightning.fabric.plugins import ClusterEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _disable_module_memory_sharing,
    _MultiProcessingLauncher,
)
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from torch.distributed.tensor import DTensor
from typing_extensions import override

from parti_lightning.parallel.full_state import full_state_dict


class _LastRun:
    # Process-wide: the processes a launcher started outlive its Trainer, and a caller that recovers usually
    # builds a new Trainer (with its own launcher) to run again in them.
    failed = False


_last_run = _LastRun()


class PartiSubprocessScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher (``python train.py`` re-run per rank), checking the module first.

    ``before_launch(trainer, args)`` runs once the user's module is known (``trainer.fit(model)``; ``args``
    are what the Trainer launches its function with) and before any process is started, so a plan the
    module cannot follow fails with nothing launched.

    No orphans: Lightning ends the other ranks when one of its children fails, but not when the launching
    process (local rank 0) goes away, and a rank that is not waiting in a collective (computing, loading
    data, hung) would outlive it. This launcher ends them when the launching process is really going away:
    on an exception nothing caught (``sys.excepthook``), or at exit after a run that failed
    (:meth:`note_failure`) and was not followed by another, by any Trainer of this process. While the caller
    may still recover (it caught the exception and runs again in the same processes), the other ranks are
    left alone, as under ``ddp``.
    """

    # Seconds the other ranks get to end on their own when this process exits after a failed run.
    EXIT_GRACE_S = 5.0

    def __init__(self, cluster_environment: ClusterEnvironment, num_processes: int, num_nodes: int,
                 before_launch: Callable[[Any, tuple[Any, ...]], None]) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._before_launch = before_launch

    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self._before_launch(trainer, args)
        _last_run.failed = False  # a new run in the same processes: whatever failed before, the caller went on
        return super().launch(function, *args, trainer=trainer, **kwargs)

    def note_failure(self) -> None:
        """The run raised in this process: end the other ranks if this process exits before running again."""
        _last_run.failed = True

    @override
    def _call_children_scripts(self) -> None:
        super()._call_children_scripts()
        atexit.register(self._end_children_at_exit)
        previous = sys.excepthook

        def excepthook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
            try:
                previous(kind, value, traceback)  # the user's traceback first
            finally:
                self.kill(_get_sigkill_signal())

        sys.excepthook = excepthook

    def _end_children_at_exit(self) -> None:
        if not _last_run.failed:
            return  # a finished run's ranks end their own scripts
        deadline = time.monotonic() + self.EXIT_GRACE_S
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        self.kill(_get_sigkill_signal())


class PartiMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher, checking the module first.

    Lightning stops spawned CPU workers from sharing the parent's module memory only when the
    accelerator is its own ``CPUAccelerator``; ours is a ``PartiAccelerator``, so we apply the same
    guard by device type. Without it every rank would train the same shared tensors.
    """

    def __init__(self, strategy: Any, start_method: str, before_launch: Callable[[Any, tuple[Any, ...]], None]) -> None:
        super().__init__(strategy, start_method=start_method)  # type: ignore[arg-type]
        self._before_launch = before_launch

    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self._before_launch(trainer, args)
        return super().launch(function, *args, trainer=trainer, **kwargs)

    @override
    def _wrapping_function(self, process_idx: int, trainer: Any, function: Any, args: Any, kwargs: Any,
                           return_queue: Any, global_states: Any = None) -> None:
        devices = self._strategy.parallel_devices or []
        if self._start_method == "spawn" and devices and devices[0].type == "cpu":
            args, kwargs = _disable_module_memory_sharing((args, kwargs))
        super()._wrapping_function(process_idx, trainer, function, args, kwargs, return_queue, global_states)

    @override
    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Any:
        # Lightning sends the calling process `module.state_dict()`, which under ZeRO-2/3 holds this
        # rank's shards (DTensors) that the caller's whole module cannot load. Send the gathered weights:
        # Lightning's method reads them through `state_dict`, so it is shadowed for the call.
        module = trainer.lightning_module
        if not any(isinstance(p, DTensor) for p in module.parameters()):
            return super()._collect_rank_zero_results(trainer, results)
        full = full_state_dict(module)  # collective: every rank calls this method
        module.state_dict = lambda *args, **kwargs: full
        try:
            return super()._collect_rank_zero_results(trainer, results)
        finally:
            del module.state_dict
