"""``parti-lightning convert``: between sharded checkpoints and single files, in one process.

- sharded directory -> ``.ckpt`` file: a plain Lightning checkpoint (optimizer state by position, as
  ``torch.optim.Optimizer.state_dict`` has it), which stock Lightning loads with no parti installed:
  ``MyModule.load_from_checkpoint(DST)`` or ``Trainer.fit(ckpt_path=DST)``.
- sharded directory -> ``.safetensors`` file: the model's weights only.
- single ``.ckpt`` file -> sharded directory: for resuming a run under parti at scale.

The whole model is materialized in this process's memory (the point of a single file); no process
group is needed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor

from parti_lightning.checkpoint import (
    MODEL,
    CheckpointError,
    SafeFileSystemReader,
    checkpoint_index,
    is_named_optimizer_state,
    is_sharded_checkpoint,
    named_to_positional,
    optimizer_entries,
    positional_to_named,
    read_meta,
    save_sharded,
    single_process_is_intended,
)

# Parameter names of each optimizer's positions, in a consolidated file (see `load_consolidated`).
NAMES_KEY = "parti_optimizer_parameter_names"


def load_consolidated(src: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint as one plain Lightning checkpoint dict, in memory (positional optimizer state)."""
    src = Path(src)
    if not is_sharded_checkpoint(src):
        raise CheckpointError(f"{src} is not a complete parti sharded checkpoint (no meta.pt or .metadata).")
    meta = read_meta(src)
    index = checkpoint_index(src)
    tensors = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype) for key, entry in index.items()}
    with single_process_is_intended():
        dcp.load(tensors, storage_reader=SafeFileSystemReader(src), no_dist=True)
    parti = meta.pop("parti")
    state_dict = {k[len(MODEL) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{MODEL}.")}
    state_dict.update(parti.get("model_extra", {}))
    checkpoint = {**meta, "state_dict": state_dict}
    saved_optimizers = parti.get("optimizers", [])
    if saved_optimizers:
        checkpoint["optimizer_states"] = [
            named_to_positional(_named_state(index, saved, tensors)) for index, saved in enumerate(saved_optimizers)
        ]
        # Stock Lightning ignores this key; it lets `file_to_sharded` name the positions again.
        checkpoint[NAMES_KEY] = [
            [name for group in saved["param_groups"] for name in group["params"]] for saved in saved_optimizers
        ]
    return checkpoint


def _named_state(index: int, saved: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    values = optimizer_entries(tensors, index)
    state = {name: {**values.get(name, {}), **saved["state"].get(name, {})} for name in saved["has_state"]}
    return {"state": state, "param_groups": saved["param_groups"]}


def sharded_to_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write the sharded checkpoint ``src`` as a single Lightning checkpoint file ``dst``."""
    checkpoint = load_consolidated(src)
    _write_atomic(Path(dst), lambda tmp: torch.save(checkpoint, tmp))


def checkpoint_file(path: str | os.PathLike) -> str | os.PathLike | IO[bytes]:
    """``path`` in a form every API that reads a Lightning checkpoint file takes.

    A sharded directory becomes an in-memory file of the consolidated checkpoint (as :func:`sharded_to_file`
    would write it); a file path is returned unchanged. So code that loads whatever ``ModelCheckpoint``
    wrote keeps working whichever kind it is::

        MyModule.load_from_checkpoint(checkpoint_file(trainer.checkpoint_callback.best_model_path))
        torch.load(checkpoint_file(path), weights_only=True)

    The whole model is held twice in this process while it loads (the serialized bytes and the tensors).
    """
    if not Path(path).is_dir():
        return path
    buffer = io.BytesIO()
    torch.save(load_consolidated(path), buffer)
    buffer.seek(0)
    return buffer


def sharded_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write the model weights of the sharded checkpoint ``src`` as a safetensors file ``dst``."""
    from safetensors.torch import save_file

    state = load_consolidated(src)["state_dict"]
    # safetensors refuses tensors that share memory (tied weights); each gets its own copy.
    weights = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, Tensor)}
    _write_atomic(Path(dst), lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))


def file_to_sharded(src: str | os.PathLike, dst: str | os.PathLike, *, weights_only: bool = False) -> None:
    """Write the single-file checkpoint ``src`` (parti's ``state_dict_type="full"``) as a sharded one.

    ``weights_only``: leave out the optimizer and scheduler states (the only way for a stock Lightning
    file, whose optimizer state is keyed by position).
    """
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{src} has no 'state_dict': it is not a Lightning checkpoint.")
    names = checkpoint.pop(NAMES_KEY, None)
    if weights_only:
        checkpoint.pop("optimizer_states", None)
        checkpoint.pop("lr_schedulers", None)
    states = checkpoint.get("optimizer_states", [])
    if names is not None and len(names) == len(states):
        states = [positional_to_named(state, n) for state, n in zip(states, names, strict=True)]
        checkpoint["optimizer_states"] = states
    if not all(is_named_optimizer_state(state) for state in states):
        raise CheckpointError(
            f"{src} keys its optimizer state by position (stock Lightning), which needs the module to name: resume"
            " from the file itself with strategy='parti' (it loads under any plan) and save again, or pass"
            " --weights-only to convert the weights and loops alone."
        )
    save_sharded(dst, checkpoint, {"parti": {"converted_from": str(src)}}, rng=False)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, weights_only: bool = False) -> str:
    """Convert ``src`` into ``dst``, the direction read from what ``src`` is and ``dst``'s suffix; says what it did."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist.")
    if src.is_dir():
        if dst.suffix == ".safetensors":
            sharded_to_safetensors(src, dst)
            return f"wrote the model weights of {src} to {dst} (safetensors)"
        sharded_to_file(src, dst)
        return f"wrote {src} as a single Lightning checkpoint file {dst}"
    file_to_sharded(src, dst, weights_only=weights_only)
    return f"wrote {src} as a sharded checkpoint directory {dst}"


def _write_atomic(dst: Path, write: Callable[[Path], object]) -> None:
    """``write`` a hidden file beside ``dst``, then rename it to ``dst``: never a half-written ``dst``."""
    tmp = dst.with_name(f".{dst.name}.partial")
    write(tmp)
    os.replace(tmp, dst)


def main(argv: Sequence[str] | None = None) -> int:
    """``parti-lightning convert SRC DST [--weights-only]``."""
    parser = argparse.ArgumentParser(
        prog="parti-lightning convert",
        description="Convert a sharded checkpoint directory into a single Lightning .ckpt file (or model weights"
        " as .safetensors), or a single .ckpt file into a sharded directory.",
    )
    parser.add_argument("src", help="a sharded checkpoint directory, or a single .ckpt file")
    parser.add_argument("dst", help="the file (.ckpt or .safetensors) or directory to write")
    parser.add_argument("--weights-only", action="store_true",
                        help="file -> directory: leave out optimizer and scheduler states")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.dst, weights_only=args.weights_only))
    except (CheckpointError, FileNotFoundError) as err:
        print(f"parti-lightning convert: error: {err}", file=sys.stderr)
        return 2
    return 0
