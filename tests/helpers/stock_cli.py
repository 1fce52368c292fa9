"""Lightning's stock LightningCLI, with no import of parti_lightning (used by test_cli.py)."""

import os
import sys

from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    cli = LightningCLI(subclass_mode_model=True, save_config_kwargs={"overwrite": True}, run=True)
    if cli.trainer.is_global_zero:
        print(f"strategy={type(cli.trainer.strategy).__name__} world_size={cli.trainer.world_size}"
              f" steps={cli.trainer.global_step}")
