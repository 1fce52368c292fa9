"""A run that loses a rank comes back by itself: torchrun restarts it, ``resume="auto"`` finds the checkpoint.

Each case runs under ``torchrun --max-restarts`` (see fault_run.py): rank 1 is SIGKILLed in the middle of step 7
(and, in two cases, again in the next attempt: mid-step, or while the checkpoint loads); torchrun stops rank 0
and starts both again, and the run resumes from its newest checkpoint, mostly one in the middle of an epoch,
with no ``ckpt_path``. It must end bit-identical to the same run never interrupted, parameters and optimizer
state, and log the steps it lost. Then: a mid-epoch checkpoint resumed on another world size (each sample once,
the global batch kept), a node lost and back under elastic torchrun, and the choice of checkpoint (the newest
whole one; a damaged one is passed over), the last without processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from parti_lightning.checkpoint import read_meta, save_sharded
from parti_lightning.checkpoint.integrity import damage
from parti_lightning.lightning_adapters.auto_resume import newest_checkpoint
from parti_lightning.lightning_adapters.data_position import keep_global_batch

from launch import REPO, Job, check, run_scripts

# (name, plan, data-parallel degree at 2 ranks, checkpoint every N steps, where rank 1 dies on each torchrun attempt,
# the step the last attempt resumes from). Epochs are 4 steps: a checkpoint at step 6 is in the middle of one.
PLANS = [
    ("ddp", "ddp", 2, 3, {"0": ["step", 6]}, 6),
    ("zero3", "zero3", 2, 3, {"0": ["step", 6]}, 6),
    ("tensor", {"preset": "tp", "tensor": 2}, 1, 3, {"0": ["step", 6]}, 6),
    ("pipeline", {"preset": "pp", "pipeline": 2}, 1, 3, {"0": ["step", 6]}, 6),
    ("ddp-at-an-epoch-end", "ddp", 2, 4, {"0": ["step", 6]}, 4),
    ("ddp-two-restarts", "ddp", 2, 2, {"0": ["step", 6], "1": ["step", 8]}, 8),
    ("zero3-killed-while-loading", "zero3", 2, 3, {"0": ["step", 6], "1": ["load"]}, 6),
    # Checkpoints written in the background: the one of step 6 may still be being written when rank 1 dies.
    ("zero3-async", "zero3", 2, 3, {"0": ["step", 6]}, (3, 6)),
]


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """Each plan's killed-and-restarted run, two torchrun jobs at a time: its folder and its result."""
    root = tmp_path_factory.mktemp("faults")
    jobs = {}
    for name, plan, data, every, kills, _ in PLANS:
        (root / name).mkdir()
        jobs[name] = Job(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          f"--max-restarts={len(kills)}", "--monitor-interval=0.5", "tests/helpers/fault_run.py",
                          str(root / name), json.dumps(plan), str(data), str(every), json.dumps(kills),
                          "async" if name.endswith("async") else "sync"], processes=2)
    launches = run_scripts(jobs, timeout=240)
    return {name: (root / name, launch.result) for name, launch in launches.items()}


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("name", "kills", "resumed_at"), [(p[0], p[4], p[5]) for p in PLANS], ids=[p[0] for p in PLANS]
)
def test_a_killed_rank_restarts_and_resumes_bit_identical_to_a_run_never_interrupted(
    faults: dict[str, tuple[Path, Any]], name: str, kills: dict[str, list[Any]], resumed_at: int | tuple[int, ...]
) -> None:
    folder, result = faults[name]
    out = check(result)
    assert len(re.findall(r"exitcode: -9\) local_rank: 1", out)) == len(kills), f"rank 1 was not killed:\n{out}"
    assert "resumes from the run's newest checkpoint" in out and "last.ckpt" in out, out
    resumes = [tuple(map(int, m)) for m in re.findall(r"resumed at step (\d+) from .* finished step (\d+): (\d+)", out)]
    assert resumes and resumes[-1][0] in (resumed_at if isinstance(resumed_at, tuple) else (resumed_at,)), out
    resumed_at = resumes[-1][0]
    # The steps lost are those the run before finished after the checkpoint. Rank 1 died in a step that rank 0
    # may have finished (its collectives were done) before failing in the next.
    assert all(lost == finished - at >= 0 for at, finished, lost in resumes), out
    if resumed_at % 4:
        assert "goes on after its first" in out, out  # the epoch's data picks up where the checkpoint was
    straight = torch.load(folder / "straight.pt", weights_only=True)
    resumed = torch.load(folder / "resumed.pt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 10
    # The resumed attempt ran the steps after its checkpoint, on the same batches and with the same random
    # draws (dropout) as the uninterrupted run: the same losses, bit for bit.
    assert resumed["losses"] == {step: loss for step, loss in straight["losses"].items() if step > resumed_at}
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), f"weight {key} differs"
    for want, got in zip(straight["optimizer_states"], resumed["optimizer_states"], strict=True):
        assert want["state"].keys() == got["state"].keys() and want["state"]
        for param, values in want["state"].items():
            for key, value in values.items():
                assert torch.equal(got["state"][param][key], value), f"optimizer state {param}.{key} differs"


