"""The ``parti-lightning`` command: LightningCLI with parti registered and the strategy defaulted to it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import parti_lightning  # noqa: F401 - registers strategy="parti" and accelerator="parti" before parsing


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _extend_import_path(argv: list[str]) -> None:
    """Let ``class_path: my_module.MyModel`` resolve from the working directory and each config's folder.

    ``python -m`` puts the working directory on ``sys.path``; a console script does not, so a user's
    model next to their config would otherwise not import.
    """
    folders = [os.getcwd(), *(str(Path(p).resolve().parent) for p in _config_paths(argv))]
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)


def main(args: list[str] | None = None) -> None:
    """Run ``parti-lightning {fit,validate,test,predict} [--config cfg.yaml] [--trainer.* ...]``.

    ``parti-lightning convert SRC DST`` converts checkpoints (see :mod:`parti_lightning.convert`).
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "convert":
        from parti_lightning.convert import main as convert_main

        sys.exit(convert_main(argv[1:]))
    _extend_import_path(argv)
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"strategy": "parti"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
