"""The ways a user names the strategy: Python, a LightningCLI YAML file, the `parti-lightning` command."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import parti_lightning
from parti_lightning import PartiAccelerator, PartiStrategy
from parti_lightning.cli import _config_paths

from launch import REPO, Job, Launch, check, run_scripts, selected_tests


def test_import_registers_strategy_and_accelerator() -> None:
    trainer = L.Trainer(strategy="parti", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, PartiStrategy)
    # The strategy's default accelerator is ours, even when the Trainer picked "cpu".
    assert isinstance(trainer.accelerator, PartiAccelerator)
    assert trainer.world_size == 2
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    assert isinstance(L.Trainer(accelerator="parti", strategy="parti", devices=1).accelerator, PartiAccelerator)


@pytest.mark.parametrize("name", ["parti_ddp", "PARTI", "parti_spawn"])
def test_registered_aliases(name: str) -> None:
    strategy = L.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False).strategy
    assert isinstance(strategy, PartiStrategy)
    assert strategy.plan == parti_lightning.PartitionPlan.from_value("ddp")


def test_config_paths_are_found_in_argv() -> None:
    assert _config_paths(["fit", "-c", "a.yaml", "--config=b.yaml", "--config", "c.yaml"]) == [
        "a.yaml", "b.yaml", "c.yaml",
    ]


@pytest.mark.parametrize(
    ("preset", "storage"),
    [("ddp", "replicated"), ("zero1", "optimizer"), ("zero2", "gradients"), ("zero3", "parameters"),
     ("hybrid", "parameters"), ("tp", "replicated"), ("pp", "replicated")],
)
def test_preset_yaml_names_the_strategy(preset: str, storage: str) -> None:
    config = yaml.safe_load((REPO / "strategies" / f"{preset}.yaml").read_text())
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "parti_lightning.PartiStrategy"
    assert PartiStrategy(**strategy["init_args"]).plan.storage == storage
    registered = L.Trainer(strategy=f"parti_{preset}", accelerator="cpu", devices=2, logger=False).strategy
    assert registered.plan == parti_lightning.PartitionPlan.from_value(preset)


# The tests below that launch a run of their own, and their launches: independent, so run two at a time.
LAUNCHES = {
    "test_yaml_class_path_with_stock_lightning_cli": "stock_cli",
    "test_parti_lightning_command_with_strategy_flag": "strategy_flag",
    "test_torchrun_starts_the_ranks_and_parti_launches_nothing": "torchrun",
}


@pytest.fixture(scope="module")
def launches(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Launch, Path]]:
    """Each selected test's launch (and the folder it wrote to), two at a time."""
    command = shutil.which("parti-lightning")
    assert command, "the parti-lightning console script is not installed"
    roots = {name: tmp_path_factory.mktemp(name) for name in LAUNCHES.values()}
    jobs = {
        "stock_cli": Job(["tests/helpers/stock_cli.py", "fit", "--config", "tests/helpers/configs/class_path.yaml",
                          f"--trainer.default_root_dir={roots['stock_cli']}"]),  # where the CLI writes its config.yaml
        "strategy_flag": Job(
            [command, "fit", "--model=scenarios.ToyRegressor", "--trainer.strategy=parti", "--trainer.accelerator=cpu",
             "--trainer.devices=1", "--trainer.max_steps=2", f"--trainer.default_root_dir={roots['strategy_flag']}",
             "--trainer.enable_progress_bar=false"],
            cwd=REPO / "tests" / "helpers", processes=1,
        ),
        "torchrun": Job(
            ["-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", f"--master-port={_free_port()}",
             "--master-addr=127.0.0.1", "tests/helpers/torchrun_run.py"],
            env={"PYTHONPATH": str(REPO / "tests" / "helpers")}, processes=3,  # the agent and its two workers
        ),
    }
    wanted = {LAUNCHES[item.originalname] for item in selected_tests(request) if item.originalname in LAUNCHES}
    done = run_scripts({name: job for name, job in jobs.items() if name in wanted}, timeout=150)
    return {name: (launch, roots[name]) for name, launch in done.items()}


@pytest.mark.timeout(400)
def test_yaml_class_path_with_stock_lightning_cli(launches: dict[str, tuple[Launch, Path]]) -> None:
    out = check(launches["stock_cli"][0].result)
    assert "strategy=PartiStrategy world_size=2 steps=3" in out


@pytest.mark.timeout(400)
def test_parti_lightning_command_with_strategy_flag(launches: dict[str, tuple[Launch, Path]]) -> None:
    launch, root = launches["strategy_flag"]
    out = check(launch.result)
    assert "parti: plan data=1" in out
    assert list(root.rglob("*.ckpt")), "fit did not write its checkpoint"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("plan", ["ddp", "zero3"])
def test_spawn_start_method_for_notebooks(plan: str) -> None:
    from parti_lightning import PartiStrategy

    from scenarios import SEED, ToyRegressor

    L.seed_everything(SEED, verbose=False)
    module = ToyRegressor()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(
        strategy=PartiStrategy(plan=plan, start_method="spawn"), accelerator="cpu", devices=2, max_steps=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)
    # Lightning's spawn launcher copies the trained weights back to the calling process (gathered, under zero3).
    after = module.state_dict()
    assert after.keys() == before.keys() and all(type(v) is torch.Tensor for v in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())


@pytest.mark.timeout(400)
def test_torchrun_starts_the_ranks_and_parti_launches_nothing(launches: dict[str, tuple[Launch, Path]]) -> None:
    out = check(launches["torchrun"][0].result)
    assert "rank 0/2 env=TorchElasticEnvironment launched=[]" in out
    assert "rank 1/2 env=TorchElasticEnvironment launched=[]" in out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
