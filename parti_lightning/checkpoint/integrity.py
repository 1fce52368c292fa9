"""Whether a checkpoint on disk is whole: every byte its index names is there.

parti publishes a checkpoint only once it is written (:mod:`~parti_lightning.checkpoint.files`), but a
checkpoint can still be damaged after that: a file system that lost its last writes in a crash, a copy cut
short, a file truncated by a full disk under another writer. A run that resumes by itself must pass over
such a checkpoint to the one before rather than fail on it, so it checks before it chooses. The check reads
indexes only, never the tensors: it finds a missing or truncated file, not flipped bits inside one.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from parti_lightning.checkpoint.safe_load import SafeFileSystemReader
from parti_lightning.checkpoint.sharded import META_FILE


def damage(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``path`` (a file or a sharded directory) cannot be whole; ``None`` if it can."""
    path = Path(path)
    try:
        if path.is_dir():
            return _directory_damage(path)
        return _archive_damage(path)
    except Exception as err:  # noqa: BLE001 -- any failure to read an index is the reason itself
        return f"its index cannot be read ({type(err).__name__}: {err})"


def _directory_damage(path: Path) -> str | None:
    for name in (META_FILE, ".metadata"):
        if not (path / name).is_file():
            return f"it has no {name}"
    reason = _archive_damage(path / META_FILE)
    if reason:
        return f"{META_FILE}: {reason}"
    # DCP's index maps each stored chunk to its (file, offset, length).
    storage = SafeFileSystemReader(path).read_metadata().storage_data or {}
    sizes: dict[str, int] = {}
    for info in storage.values():
        name = str(info.relative_path)
        if name not in sizes:
            file = path / name
            if not file.is_file():
                return f"its data file {name} is missing"
            sizes[name] = file.stat().st_size
        if info.offset + info.length > sizes[name]:
            return f"its data file {name} is cut short ({sizes[name]} of {info.offset + info.length} bytes)"
    return None


def _archive_damage(path: Path) -> str | None:
    """A ``torch.save`` archive (a zip file) whose central directory and every entry it lists are present."""
    if not zipfile.is_zipfile(path):
        return "it is not a readable torch archive (cut short, or not a checkpoint)"
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for entry in archive.infolist():
            # The local header (30 bytes and the name) precedes the data; the end must lie within the file.
            if entry.header_offset + 30 + len(entry.filename) + entry.compress_size > size:
                return f"its entry {entry.filename} is cut short"
    return None
