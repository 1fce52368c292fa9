"""The ``parti-lightning`` command: LightningCLI with parti registered and the strategy defaulted to it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

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

    ``parti-lightning convert SRC DST`` converts checkpoints (see :mod:`parti_lightning.convert`);
    ``parti-lightning plan [--plot FILE.png] [the arguments of fit]`` explains the plan ``plan="auto"``
    would choose (and draws it).
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "convert":
        from parti_lightning.convert import main as convert_main

        sys.exit(convert_main(argv[1:]))
    if argv and argv[0] == "plan":
        _extend_import_path(argv)
        sys.exit(plan(argv[1:]))
    _extend_import_path(argv)
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"strategy": "parti"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def plan(args: list[str]) -> int:
    """``parti-lightning plan --config cfg.yaml``: the planner's table for a ``fit`` configuration, launching nothing.

    The model, data and Trainer are built from the same arguments as ``fit`` (``LightningCLI(run=False)``);
    the model's ``configure_model`` runs on the meta device, so a model larger than memory is planned
    without being built. ``--plot FILE.png`` also draws the report (:mod:`parti_lightning.planner.plot`;
    needs the ``plot`` extra).
    """
    import argparse

    import torch

    from parti_lightning import PartiStrategy
    from parti_lightning.accelerator import partition_memory_bytes
    from parti_lightning.lightning_adapters.autoplan import plan_for
    from parti_lightning.plan import PlanError
    from parti_lightning.planner import example_batch

    own = argparse.ArgumentParser(prog="parti-lightning plan", add_help=False)
    own.add_argument("--plot", metavar="FILE")
    options, args = own.parse_known_args(args)
    if options.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            print("parti-lightning plan: error: --plot needs matplotlib: pip install 'parti-lightning[plot]'",
                  file=sys.stderr)
            return 2
    sys.argv = sys.argv[:1]  # the arguments come through `args`; LightningCLI warns when sys.argv has more
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"strategy": "parti"},
        save_config_callback=None,
        run=False,
        args=args,
    )
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    strategy = trainer.strategy
    if not isinstance(strategy, PartiStrategy):
        print(f"parti-lightning plan: error: the strategy is {type(strategy).__name__}, not parti.", file=sys.stderr)
        return 2
    device = strategy.parallel_devices[0] if strategy.parallel_devices else torch.device("cpu")
    ranks_per_node, world_size = strategy.num_processes, strategy.num_processes * strategy.num_nodes
    budget = strategy.memory_budget or partition_memory_bytes(device, ranks_per_node)
    with torch.device("meta"):
        module.configure_model()
    try:
        batch = example_batch(module, datamodule if datamodule is not None else _module_loader(module))
        report = plan_for(module, batch, device.type, budget, world_size, ranks_per_node, strategy.planner_headroom,
                          calibrated=strategy.planner_calibration)
    except (PlanError, ValueError) as err:
        print(f"parti-lightning plan: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(report.render())
    print(f"plan='auto' would choose: {report.chosen.describe()}")
    if options.plot is not None:
        from parti_lightning.planner.plot import plot_report

        plot_report(report, options.plot)
        print(f"drawn to {options.plot}")
    if not strategy.plans_automatically:
        fixed = strategy.plan.resolve(world_size, ranks_per_node=ranks_per_node)
        row = next((c for c in report.candidates if c.plan == fixed), None)
        prediction = (
            f"predicted {row.peak_bytes / 1024**3:.2f} GiB per rank, {row.step_seconds:.3f} s per step: {row.reason}"
            if row is not None else "not among the planner's candidates"
        )
        print(f"this configuration fixes plan {fixed.describe()}: {prediction}")
    return 0


def _module_loader(module: Any) -> Any:
    try:
        return module.train_dataloader()
    except Exception:  # a hook that needs the Trainer: the module's example_input_array serves instead
        return None


if __name__ == "__main__":
    main()
