"""Model parallel composed with data parallel on 4 CPU ranks (used by test_compose.py).

``python tests/helpers/compose_run.py OUT``: one launch of 4 processes trains the tensor- and the pipeline-parallel
block scenario, each with 2 data-parallel replicas (``{"preset": "tp", "data": 2}``: tensor pairs;
``{"preset": "pp", "data": 2}``: two 2-stage pipelines; ``{"preset": "zero3", "tensor": 2}``: tensor pairs
whose storage ZeRO-3 shards over the 2 data-parallel ranks), then ``{"preset": "pp", "tensor": 2}`` (2 stages,
each split over a tensor pair), and rank 0 saves each result to
``OUT/<name>.pt``. Then checkpoints cross the 2-D plan: the tensor × shard run's single file (``OUT/2d.ckpt``)
is resumed under tensor × shard, which writes a sharded directory (``OUT/2d_sharded``), resumed under ZeRO-3 over
all 4 ranks, which writes ``OUT/zero3_sharded``, resumed under tensor × shard; ``OUT/2d_sharded`` is resumed again
under pipeline × shard. ``OUT/resumed_<source>_as_<hop>.pt`` holds what each resume restored.
Later Trainers reuse the first one's process group, as in scenarios.py.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.distributed.tensor import DTensor

from scenarios import (
    ACCUMULATE_CLIP,
    SEED,
    RecordRestoredState,
    Scenario,
    TensorBlockRegressor,
    make_trainer,
    results,
)

WORLD_SIZE = 4
COMPOSED = [
    Scenario("tp_x_data", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP, plan={"preset": "tp", "data": 2},
             data_parallel=2),
    # GPipe, the preset's schedule (forward kept, no recompute); pp_x_tp and the two-rank parity scenario run 1F1B.
    Scenario("pp_x_data", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP,
             plan={"preset": "pp", "data": 2}, data_parallel=2),
    Scenario("tp_x_shard", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP,
             plan={"preset": "zero3", "tensor": 2}, data_parallel=2),
    # Two 2-stage pipelines whose stages split their blocks over tensor pairs; one data-parallel rank.
    Scenario("pp_x_tp", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP,
             plan={"preset": "pp", "tensor": 2, "schedule": "1f1b"}, data_parallel=1),
    # Two 2-stage pipelines whose stages ZeRO-3 shards over the 2 data-parallel ranks (GPipe: see the plan check).
    Scenario("pp_x_shard", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP,
             plan={"preset": "zero3", "pipeline": 2, "micro_batches": 4, "schedule": "gpipe"}, data_parallel=2),
    # ZeRO-1 inside each stage: the stage's ranks split its optimizer step, under 1F1B (no FSDP, so it may)
    # and under GPipe.
    Scenario("pp_x_zero1", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP,
             plan={"preset": "zero1", "pipeline": 2, "micro_batches": 4, "schedule": "1f1b"}, data_parallel=2),
    Scenario("pp_x_zero1_gpipe", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP,
             plan={"preset": "zero1", "pipeline": 2, "micro_batches": 4}, data_parallel=2),
]
TWO_D = COMPOSED[2]
PP_SHARD = COMPOSED[4]
PP_ZERO1 = COMPOSED[5]


def main(out: str, *only: str) -> None:
    """``only``: the names of the scenarios to run (all, and the checkpoint chain, when none is given)."""
    import lightning as L

    from parti_lightning import PartiAccelerator, PartiStrategy

    for scenario in COMPOSED:
        if only and scenario.name not in only:
            continue
        L.seed_everything(SEED, verbose=False)
        module = scenario.module()
        # 4 ranks on a 2-core machine: more processes than cores, said explicitly.
        trainer = make_trainer(scenario, accelerator=PartiAccelerator(oversubscribe=True), devices=WORLD_SIZE,
                               strategy=PartiStrategy(plan=scenario.plan, state_dict_type="full"))
        trainer.fit(module)
        result = results(trainer, module, data_parallel=scenario.data_parallel)
        if trainer.is_global_zero:
            plan = trainer.strategy.resolved_plan.to_dict()
            split = sum(isinstance(p, DTensor) and p.device_mesh.mesh_dim_names[-1] == "tensor"
                        for p in module.parameters())
            sharded = sum(isinstance(p, DTensor) and "shard" in p.device_mesh.mesh_dim_names
                          for p in module.parameters())
            torch.save({**result, "plan": plan, "tensor_split_parameters": split, "sharded_parameters": sharded},
                       os.path.join(out, f"{scenario.name}.pt"))
        if scenario is TWO_D:
            trainer.save_checkpoint(os.path.join(out, "2d.ckpt"))
    if only:
        return
    # Checkpoints across the 2-D plan: its single file resumed under tensor × shard, which writes its shards;
    # those resumed under ZeRO-3 over all 4 ranks, which writes its own; those resumed under tensor × shard.
    # Then the 2-D shards once more, under pipeline × shard, and under pipeline × ZeRO-1, whose shards (each
    # stage's ZeRO-1 owners write the optimizer state) resume under tensor × shard.
    chain = [(TWO_D.plan, "2d.ckpt", "2d_sharded"), ("zero3", "2d_sharded", "zero3_sharded"),
             (TWO_D.plan, "zero3_sharded", None), (PP_SHARD.plan, "2d_sharded", None),
             (PP_ZERO1.plan, "2d_sharded", "pp_zero1_sharded"), (TWO_D.plan, "pp_zero1_sharded", None)]
    for step, (plan, source, target) in enumerate(chain, start=1):
        record = os.path.join(out, f"resumed_{source}_as_{step}.pt")
        trainer = _resume(plan, os.path.join(out, source), record, steps=2 * step)
        if target is not None:
            # Written by every rank, each its shards. The strategy was built for single files so that the state
            # recorded above is gathered (readable with torch.load); the kind it writes is switched for this save.
            trainer.strategy._requested_state_dict_type = "sharded"
            trainer.save_checkpoint(os.path.join(out, target))


def _resume(plan: object, ckpt: str, record: str, steps: int) -> object:
    """Resume ``ckpt`` under ``plan`` up to ``steps`` past the scenario's; ``record`` gets what was restored."""
    import lightning as L

    from parti_lightning import PartiAccelerator, PartiStrategy

    L.seed_everything(SEED + 1, verbose=False)  # other initial weights: the checkpoint must replace them
    scenario = Scenario(TWO_D.name, TWO_D.module, trainer_kwargs=ACCUMULATE_CLIP, max_steps=TWO_D.max_steps + steps)
    trainer = make_trainer(scenario, accelerator=PartiAccelerator(oversubscribe=True), devices=WORLD_SIZE,
                           strategy=PartiStrategy(plan=plan, state_dict_type="full"),
                           callbacks=[RecordRestoredState(record)])
    trainer.fit(scenario.module(), ckpt_path=ckpt)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