# ------------------------------------------------------------------------ mid-epoch, on another world size


def _epoch_jobs(out: Path, devices: int, jobs: list[dict[str, Any]]) -> Job:
    jobs_file = out / f"jobs-{jobs[0]['ids'].rsplit('/', 1)[-1]}.json"
    jobs_file.write_text(json.dumps(jobs))
    return Job(["tests/helpers/epoch_run.py", str(devices), str(jobs_file)], processes=devices)


def _seen(prefix: Path) -> tuple[list[int], dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted(prefix.parent.glob(f"{prefix.name}.*.json"))]
    return [n for r in records for n in r["seen"]], records[0]


@pytest.mark.timeout(600)
def test_a_mid_epoch_checkpoint_resumes_on_another_world_size_with_each_sample_once(tmp_path: Path) -> None:
    """96 numbered samples, batches of 8 per rank. zero3 on 2 ranks (a sharded checkpoint) stops after step 2 of
    6, and one process resumes it; one process stops after step 3 of 12, and 2 ranks resume it (a file). Each
    time, the two runs together train on every sample of the epoch exactly once.

    2 → 1 keeps the global batch (16: one process accumulates 2 batches of 8, on the same samples the two
    ranks' step would have taken), so it ends where the 2-rank run never interrupted ends, within rounding.
    1 → 2 cannot (8 samples over 2 ranks of 8): the log says the global batch becomes 16."""
    o = tmp_path
    first = run_scripts({
        "2": _epoch_jobs(o, 2, [
            {"plan": "zero3", "save_at": 2, "dirpath": str(o / "two"), "ids": str(o / "two"), "dropout": False},
            {"plan": "zero3", "ids": str(o / "two-straight"), "dropout": False},
        ]),
        "1": _epoch_jobs(o, 1, [{"plan": "ddp", "save_at": 3, "dirpath": str(o / "one"), "ids": str(o / "one")}]),
    }, timeout=240)
    for launch in first.values():
        check(launch.result)
    second = run_scripts({
        "2 as 1": _epoch_jobs(o, 1, [{"plan": "ddp", "ckpt": str(o / "two" / "epoch=0-step=2.ckpt"),
                                      "ids": str(o / "two-as-one"), "dropout": False}]),
        "1 as 2": _epoch_jobs(o, 2, [{"plan": "ddp", "ckpt": str(o / "one" / "epoch=0-step=3.ckpt"),
                                      "ids": str(o / "one-as-two")}]),
    }, timeout=240)
    outputs = {key: check(launch.result) for key, launch in second.items()}
    # 2 → 1: 8 batches left, 2 per step; 1 → 2: 5 batches left on each rank, 1 per step.
    for before, after, steps, accumulate in (("two", "two-as-one", 2 + 4, 2), ("one", "one-as-two", 3 + 5, 1)):
        seen_before, _ = _seen(o / before)
        seen_after, record = _seen(o / after)
        assert sorted(seen_before + seen_after) == list(range(96)), (before, after)
        assert (record["global_step"], record["accumulate"]) == (steps, accumulate), (before, after)
    assert "goes on after its first 32 samples: 8 batch(es)" in outputs["2 as 1"], outputs["2 as 1"]
    assert "accumulate over 2 batch(es) (was 1), keeping the global batch of 16" in outputs["2 as 1"]
    assert "goes on after its first 24 samples: 5 batch(es)" in outputs["1 as 2"], outputs["1 as 2"]
    assert "keeps the global batch of 8 samples; it is now 16" in outputs["1 as 2"], outputs["1 as 2"]
    straight, resumed = torch.load(o / "two-straight.pt", weights_only=True), torch.load(o / "two-as-one.pt",
                                                                                          weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 6
    # Every parameter; `calls` counts training_step calls, which accumulation doubles on one process.
    assert resumed["state_dict"]["calls"] == 2 + 8 and straight["state_dict"]["calls"] == 6
    for key, value in straight["state_dict"].items():
        if key != "calls":
            torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.timeout(300)
def test_checkpoints_by_training_time_are_written_by_every_rank_together(tmp_path: Path) -> None:
    """Lightning's time trigger (``ModelCheckpoint(train_time_interval=...)``): rank 0's clock decides, and every
    rank must join the sharded save of that step. Here it fires after every step."""
    job = {"plan": "zero3", "every_seconds": 1e-6, "dirpath": str(tmp_path / "timed"), "ids": str(tmp_path / "t")}
    check(run_scripts({"timed": _epoch_jobs(tmp_path, 2, [job])}, timeout=240)["timed"].result)
    written = sorted(p.name for p in (tmp_path / "timed").iterdir() if not p.name.startswith("."))
    assert written == [f"epoch=0-step={step}.ckpt" for step in range(1, 7)], written
    assert all(damage(tmp_path / "timed" / name) is None for name in written)


# ------------------------------------------------------------------------ a node lost and back under elastic torchrun

ELASTIC_STEPS = 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent(port: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """One torchrun agent (a "node" of 2 ranks) of an elastic job of 1 to 2 nodes, on loopback."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
               "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=parti",
               "--rdzv-conf=join_timeout=90,last_call_timeout=15", "--monitor-interval=0.5",
               "tests/helpers/elastic_run.py", str(out), str(ELASTIC_STEPS)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    # As the README tells users of elastic jobs: torch 2.13's c10d rendezvous, sharing its store with the workers
    # (the default), hangs when a node joins a running job (its rank-0 agent keeps the first round's address and
    # never publishes the new round's, which the joining agent waits for).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    with open(log, "wb") as file:
        return subprocess.Popen(command, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL an agent and every process under it, as a node that loses power."""
    with contextlib.suppress(psutil.NoSuchProcess):
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    proc.wait()


def _starts(out: Path) -> list[dict[str, Any]]:
    """What global rank 0 recorded of each start of the workers, in the order they started."""
    return sorted((json.loads(p.read_text()) for p in out.glob("start-*.json")), key=lambda r: r["started"])


def _finished_step(out: Path, world: int, step: int) -> bool:
    return any(r["world"] == world and r["steps"] and r["steps"][-1] >= step for r in _starts(out))


def _wait_for(done: Any, agent: subprocess.Popen[bytes], log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline and agent.poll() is None, log.read_text(errors="replace")
        time.sleep(0.2)


@pytest.mark.timeout(600)
def test_a_node_lost_and_back_under_elastic_torchrun_resumes_on_the_ranks_there_are(tmp_path: Path) -> None:
    """Two agents of 2 ranks each train zero3 on 4 ranks; one agent and its ranks are killed after the checkpoint
    of step 4. The other's ranks fail, torchrun starts them again on 2 ranks (the rendezvous admits 1 to 2
    nodes), and the run resumes its 4-rank checkpoint there, keeping the global batch. Once that run has
    checkpointed on 2 ranks, a new agent joins: torchrun restarts the workers on 4 ranks, which resume the
    2-rank checkpoint, the global batch kept again, to the last step."""
    port, logs = _free_port(), [tmp_path / f"agent{i}.log" for i in range(3)]
    first = _agent(port, tmp_path, logs[0])
    lost = back = None
    try:
        time.sleep(1)  # the first agent hosts the rendezvous store; the second joins its first round
        lost = _agent(port, tmp_path, logs[1])
        _wait_for(lambda: (tmp_path / "ckpts" / "last.ckpt").exists() and _finished_step(tmp_path, 4, 5), first,
                  logs[0])
        _kill_tree(lost)
        _wait_for(lambda: _finished_step(tmp_path, 2, 7), first, logs[0])  # checkpointed at step 6 on 2 ranks
        back = _agent(port, tmp_path, logs[2])
        first.wait(timeout=300)
        back.wait(timeout=60)
    finally:
        for proc in (first, lost, back):
            if proc is not None and proc.poll() is None:
                _kill_tree(proc)
    out = "".join(log.read_text(errors="replace") for log in logs)
    assert first.returncode == 0 and back.returncode == 0, out
    starts = _starts(tmp_path)
    assert [start["world"] for start in starts] == [4, 2, 4], starts
    assert starts[1]["accumulate"] == 2 and starts[2]["accumulate"] == 1, starts
    # The second 4-rank start resumed a checkpoint the 2-rank start wrote, and ran to the last step.
    assert starts[2]["steps"][0] > 6 and starts[2]["steps"][-1] == ELASTIC_STEPS, starts
    assert "written on 4: gradients accumulate over 2 batch(es) (was 1)" in out, out
    assert "written on 2: gradients accumulate over 1 batch(es) (was 2)" in out, out
    assert len(re.findall(r"resumed at step \d+ from", out)) == 2, out
    assert "dataloader is not resumable" not in out, out  # Lightning's warning, answered by parti


class _Trainer:
    """What keep_global_batch reads and sets of a Trainer."""

    def __init__(self, accumulate: int = 1) -> None:
        self.accumulate_grad_batches = accumulate


def _batch(data_parallel: int, accumulate: int, configured: int | None = 1) -> dict[str, int]:
    record = {"data_parallel": data_parallel, "batch_size": 8, "accumulate": accumulate}
    return record if configured is None else record | {"configured": configured}


def test_the_global_batch_is_kept_over_several_changes_of_world_size_and_a_users_own_accumulation_is_left() -> None:
    lost = _Trainer()  # a node lost: 4 ranks -> 2
    keep_global_batch(lost, _batch(4, 1), 2)
    assert lost.accumulate_grad_batches == 2
    # Killed again on the same 2 ranks: the checkpoint's accumulation is parti's, the run's own stays 1.
    again = _Trainer()
    keep_global_batch(again, _batch(2, 2), 2)
    assert again.accumulate_grad_batches == 2
    back = _Trainer()  # the node back: 2 ranks -> 4
    keep_global_batch(back, _batch(2, 2), 4)
    assert back.accumulate_grad_batches == 1
    mine = _Trainer(accumulate=3)  # a run configured otherwise keeps its own
    keep_global_batch(mine, _batch(2, 2), 4)
    assert mine.accumulate_grad_batches == 3
    older = _Trainer()  # a checkpoint that records no configured accumulation: its own was the Trainer's
    keep_global_batch(older, _batch(4, 1, configured=None), 2)
    assert older.accumulate_grad_batches == 2


# ------------------------------------------------------------------------ choosing the checkpoint


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)


def _trainer(folder: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     callbacks=[ModelCheckpoint(dirpath=folder)])


def _file_checkpoint(path: Path) -> None:
    torch.save({"state_dict": _Tiny().state_dict(), "global_step": 1}, path)


def _sharded_checkpoint(path: Path) -> None:
    save_sharded(path, {"state_dict": _Tiny().state_dict(), "optimizer_states": [], "global_step": 2}, {})


def _touch_after(path: Path, other: Path) -> None:
    stamp = other.stat().st_mtime + 10
    os.utime(path, (stamp, stamp))


@pytest.mark.parametrize("newest_kind", ["file", "sharded"])
def test_resume_auto_passes_over_a_damaged_newest_checkpoint_and_says_so(
    tmp_path: Path, newest_kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    older, newer = tmp_path / "epoch=0-step=1.ckpt", tmp_path / "epoch=0-step=2.ckpt"
    _file_checkpoint(older)
    if newest_kind == "file":
        _file_checkpoint(newer)
    else:
        _sharded_checkpoint(newer)
    _touch_after(newer, older)
    trainer = _trainer(tmp_path)
    assert damage(newer) is None and damage(older) is None
    assert newest_checkpoint(trainer) == newer

    # Cut the newest short, as a crash that lost the end of its writes would.
    target = newer if newest_kind == "file" else max((newer).glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    _touch_after(newer, older)
    assert damage(newer) is not None
    with pytest.warns(UserWarning, match=r"passes over .*step=2\.ckpt.*cut short"):
        assert newest_checkpoint(trainer) == older

    # A sharded checkpoint missing a file, or not a checkpoint at all, is passed over as well.
    if newest_kind == "sharded":
        target.unlink()
        assert "missing" in (damage(newer) or "")
    shutil.rmtree(newer) if newer.is_dir() else newer.unlink()
    newer.write_text("not a checkpoint")
    _touch_after(newer, older)
    assert "not a readable torch archive" in (damage(newer) or "")
    with pytest.warns(UserWarning, match="passes over"):
        assert newest_checkpoint(trainer) == older


def test_hidden_and_foreign_files_in_the_folder_are_never_candidates(tmp_path: Path) -> None:
    _file_checkpoint(tmp_path / "last.ckpt")
    _file_checkpoint(tmp_path / ".parti-partial-0000.ckpt")  # a save under way
    (tmp_path / ".parti-progress.json").write_text(json.dumps({"global_step": 3}))
    (tmp_path / "notes.txt").write_text("")
    _touch_after(tmp_path / ".parti-partial-0000.ckpt", tmp_path / "last.ckpt")
    assert newest_checkpoint(_trainer(tmp_path)) == tmp_path / "last.ckpt"


# ------------------------------------------------------------------------ writing in the background


def test_a_background_save_publishes_whole_and_removes_what_it_replaces_only_after(tmp_path: Path) -> None:
    path, older = tmp_path / "epoch=0-step=4.ckpt", tmp_path / "epoch=0-step=2.ckpt"
    _sharded_checkpoint(older)
    removed: list[str] = []
    pending = save_sharded(path, {"state_dict": _Tiny().state_dict(), "optimizer_states": [], "global_step": 4}, {},
                           background=True)
    assert pending is not None
    pending.then(lambda: removed.append(str(older)))  # as ModelCheckpoint's removal of the top-k it replaces
    pending.wait()
    assert removed == [str(older)]
    assert damage(path) is None and read_meta(path)["global_step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".parti")]


def test_a_background_save_that_fills_the_disk_keeps_the_checkpoint_before_it_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    path = tmp_path / "last.ckpt"
    _sharded_checkpoint(path)  # global step 2, whole
    before = sorted((p.name, p.stat().st_size) for p in path.iterdir())

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    removed: list[str] = []
    pending = save_sharded(path, {"state_dict": _Tiny().state_dict(), "optimizer_states": [], "global_step": 4}, {},
                           background=True)
    assert pending is not None
    pending.then(lambda: removed.append("older"))
    with pytest.raises(OSError, match="asynchronous save of .*last.ckpt failed.*checkpoints before it are kept"):
        pending.wait()
    assert not removed  # what it would have replaced stays
    assert sorted((p.name, p.stat().st_size) for p in path.iterdir()) == before
    assert damage(path) is None and read_meta(path)["global_step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".parti")]  # nothing half-written left
