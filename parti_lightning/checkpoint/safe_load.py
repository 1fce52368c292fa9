"""Reading a sharded checkpoint's index without unpickling code.

Loading never unpickles code: ``meta.pt`` goes through ``torch.load(weights_only=True)``, DCP's data
files are read with ``weights_only=True`` by DCP itself, and DCP's ``.metadata`` index, which DCP reads
with plain ``pickle``, goes through an unpickler that admits DCP's own metadata classes only
(:class:`SafeFileSystemReader`, and :func:`checkpoint_index` built on it).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with its ``.metadata`` index unpickled by an allow-list instead of ``pickle.load``.

    DCP writes the index with ``pickle`` and reads it back with ``pickle.load``, which would run any code
    a crafted file carries. The index holds DCP's own metadata dataclasses and a few torch values only.
    Byte (non-tensor) entries are refused as well: DCP would unpickle them without the weights-only restriction;
    parti keeps non-tensor state in ``meta.pt`` instead.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata_path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(metadata_path, "rb") as file:
            try:
                metadata = _IndexUnpickler(file).load()
            except pickle.UnpicklingError as err:
                raise pickle.UnpicklingError(f"refusing to load {metadata_path}: {err}") from None
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{metadata_path} is not a DCP index ({type(metadata).__name__}).")
        byte_entries = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
        if byte_entries:
            raise pickle.UnpicklingError(
                f"refusing to load {self.path}: entries {byte_entries[:3]} are pickled objects, not tensors."
            )
        if metadata.storage_meta is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


_INDEX_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _IndexUnpickler(pickle.Unpickler):
    # Python's documented way to restrict unpickling ("Restricting Globals"); torch's weights-only
    # unpickler reads torch.save archives only, not DCP's bare pickle.
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _INDEX_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint index")


def checkpoint_index(path: str | os.PathLike) -> dict[str, TensorStorageMetadata]:
    """Every tensor a sharded checkpoint holds: flattened key to its global shape and dtype."""
    return dict(SafeFileSystemReader(path).read_metadata().state_dict_metadata)  # type: ignore[arg-type]
