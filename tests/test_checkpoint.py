"""Sharded checkpoints (the default under ZeRO-2/3) do not depend on the plan or the world size.

Five launches (see checkpoint_run.py) write checkpoints under one plan and world size and resume them
under others; each run records, gathered and keyed by name, the state it had when it saved and the
state it restored. The tests compare them tensor by tensor (torch.equal), check that 10 steps + save +
resume 10 equals 20 straight, that a rank killed in the middle of a save leaves the previous checkpoint
and `last` intact, and that `parti-lightning convert` output loads with stock Lightning alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from parti_lightning.checkpoint import is_sharded_checkpoint, positional_to_named, read_meta
from parti_lightning.convert import convert, load_consolidated

from launch import REPO, Job, check, run_script, run_scripts

# (name, plan and world size that wrote it, plan and world size that resume it)
RESUMES = [
    ("zero3x4-as-ddpx2", "A", "ddp", 2),
    ("zero3x4-as-zero1x2", "A", "zero1", 2),
    ("zero3x4-as-1-process", "A", "ddp", 1),
    ("ddpx2-as-zero3x4", "B", "zero3", 4),
    ("1-process-as-zero3x4", "C", "zero3", 4),
    ("zero1x2-as-zero2x2", "D", "zero2", 2),
    ("single-file-as-zero3x4", "F", "zero3", 4),
    ("ddpx2-as-hsdp-2x2", "B", "hsdp", 4),
    ("top-k-link-zero2x2-as-zero2x2", "T", "zero2", 2),
    # `ckpt_path="last"`: Lightning finds the newest `last*.ckpt` in the checkpoint folder, here a directory.
    ("lightning-last-zero1x2-as-zero2x2", "D", "zero2-last", 2),
    # `PartiStrategy(resume="auto")`: `fit` with no `ckpt_path` goes on from the folder's newest checkpoint.
    ("resume-auto-zero1x2-as-zero1x2", "D", "zero1-auto", 2),
]


def _job(out: Path, devices: int, jobs: list[dict[str, Any]]) -> Job:
    jobs_file = out / f"jobs-{devices}-{len(list(out.glob('jobs-*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    return Job(["tests/helpers/checkpoint_run.py", str(devices), str(jobs_file)], processes=devices)


def _launch(out: Path, devices: int, jobs: list[dict[str, Any]], expect_failure: bool = False) -> str:
    job = _job(out, devices, jobs)
    result = run_script(list(job.args), timeout=300)
    if expect_failure:
        assert result.returncode != 0, f"the run was expected to fail:\n{result.stdout}"
        assert not result.stderr, f"processes left running: {result.stderr}"
        return result.stdout
    return check(result)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints")
    o = str(out)

    def restored(name: str, plan: str, world: int) -> str:
        return f"{o}/{name}_as_{plan}x{world}.pt"

    _launch(out, 4, [{"plan": "zero3", "max_steps": 10, "dirpath": f"{o}/A", "final": f"{o}/A.pt"}])
    # The next two resume A and do not depend on each other: launched side by side.
    two_ranks = _job(out, 2, [
        {"plan": "ddp", "max_steps": 12, "ckpt": f"{o}/A/last.ckpt", "restored": restored("A", "ddp", 2),
         "final": f"{o}/B.pt", "save": f"{o}/B"},
        {"plan": "zero1", "max_steps": 12, "ckpt": f"{o}/A/last.ckpt", "restored": restored("A", "zero1", 2)},
        {"plan": "zero1", "max_steps": 10, "dirpath": f"{o}/D", "final": f"{o}/D.pt"},
        {"plan": "zero2", "max_steps": 12, "ckpt": f"{o}/D/last.ckpt", "restored": restored("D", "zero2", 2)},
        # Both read D's folder through its callback and write nothing there (no `last` at the end of their fit).
        {"plan": "zero2", "max_steps": 12, "dirpath": f"{o}/D", "save_last": False, "ckpt": "last",
         "restored": restored("D", "zero2-last", 2)},
        {"plan": "zero1", "max_steps": 12, "dirpath": f"{o}/D", "save_last": False, "resume": "auto",
         "restored": restored("D", "zero1-auto", 2)},
        # Resume equivalence: 10 steps (one epoch at 2 ranks), save, resume 10 more; and 20 straight.
        {"plan": "zero2", "max_steps": 10, "dirpath": f"{o}/E", "every": 10, "final": f"{o}/E1.pt"},
        {"plan": "zero2", "max_steps": 20, "ckpt": f"{o}/E/last.ckpt", "final": f"{o}/E2.pt"},
        {"plan": "zero2", "max_steps": 20, "final": f"{o}/straight.pt"},
        # Top-k by a monitored value (the others removed), `last` a link to the newest. The value is the
        # step, so that which are kept does not depend on the losses.
        {"plan": "zero2", "max_steps": 10, "dirpath": f"{o}/T", "every": 2, "monitor": "step", "mode": "max",
         "top_k": 2, "save_last": "link", "final": f"{o}/T.pt"},
        {"plan": "zero2", "max_steps": 12, "ckpt": f"{o}/T/last.ckpt", "restored": restored("T", "zero2", 2)},
    ])
    one_process = _job(out, 1, [{"plan": "ddp", "max_steps": 12, "ckpt": f"{o}/A/last.ckpt",
                                 "restored": restored("A", "ddp", 1), "final": f"{o}/C.pt", "save": f"{o}/C",
                                 "validate": f"{o}/A/last.ckpt", "validated": f"{o}/A_validated.pt",
                                 "limit_val_batches": 2}])
    for launch in run_scripts({2: two_ranks, 1: one_process}, timeout=300).values():
        check(launch.result)
    # A plain single-file Lightning checkpoint (here: A consolidated) as the start of a sharded run.
    convert(out / "A" / "last.ckpt", out / "F.ckpt")
    _launch(out, 4, [
        {"plan": "zero3", "max_steps": 14, "ckpt": f"{o}/B", "restored": restored("B", "zero3", 4)},
        {"plan": "zero3", "max_steps": 14, "ckpt": f"{o}/C", "restored": restored("C", "zero3", 4)},
        {"plan": "zero3", "max_steps": 12, "ckpt": f"{o}/F.ckpt", "restored": restored("F", "zero3", 4)},
        # Replicated over 2 × sharded over 2 (a 2-D mesh): DCP reads each shard once per replica.
        {"plan": {"preset": "zero3", "data": 2}, "max_steps": 14, "ckpt": f"{o}/B",
         "restored": restored("B", "hsdp", 4)},
    ])
    return out


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def _saved_state(runs: Path, source: str) -> dict[str, Any]:
    return _load(runs / f"{'A' if source == 'F' else source}.pt")


def _assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["global_step"] == want["global_step"]
    assert got["lr"] == want["lr"], "learning rates (scheduler state in the parameter groups) differ"
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), f"weight {key} changed"
    for got_opt, want_opt in zip(got["optimizer_states"], want["optimizer_states"], strict=True):
        # Tuples may come back as lists (betas, through DCP's loading of a single file): same hyper-parameters.
        assert _lists(got_opt["param_groups"]) == _lists(want_opt["param_groups"])
        assert got_opt["state"].keys() == want_opt["state"].keys() and want_opt["state"]
        for name, values in want_opt["state"].items():
            assert got_opt["state"][name].keys() == values.keys()
            for key, value in values.items():
                assert torch.equal(got_opt["state"][name][key], value), f"optimizer state {name}.{key} changed"


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("name", "source", "plan", "world"), RESUMES, ids=[r[0] for r in RESUMES])
def test_resume_restores_every_tensor(runs: Path, name: str, source: str, plan: str, world: int) -> None:
    _assert_same_state(_load(runs / f"{source}_as_{plan}x{world}.pt"), _saved_state(runs, source))


def test_validate_from_a_sharded_checkpoint_loads_the_weights(runs: Path) -> None:
    validated, want = _load(runs / "A_validated.pt"), _load(runs / "A.pt")
    for key, value in want["state_dict"].items():
        assert torch.equal(validated["state_dict"][key], value), key
    assert torch.isfinite(validated["val_loss"])


def test_checkpoints_are_sharded_directories_recording_the_plan(runs: Path) -> None:
    folder = runs / "A"
    assert {p.name for p in folder.iterdir()} == {"epoch=1-step=10.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"}
    for path in folder.iterdir():
        assert is_sharded_checkpoint(path)
    # (5 steps an epoch at 4 ranks.) Each of the 4 ranks wrote its own shards; nobody gathered the model.
    assert len(list((folder / "last.ckpt").glob("*.distcp"))) == 4
    parti = read_meta(folder / "last.ckpt")["parti"]
    assert parti["world_size"] == 4 and parti["plan"]["storage"] == "parameters"
    assert len(parti["rng"]) == 4
    assert read_meta(folder / "epoch=0-step=5.ckpt")["global_step"] == 5


def test_top_k_keeps_k_sharded_checkpoints_and_last_links_the_newest(runs: Path) -> None:
    folder = runs / "T"
    kept = sorted(p.name for p in folder.iterdir() if p.name != "last.ckpt")
    assert kept == ["epoch=0-step=10.ckpt", "epoch=0-step=8.ckpt"], kept
    assert all(is_sharded_checkpoint(folder / name) for name in kept)
    assert (folder / "last.ckpt").is_symlink() and is_sharded_checkpoint(folder / "last.ckpt")
    assert read_meta(folder / "last.ckpt")["global_step"] == 10
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_ten_steps_save_resume_ten_equals_twenty_straight(runs: Path) -> None:
    first, resumed, straight = _load(runs / "E1.pt"), _load(runs / "E2.pt"), _load(runs / "straight.pt")
    assert straight["global_step"] == resumed["global_step"] == 20
    assert first["losses"] + resumed["losses"] == straight["losses"]
    _assert_same_state(resumed, straight)


@pytest.mark.timeout(300)
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "K"
    output = _launch(tmp_path, 2, [{"plan": "zero2", "max_steps": 15, "dirpath": str(folder), "kill_at": 10}],
                     expect_failure=True)
    assert not (folder / "epoch=0-step=10.ckpt").exists(), output
    visible = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert visible == {"epoch=0-step=5.ckpt", "last.ckpt"}
    assert read_meta(folder / "last.ckpt")["global_step"] == 5, "`last` no longer names the step-5 checkpoint"
    assert load_consolidated(folder / "last.ckpt")["global_step"] == 5  # every tensor still reads


def test_converted_file_loads_and_resumes_with_stock_lightning_alone(runs: Path, tmp_path: Path) -> None:
    converted = tmp_path / "consolidated.ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "parti_lightning.cli", "convert", str(runs / "A" / "last.ckpt"), str(converted)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    want = _load(runs / "A.pt")
    plain = _load(converted)
    for key, value in want["state_dict"].items():
        assert torch.equal(plain["state_dict"][key], value), key
    # The optimizer state is positional, as torch's Optimizer.state_dict() has it.
    names = [name for group in want["optimizer_states"][0]["param_groups"] for name in group["params"]]
    named = positional_to_named(plain["optimizer_states"][0], names)
    for name, values in want["optimizer_states"][0]["state"].items():
        for key, value in values.items():
            assert torch.equal(named["state"][name][key], value), f"{name}.{key}"
    script = f"""
