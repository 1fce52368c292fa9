"""Publishing a checkpoint atomically: staged beside its path, written to disk, then swapped in.

A checkpoint is written under a hidden sibling name and made visible as its path only once it is whole:
a save that is interrupted leaves the previous checkpoint as it was, and never a half-written one where
Lightning (or a user) looks. Where Linux offers it, the finished directory and the previous one are
swapped in one step (``renameat2(RENAME_EXCHANGE)``); elsewhere two renames leave the path briefly
absent but never half-written. Files and the folder are ``fsync``-ed, so a crash after the save
returns keeps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch


def sibling(path: Path, kind: str) -> Path:
    """A hidden path beside ``path``: where its checkpoint is written (``"partial"``) or the one it replaces goes."""
    # Hidden, and without the checkpoint's own name: Lightning's `ckpt_path="last"` takes any file in
    # the folder whose name contains "last", and a half-written one must never be that.
    return path.parent / f".parti-{kind}-{zlib.crc32(path.name.encode()):08x}"


def write_synced(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` and ``fsync`` the file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as file:
        file.write(buffer.getvalue())
        file.flush()
        os.fsync(file.fileno())


def publish(staging: Path, path: Path) -> None:
    """Make the fully written ``staging`` visible as ``path``, replacing what was there in one step."""
    if (path.exists() or path.is_symlink()) and _exchange(staging, path):
        remove(staging)  # now the previous checkpoint
    else:
        old = sibling(path, "old")
        remove(old)
        if path.exists() or path.is_symlink():
            # No atomic exchange here (not Linux, or a file system without it): between these two
            # renames `path` is briefly absent, but never half-written.
            os.rename(path, old)
        os.rename(staging, path)
        remove(old)
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unsupported.

    Neither ``os`` nor any library exposes the exchange, hence ctypes. A plain rename cannot put a
    directory in place of an existing one in one step.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def remove(path: Path) -> None:
    """Remove ``path`` whether it is a file, a link or a directory; nothing if it does not exist."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
