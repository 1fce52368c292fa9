"""``trainer.fit(torch.compile(model))`` under parti: compiled per block after partitioning, not as a whole step.

Lightning unwraps the compiled module (``from_compiled``: the LightningModule's ``forward`` and steps
wrapped by the compile's ``dynamo_ctx``), then refuses it for any strategy outside its own list
(``_verify_strategy_supports_compile``: SingleDevice, DDP, FSDP). parti undoes the whole-step wrapping
and compiles each block with the same ``dynamo_ctx`` once the plan is applied
(:func:`~parti_lightning.parallel.compile.compile_blocks`).

Why a wrapper around Lightning's check: the list is hard-coded (``isinstance`` against three classes)
and is read by ``Trainer.fit`` before any strategy hook runs, so no strategy API can answer it. The
wrapper lets through only strategies that declare ``compiles_blocks = True`` and hands every other
strategy to Lightning's own check unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from parti_lightning.parallel.blocks import find_blocks
from parti_lightning.parallel.compile import compile_blocks


def accept_compiled_modules() -> None:
    """Let ``Trainer.fit/validate/test/predict`` take a compiled module for a strategy with ``compiles_blocks``."""
    from lightning.pytorch.trainer import trainer as trainer_module

    lightning_check = getattr(trainer_module, "_verify_strategy_supports_compile", None)
    if lightning_check is None or getattr(lightning_check, "accepts_compiles_blocks", False):
        return

    def verify(model: pl.LightningModule, strategy: Any) -> None:
        if not getattr(strategy, "compiles_blocks", False):
            lightning_check(model, strategy)

    verify.accepts_compiles_blocks = True  # type: ignore[attr-defined]
    trainer_module._verify_strategy_supports_compile = verify


def take_compiler(module: pl.LightningModule, fitting: bool) -> Callable[..., Any] | None:
    """Undo Lightning's whole-step compile of ``module``; the compiler for its blocks, or ``None`` if not compiled.

    Fitting, the caller compiles the blocks once the plan is applied. Otherwise (validate, test, predict)
    there is no partition to wait for, and the blocks are compiled here.
    """
    context = getattr(module, "_compiler_ctx", None)
    if not context:
        return None
    from lightning.pytorch.utilities.compile import to_uncompiled

    compiler = context["dynamo_ctx"]
    to_uncompiled(module)
    if not fitting:
        compile_blocks(find_blocks(module), compiler)  # tensor-parallel blocks stay eager, as in fit
        return None
    return compiler
