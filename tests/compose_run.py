"""Model parallel composed with data parallel on 4 CPU ranks (used by test_compose.py).

``python tests/compose_run.py OUT``: one launch of 4 processes trains the tensor- and the pipeline-parallel
block scenario, each with 2 data-parallel replicas (``{"preset": "tp", "data": 2}``: tensor pairs;
``{"preset": "pp", "data": 2}``: two 2-stage pipelines), and rank 0 saves each result to ``OUT/<name>.pt``.
Later Trainers reuse the first one's process group, as in scenarios.py.
"""

from __future__ import annotations

import os
import sys

import torch

from scenarios import ACCUMULATE_CLIP, SEED, Scenario, TensorBlockRegressor, make_trainer, results

WORLD_SIZE = 4
COMPOSED = [
    Scenario("tp_x_data", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP, plan={"preset": "tp", "data": 2},
             data_parallel=2),
    Scenario("pp_x_data", TensorBlockRegressor, trainer_kwargs=ACCUMULATE_CLIP, plan={"preset": "pp", "data": 2},
             data_parallel=2),
]


def main(out: str) -> None:
    import lightning as L

    from parti_lightning import PartiAccelerator, PartiStrategy

    for scenario in COMPOSED:
        L.seed_everything(SEED, verbose=False)
        module = scenario.module()
        # 4 ranks on a 2-core machine: more processes than cores, said explicitly.
        trainer = make_trainer(scenario, accelerator=PartiAccelerator(oversubscribe=True), devices=WORLD_SIZE,
                               strategy=PartiStrategy(plan=scenario.plan, state_dict_type="full"))
        trainer.fit(module)
        result = results(trainer, module, data_parallel=scenario.data_parallel)
        if trainer.is_global_zero:
            plan = trainer.strategy.resolved_plan.to_dict()
            torch.save({**result, "plan": plan}, os.path.join(out, f"{scenario.name}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
