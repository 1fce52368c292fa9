"""A sharded checkpoint written in the background while training goes on, published once it is whole.

``torch.distributed.checkpoint.async_save`` copies the state to host memory (so that training may change it)
and writes the copy in a thread of its own; each rank's save completes once every rank's part is written and
the coordinator has written DCP's index. Publishing (parti's ``meta.pt`` and the rename that makes the hidden
directory the checkpoint) must wait for that, on global rank 0, and then whatever was to be removed because
this checkpoint replaced it (``ModelCheckpoint``'s older top-k) goes: a failure at any point leaves the
previous checkpoints as they were. Nothing in torch or Lightning runs a step after DCP's asynchronous save,
hence this thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from parti_lightning.checkpoint.files import remove


class PendingSave:
    """One rank's part of a checkpoint being written; :meth:`wait` before the next save, a load, or the end."""

    def __init__(self, path: Path, future: Future, staging: Path, publish: Callable[[], None] | None) -> None:
        self.path = path
        self._error: BaseException | None = None
        self._after: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._done = False
        # Not a daemon: an interpreter that exits while the checkpoint is written waits for it first.
        self._thread = threading.Thread(target=self._finish, args=(future, staging, publish),
                                        name=f"parti-checkpoint-{path.name}")
        self._thread.start()

    def _finish(self, future: Future, staging: Path, publish: Callable[[], None] | None) -> None:
        try:
            future.result()
            if publish is not None:
                publish()
        except BaseException as err:  # noqa: BLE001 -- kept, and raised where the strategy waits
            self._error = err
            if publish is not None:
                remove(staging)
        with self._lock:
            self._done = True
            after, self._after = self._after, []
        if self._error is None:
            for action in after:
                action()

    def then(self, action: Callable[[], None]) -> None:
        """Run ``action`` once this checkpoint is published (now, if it is); never if its save failed."""
        with self._lock:
            if not self._done:
                self._after.append(action)
                return
        if self._error is None:
            action()

    def wait(self) -> None:
        """Block until the checkpoint is written and published; raise what failed on the way."""
        self._thread.join()
        if self._error is not None:
            # DCP wraps the writer's error with every rank's traceback: its last line says what happened.
            lines = str(self._error).strip().splitlines() or [type(self._error).__name__]
            raise OSError(
                f"the asynchronous save of {self.path} failed ({lines[-1]}); the checkpoints before it are kept."
            ) from self._error