import sys
import lightning as L
import torch
sys.path.insert(0, {str(REPO / 'tests' / 'helpers')!r})
from checkpoint_run import Net
module = Net.load_from_checkpoint({str(converted)!r})
want = torch.load({str(runs / 'A.pt')!r}, weights_only=True)["state_dict"]
assert all(torch.equal(module.state_dict()[k], v) for k, v in want.items())
trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Net(), ckpt_path={str(converted)!r})
assert trainer.global_step == 12
assert not [m for m in sys.modules if m.startswith("parti_lightning")], "parti was imported"
print("stock ok")
"""
    stock = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert stock.returncode == 0 and "stock ok" in stock.stdout, stock.stdout + stock.stderr


def test_convert_to_safetensors_and_back_to_sharded(runs: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    want = _load(runs / "A.pt")["state_dict"]
    convert(runs / "A" / "last.ckpt", tmp_path / "weights.safetensors")
    weights = load_file(tmp_path / "weights.safetensors")
    assert weights.keys() == {k for k, v in want.items() if isinstance(v, torch.Tensor)}
    for key, value in weights.items():
        assert torch.equal(value, want[key]), key
    # file -> sharded -> file gives back the same checkpoint.
    convert(runs / "A" / "last.ckpt", tmp_path / "one.ckpt")
    convert(tmp_path / "one.ckpt", tmp_path / "sharded")
    assert is_sharded_checkpoint(tmp_path / "sharded")
    convert(tmp_path / "sharded", tmp_path / "two.ckpt")
    one, two = _load(tmp_path / "one.ckpt"), _load(tmp_path / "two.ckpt")
    for key, value in one["state_dict"].items():
        assert torch.equal(two["state_dict"][key], value), key
    assert _flat(one["optimizer_states"]).keys() == _flat(two["optimizer_states"]).keys()
    for key, value in _flat(one["optimizer_states"]).items():
        assert _equal(_flat(two["optimizer_states"])[key], value), key
    assert one["global_step"] == two["global_step"] and one["lr_schedulers"] == two["lr_schedulers"]


def test_convert_refuses_a_positional_optimizer_state_and_reports_missing_paths(tmp_path: Path) -> None:
    from parti_lightning.checkpoint import CheckpointError

    torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{"state": {0: {}}, "param_groups": [
        {"lr": 0.1, "params": [0]}]}]}, tmp_path / "stock.ckpt")
    with pytest.raises(CheckpointError, match="keys its optimizer state by position"):
        convert(tmp_path / "stock.ckpt", tmp_path / "out")
    convert(tmp_path / "stock.ckpt", tmp_path / "out", weights_only=True)
    assert torch.equal(load_consolidated(tmp_path / "out")["state_dict"]["w"], torch.ones(2))
    result = subprocess.run([sys.executable, "-m", "parti_lightning.cli", "convert", str(tmp_path / "nope"), "x.ckpt"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr


def _lists(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _lists(v) for k, v in tree.items()}
    return [_lists(v) for v in tree] if isinstance(tree, (list, tuple)) else tree


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}/{i}").items()}
    return {prefix: tree}


def _equal(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

