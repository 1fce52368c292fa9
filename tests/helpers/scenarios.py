"""Training scenarios run twice: distributed with ``strategy="parti"`` and as a single-process reference.

Run as a script, it trains every scenario in one launch of 2 processes (``python tests/helpers/scenarios.py OUT``;
Lightning's subprocess launcher re-runs this file for rank 1, and later Trainers reuse the process group,
which keeps start-up cost to one launch), and rank 0 saves each scenario's results to ``OUT/<name>.pt``.
The tests build the single-process reference in-process from the same seed and the same global batches.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

SEED = 1234
WORLD_SIZE = 2
BATCH = 8  # per rank
SAMPLES = 320  # 20 batches per rank per epoch at world size 2: no padding, no ragged last batch


def make_dataset(features: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, features, generator=g)
    y = (x @ torch.randn(features, 1, generator=g)).tanh() + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return TensorDataset(x, y)


def fixed_batch(features: int = 6) -> torch.Tensor:
    return torch.randn(16, features, generator=torch.Generator().manual_seed(99))


class ToyRegressor(L.LightningModule):
    """A small regressor with the features the parity tests exercise, each switched by an argument."""

    def __init__(self, norm: bool = False, scheduler: bool = False, extra_branch: bool = False) -> None:
        super().__init__()
        # No bias before a batch norm: its gradient is zero up to rounding, and Adam would amplify that noise.
        self.encoder = nn.Sequential(
            nn.Linear(6, 32, bias=not norm), nn.BatchNorm1d(32) if norm else nn.Identity(), nn.Tanh()
        )
        self.head = nn.Linear(32, 1)
        # Used only on some steps: Lightning's `ddp` needs find_unused_parameters=True for this.
        self.extra = nn.Linear(32, 1) if extra_branch else None
        self.use_scheduler = scheduler
        self.mae = torchmetrics.MeanAbsoluteError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def _loss(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        hidden = self.encoder(x)
        pred = self.head(hidden)
        if self.extra is not None and batch_idx % 2 == 1:
            pred = pred + self.extra(hidden)
        return F.mse_loss(pred, y), pred

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, pred = self._loss(batch, batch_idx)
        self.mae(pred.detach(), batch[1])
        self.log("train_loss", loss, sync_dist=True, on_step=True, on_epoch=True)
        self.log("train_mae", self.mae, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, _ = self._loss(batch, 0)
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self) -> Any:
        # eps above Adam's default: a weight whose gradient is rounding noise (~1e-7, differing with summation
        # order: micro-batches, shards) gets an update of order lr / (1 + eps / noise) either way; with eps=1e-8
        # that is a coin flip at lr scale (seen: one of 2,048 weights off by 1.4e-5 under pipeline parallel).
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01, eps=1e-6)
        if not self.use_scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(), batch_size=BATCH, shuffle=True)


class TwoOptimizerRegressor(ToyRegressor):
    """Manual optimization: two optimizers, two backward passes per step, each touching part of the model."""

    def __init__(self) -> None:
        super().__init__(extra_branch=True)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_encoder, opt_head = self.optimizers()
        x, y = batch
        # First loss trains the encoder through a frozen view of the head's output.
        loss_a, pred = self._loss(batch, batch_idx)
        opt_encoder.zero_grad()
        self.manual_backward(loss_a)
        opt_encoder.step()
        # Second loss trains the head (and, on odd steps, the extra branch) only.
        hidden = self.encoder(x).detach()
        out = self.head(hidden) + (self.extra(hidden) if batch_idx % 2 == 1 else 0)
        loss_b = F.l1_loss(out, y)
        opt_head.zero_grad()
        self.manual_backward(loss_b)
        opt_head.step()
        self.log("train_loss", loss_a, sync_dist=True)
        self.log("train_loss_b", loss_b, sync_dist=True)

    def configure_optimizers(self) -> Any:
        head_params = [*self.head.parameters(), *self.extra.parameters()]
        return torch.optim.AdamW(self.encoder.parameters(), lr=1e-2), torch.optim.SGD(head_params, lr=5e-2)


class ResidualBlock(nn.Module):
    forward_calls = 0  # counts recomputation under activation checkpointing too

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ResidualBlock.forward_calls += 1
        return x + self.mlp(self.norm(x))


class BlockRegressor(ToyRegressor):
    """Repeated blocks in a ModuleList: what parti finds on its own as sharding and checkpointing units."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(32) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._hidden(x))

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden

    def _loss(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        pred = self.head(self._hidden(x))
        return F.mse_loss(pred, y), pred


class NormBlock(nn.Module):
    """A residual block with a batch norm: under `sync_batchnorm=True` it holds a process group."""

    def __init__(self, width: int) -> None:
        super().__init__()
        # No bias before the batch norm: its gradient is zero up to rounding (see ToyRegressor).
        self.mlp = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class NormBlockRegressor(BlockRegressor):
    """Repeated blocks that hold batch norms: what a conv net brings to tensor parallelism."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(NormBlock(32) for _ in range(3))


class TensorBlockRegressor(BlockRegressor):
    """Blocks whose MLPs tensor parallelism splits (colwise then rowwise), with an LR scheduler, and a metric
    that counts samples: synced over every rank rather than the data-parallel ones, it would count each
    batch once per tensor rank."""

    def __init__(self) -> None:
        super().__init__()
        self.use_scheduler = True
        self.samples = torchmetrics.SumMetric()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.samples(torch.tensor(float(len(batch[0]))))
        self.log("train_samples", self.samples, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


class DeepBlockRegressor(TensorBlockRegressor):
    """Four blocks: enough for 2 ranks × 2 stages of an interleaved pipeline schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks.append(ResidualBlock(32))


class PlainBlock(ResidualBlock):
    """A residual block that counts nothing: a counter on the class would make ``torch.compile`` recompile per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class CompiledBlockRegressor(TensorBlockRegressor):
    """What users pass as ``trainer.fit(torch.compile(model))``: blocks tensor parallelism splits, no side effects."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PlainBlock(32) for _ in range(3))


class TwoOptimizerBlockRegressor(BlockRegressor):
    """Manual optimization over repeated blocks: one optimizer for the trunk, clipped by norm, one for the head,
    each stepped after its own backward pass; what tensor parallelism splits is in the first."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_trunk, opt_head = self.optimizers()
        x, y = batch
        loss_a = F.mse_loss(self.head(self._hidden(x)).detach() + self._hidden(x).mean(-1, keepdim=True), y)
        opt_trunk.zero_grad()
        self.manual_backward(loss_a)
        self.clip_gradients(opt_trunk, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        opt_trunk.step()
        loss_b = F.mse_loss(self.head(self._hidden(x).detach()), y)
        opt_head.zero_grad()
        self.manual_backward(loss_b)
        opt_head.step()
        self.log("train_loss", loss_a, sync_dist=True)
        self.log("train_loss_b", loss_b, sync_dist=True)

    def configure_optimizers(self) -> Any:
        trunk = [*self.encoder.parameters(), *self.blocks.parameters()]
        return torch.optim.AdamW(trunk, lr=1e-2), torch.optim.SGD(self.head.parameters(), lr=5e-2)


class LateRegressor(ToyRegressor):
    """Builds its head in `configure_model`, as Lightning's large-model recipes do."""

    def __init__(self) -> None:
        super().__init__()
        del self.head

    def configure_model(self) -> None:
        if not hasattr(self, "head"):
            self.head = nn.Linear(32, 1)
            # Its own generator: the launcher re-seeds the global one, a single process does not.
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.1)
                self.head.bias.zero_()


@dataclass(frozen=True)
class Scenario:
    name: str
    module: type[L.LightningModule]
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 10
    plan: str | dict[str, Any] = "ddp"
    strategy_kwargs: dict[str, Any] = field(default_factory=dict)
    # Ranks that see different batches; tensor-parallel ranks see the same one.
    data_parallel: int = WORLD_SIZE
    # `trainer.fit(torch.compile(module, backend=...))`; the single-process reference runs uncompiled.
    compile_backend: str | None = None


# Gradient accumulation and clipping by norm, as the parity scenarios train with them.
ACCUMULATE_CLIP = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05, "gradient_clip_algorithm": "norm"}


def _accumulate_clip_schedule(name: str, plan: str) -> Scenario:
    """Gradient accumulation, clipping by norm, an LR scheduler and a parameter unused on odd steps."""
    return Scenario(name, ToyRegressor, {"scheduler": True, "extra_branch": True}, ACCUMULATE_CLIP, plan=plan)


SCENARIOS = [
    Scenario("basic", ToyRegressor),
    _accumulate_clip_schedule("accumulate_clip_schedule", "ddp"),
    Scenario("manual_two_optimizers", TwoOptimizerRegressor),
    Scenario("sync_batchnorm", ToyRegressor, {"norm": True}, {"sync_batchnorm": True}),
    _accumulate_clip_schedule("zero1_accumulate_clip_schedule", "zero1"),
    Scenario("zero2_basic", ToyRegressor, plan="zero2"),
    _accumulate_clip_schedule("zero3_accumulate_clip_schedule", "zero3"),
    Scenario("zero3_manual_two_optimizers", TwoOptimizerRegressor, plan="zero3"),
    Scenario(
        "zero3_blocks_activation_checkpointing",
        BlockRegressor,
        trainer_kwargs={"gradient_clip_val": 0.05},
        plan={"preset": "zero3", "activation_checkpointing": "blocks"},
    ),
    Scenario("ddp_blocks_activation_checkpointing", BlockRegressor, plan={"activation_checkpointing": "blocks"}),
    Scenario("zero3_configure_model", LateRegressor, plan="zero3"),
    # Tensor parallel over both ranks: one data-parallel rank, so a global batch of BATCH.
    Scenario(
        "tp_accumulate_clip_schedule",
        TensorBlockRegressor,
        trainer_kwargs=ACCUMULATE_CLIP,
        plan="tp",
        data_parallel=1,
    ),
    # Tensor parallel over blocks that hold synced batch norms (a process group each): trained, never a crash.
    Scenario("tp_sync_batchnorm_blocks", NormBlockRegressor, trainer_kwargs={"sync_batchnorm": True}, plan="tp",
             data_parallel=1),
    # Tensor parallel with each block's activations recomputed in backward.
    Scenario("tp_blocks_activation_checkpointing", BlockRegressor, trainer_kwargs={"gradient_clip_val": 0.05},
             plan={"preset": "tp", "activation_checkpointing": "blocks"}, data_parallel=1),
    # Tensor parallel under manual optimization: two optimizers, two backward passes and clipping in one step.
    Scenario("tp_manual_two_optimizers", TwoOptimizerBlockRegressor, plan="tp", data_parallel=1),
    # The same under pipeline parallel: three trunk passes per step (two of them under autograd), two backward
    # passes, clipping by the norm over both stages inside the step.
    Scenario("pp_manual_two_optimizers", TwoOptimizerBlockRegressor, plan="pp", data_parallel=1),
    # GPipe with each block's activations recomputed in the trunk's backward (a plan the planner may choose).
    Scenario("pp_blocks_activation_checkpointing", BlockRegressor,
             plan={"preset": "pp", "activation_checkpointing": "blocks"}, data_parallel=1),
    # Interleaved 1F1B: 4 stages of one block on 2 ranks (stages 0 and 2 on rank 0).
    Scenario("pp_interleaved_accumulate_clip_schedule", DeepBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP,
             plan={"preset": "pp", "schedule": "interleaved-1f1b"}, data_parallel=1),
    # Pipeline over both ranks (2 stages of the 3 blocks, 4 micro-batches, 1F1B: the backward recomputes the
    # trunk; GPipe, the preset's, runs in the compose scenarios): one data-parallel rank.
    Scenario(
        "pp_accumulate_clip_schedule",
        TensorBlockRegressor,
        trainer_kwargs=ACCUMULATE_CLIP,
        plan={"preset": "pp", "schedule": "1f1b"},
        data_parallel=1,
    ),
    # The planner chooses: replicated for a model that easily fits; then, with a budget between the
    # replicated and the sharded predictions of that first run, a sharded plan (see `main`).
    # torch.compile'd modules (CPU inductor): parti compiles each block after partitioning.
    Scenario("compiled_ddp", CompiledBlockRegressor, compile_backend="inductor"),
    Scenario("compiled_zero3", CompiledBlockRegressor, plan="zero3", compile_backend="inductor"),
    Scenario("compiled_tp", CompiledBlockRegressor, plan="tp", data_parallel=1, compile_backend="inductor"),
    Scenario("compiled_pp", CompiledBlockRegressor, plan="pp", data_parallel=1, compile_backend="inductor"),
    Scenario("auto", BlockRegressor, plan="auto"),
    Scenario("auto_tight_budget", BlockRegressor, plan="auto"),
    # Then a budget only a tensor- or pipeline-parallel plan's prediction meets: the model is split, one
    # data-parallel rank (both ranks split it).
    Scenario("auto_model_parallel_budget", BlockRegressor, plan="auto", data_parallel=1),
]
HEADROOM = 0.1


def make_trainer(scenario: Scenario, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=scenario.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **scenario.trainer_kwargs,
        **kwargs,
    )


def results(trainer: L.Trainer, module: L.LightningModule, data_parallel: int) -> dict[str, Any]:
    # The strategy's own gathered view (what a checkpoint holds); a plain state dict on one process.
    state = trainer.strategy.lightning_module_state_dict()
    metrics = {k: v.detach().clone() for k, v in trainer.callback_metrics.items()}
    # Evaluation after fit, on the trained (possibly still sharded) module, over the same samples.
    loader = DataLoader(make_dataset(), batch_size=BATCH * WORLD_SIZE // data_parallel)
    (validated,) = trainer.validate(module, dataloaders=loader, verbose=False)
    module.eval()
    with torch.no_grad():
        output = module(fixed_batch())
    return {
        "state": {k: v.detach().clone() for k, v in state.items()},
        "output": output,
        "metrics": metrics,
        "val_loss": torch.tensor(validated["val_loss"]),
    }


class GlobalBatchSampler(Sampler[list[int]]):
    """The batches a single process must see to match ``world_size`` ranks under Lightning's sampler."""

    def __init__(self, dataset: TensorDataset, world_size: int, batch_size: int, epochs: int = 3) -> None:
        self.batches: list[list[int]] = []
        seed = int(os.getenv("PL_GLOBAL_SEED", 0))
        for epoch in range(epochs):
            per_rank = []
            for rank in range(world_size):
                sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
                sampler.set_epoch(epoch)
                indices = list(sampler)
                per_rank.append([indices[i : i + batch_size] for i in range(0, len(indices), batch_size)])
            for step in range(len(per_rank[0])):
                self.batches.append([i for rank in range(world_size) for i in per_rank[rank][step]])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def run_reference(scenario: Scenario) -> dict[str, Any]:
    """The same scenario in one process, over the global batches of the scenario's data-parallel ranks."""
    L.seed_everything(SEED, verbose=False)
    module = scenario.module(**scenario.module_kwargs)
    dataset = make_dataset()
    # A sampler that covers one epoch only, so the epoch boundary falls where it does for the ranks.
    loader = DataLoader(dataset, batch_sampler=GlobalBatchSampler(dataset, scenario.data_parallel, BATCH, epochs=1))
    trainer = make_trainer(scenario, accelerator="cpu", devices=1, strategy="auto")
    trainer.fit(module, train_dataloaders=loader)
    return results(trainer, module, data_parallel=1)


def run_distributed(scenario: Scenario, out: str) -> tuple[L.Trainer, dict[str, Any]]:
    from parti_lightning import PartiStrategy

    L.seed_everything(SEED, verbose=False)
    module = scenario.module(**scenario.module_kwargs)
    # Single-file checkpoints: these tests read them with torch.load (test_checkpoint.py covers sharded ones).
    strategy = PartiStrategy(plan=scenario.plan, state_dict_type="full", **scenario.strategy_kwargs)
    trainer = make_trainer(scenario, accelerator="cpu", devices=WORLD_SIZE, strategy=strategy)
    ResidualBlock.forward_calls = 0
    trainer.fit(torch.compile(module, backend=scenario.compile_backend) if scenario.compile_backend else module)
    # How the plan was applied: FSDP units show as FSDP<Class>, checkpointing as recomputed forwards.
    applied = {
        "classes": {name: type(m).__name__ for name, m in module.named_modules() if name},
        "block_forward_calls": ResidualBlock.forward_calls,
        "compiled_blocks": sum(bool(getattr(m, "_parti_compiled_forward", False)) for m in module.modules()),
        "plan": trainer.strategy.resolved_plan.to_dict(),
    }
    # A checkpoint written under this plan: a plain Lightning file, whatever the partition.
    trainer.save_checkpoint(os.path.join(out, f"{scenario.name}.ckpt"))
    return trainer, {**results(trainer, module, data_parallel=scenario.data_parallel), "applied": applied}


class RecordRestoredState(L.Callback):
    """Saves, as training resumes, the model and optimizer state the strategy restored (gathered, by name)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {
            "state_dict": trainer.strategy.lightning_module_state_dict(),
            "optimizer_states": [trainer.strategy.optimizer_state(o) for o in trainer.optimizers],
            "global_step": trainer.global_step,
        }
        if trainer.is_global_zero:
            torch.save(state, self.path)


# (checkpoint written by the scenario, plan to resume it under)
RESUMES = [
    ("zero3_accumulate_clip_schedule", "ddp"),
    ("basic", "zero3"),
    ("zero1_accumulate_clip_schedule", "zero2"),
    ("stock", "zero3"),  # written by stock Lightning in one process (positional optimizer state)
    ("tp_accumulate_clip_schedule", "ddp"),
    ("ddp_blocks_activation_checkpointing", "tp"),
    ("pp_accumulate_clip_schedule", "ddp"),
    ("ddp_blocks_activation_checkpointing", "pp"),
    ("pp_interleaved_accumulate_clip_schedule", "ddp"),  # every other stage per rank: all blocks restored
]


def run_resume(source: str, plan: str, out: str) -> None:
    from parti_lightning import PartiStrategy

    scenario = next((s for s in SCENARIOS if s.name == source), SCENARIOS[0])
    L.seed_everything(SEED + 1, verbose=False)  # other initial weights: the checkpoint must replace them
    module = scenario.module(**scenario.module_kwargs)
    trainer = make_trainer(
        Scenario(scenario.name, scenario.module, scenario.module_kwargs, scenario.trainer_kwargs, max_steps=12),
        accelerator="cpu", devices=WORLD_SIZE, strategy=PartiStrategy(plan=plan, state_dict_type="full"),
        callbacks=[RecordRestoredState(os.path.join(out, f"resumed_{source}_as_{plan}.pt"))],
    )
    trainer.fit(module, ckpt_path=os.path.join(out, f"{source}.ckpt"))


def write_stock_checkpoint(out: str) -> None:
    """Four steps of stock Lightning in one process, saved as Lightning saves it."""
    L.seed_everything(SEED, verbose=False)
    trainer = make_trainer(Scenario("stock", ToyRegressor, max_steps=4), accelerator="cpu", devices=1)
    trainer.fit(ToyRegressor())
    trainer.save_checkpoint(os.path.join(out, "stock.ckpt"))


def _budget_only_model_parallel(report: Any) -> int | None:
    """A per-rank budget that no data-parallel plan fits (its predicted peak and margin) and some tensor- or
    pipeline-parallel plan does."""
    if report is None:  # not global rank 0
        return None
    split = min(c.estimate.needed_bytes for c in report.candidates if c.plan.tensor > 1 or c.plan.pipeline > 1)
    whole = min(c.estimate.needed_bytes for c in report.candidates if c.plan.tensor == c.plan.pipeline == 1)
    assert split < whole, f"model-parallel plans predicted {split} B, data-parallel ones {whole} B"
    return int((split + whole) / 2 / (1 - HEADROOM))


def _budget_below_replicated(report: Any) -> int | None:
    """A per-rank budget that no replicated data-parallel plan fits (its predicted peak and margin) and a ZeRO-3 plan
    does (tensor- and pipeline-parallel plans may fit too: the planner takes them only when no data-parallel plan
    does)."""
    if report is None:  # not global rank 0
        return None
    data_parallel = [c for c in report.candidates if c.plan.tensor == c.plan.pipeline == 1]
    replicated = min(c.estimate.needed_bytes for c in data_parallel if c.plan.storage == "replicated")
    sharded = min(c.estimate.needed_bytes for c in data_parallel if c.plan.storage == "parameters")
    assert sharded < replicated, f"ZeRO-3 predicted {sharded} B, replicated {replicated} B"
    return int((sharded + replicated) / 2 / (1 - HEADROOM))


def main(out: str) -> None:
    import parti_lightning  # noqa: F401

    os.makedirs(out, exist_ok=True)
    budget = split_budget = None
    for scenario in SCENARIOS:
        # Budgets set from the first run's predictions, which no measurement had corrected yet: the runs
        # they are meant for plan from the same, uncorrected cost model.
        if scenario.name == "auto_model_parallel_budget":
            scenario = Scenario(**{**scenario.__dict__, "strategy_kwargs": {
                "memory_budget": split_budget, "planner_headroom": HEADROOM, "planner_calibration": False}})
        if scenario.name == "auto_tight_budget":
            scenario = Scenario(**{**scenario.__dict__, "strategy_kwargs": {
                "memory_budget": budget, "planner_headroom": HEADROOM, "planner_calibration": False}})
        trainer, result = run_distributed(scenario, out)
        if scenario.name == "auto":
            budget = trainer.strategy.broadcast(_budget_below_replicated(trainer.strategy.plan_report))
            split_budget = trainer.strategy.broadcast(_budget_only_model_parallel(trainer.strategy.plan_report))
        if trainer.is_global_zero:
            torch.save(result, os.path.join(out, f"{scenario.name}.pt"))
    for source, plan in RESUMES:
        run_resume(source, plan, out)
    from hooks import record_hooks  # noqa: E402 - the helpers folder is on sys.path when run as a script

    for strategy in ("parti", "ddp"):
        calls = record_hooks(strategy)
        if calls is not None:
            torch.save(calls, os.path.join(out, f"hooks_{strategy}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
