"""Multi-node and cluster launches (torchrun, SLURM) and where a run listens on the network.

Every process here stays on this machine and talks over 127.0.0.1 only: the "nodes" of a multi-node
run are two torchrun launchers on one host with a loopback rendezvous.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import psutil
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.distributed.device_mesh import init_device_mesh

from parti_lightning import PartiStrategy
from parti_lightning.lightning_adapters import network

from launch import REPO, _session_members, check, run_script
from scenarios import SEED, ToyRegressor

# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK"):
        env.pop(key, None)
    return env


def run_together(commands: list[list[str]], timeout: float, logs: Path) -> list[str]:
    """Run ``python *args`` for each command at once, each in its own session; return each one's output.

    For jobs made of several launchers (one per "node"): if any outlives ``timeout``, or one fails
    while the others wait for it, every session is killed, so nothing is left holding the port.
    Output goes to files, not pipes: one launcher's full pipe must not stall it while we wait on another.
    """
    env = _launch_env()
    procs: list[subprocess.Popen[bytes]] = []
    paths = [logs / f"launcher{i}.log" for i in range(len(commands))]
    leftovers: list[int] = []
    finished = False
    try:
        for args, path in zip(commands, paths, strict=True):
            with open(path, "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                ))
        finished = _wait_all(procs, timeout)
        # Launchers that exited but left a process of theirs running: a leak the test should fail on.
        leftovers = [pid for proc in procs for pid in _session_members(proc.pid, grace=5.0)] if finished else []
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outputs = [path.read_text(errors="replace") for path in paths]
    everything = "\n".join(f"----- launcher {i} -----\n{out}" for i, out in enumerate(outputs))
    assert finished, f"not finished in {timeout:.0f}s (or a launcher failed and the others hung):\n{everything}"
    for proc in procs:
        assert proc.returncode == 0, f"a launcher exited with {proc.returncode}; output:\n{everything}"
    assert not leftovers, f"processes left running after the job ended: {leftovers}"
    return outputs


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    """Whether every process exited; a failed one gives the others a short grace, as they may block on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        if all(code is not None for code in codes):
            return True
        if any(code not in (None, 0) for code in codes):
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.1)
    return False


def _torchrun(nnodes: int, nproc: int, node_rank: int, port: int, out: Path) -> list[str]:
    return [
        "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1", f"--master-port={port}",
        "tests/helpers/multinode_run.py", str(out), str(nproc), str(nnodes),
    ]


def _listens_beyond_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    return address.is_unspecified or not address.is_loopback


# --------------------------------------------------------------------------- torchrun: 2 nodes × 2 = 1 node × 4


@pytest.mark.timeout(280)
def test_two_torchrun_nodes_train_as_one_node_of_four(tmp_path: Path) -> None:
    port = _free_port()
    two_nodes = tmp_path / "2x2.pt"
    outputs = run_together(
        [_torchrun(2, 2, node, port, two_nodes) for node in (0, 1)], timeout=120, logs=tmp_path
    )
    # Each launcher started its own two ranks; Lightning read torchrun's variables; parti launched nothing.
    for node, out in enumerate(outputs):
        for local in (0, 1):
            rank = 2 * node + local
            assert (
                f"rank {rank}/4 node={node} local={local} env=TorchElasticEnvironment launched=[]"
                f" sampler={{'num_replicas': 4, 'rank': {rank}}} steps=4"
            ) in out, out

    one_node = tmp_path / "1x4.pt"
    out = check(run_script(_torchrun(1, 4, 0, _free_port(), one_node), timeout=120))
    for rank in range(4):
        assert f"rank {rank}/4 node=0 local={rank} env=TorchElasticEnvironment launched=[]" in out

    split, whole = torch.load(two_nodes), torch.load(one_node)
    L.seed_everything(SEED, verbose=False)
    initial = dict(ToyRegressor().named_parameters())
    assert split.keys() == whole.keys() == initial.keys()
    for name in whole:
        # Same ranks, same batches, same gloo reduction over 4 ranks: the node layout changes nothing.
        assert torch.equal(split[name], whole[name]), name
        assert not torch.equal(whole[name], initial[name]), f"{name} did not train"


# --------------------------------------------------------------------------- SLURM


def _slurm_job(monkeypatch: pytest.MonkeyPatch, procid: int, localid: int, nodeid: int) -> None:
    """What `srun` sets for one task of `sbatch --nodes=2 --ntasks-per-node=2` (the variables Lightning reads)."""
    for key in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                "MASTER_ADDR", "MASTER_PORT"):
        # set-then-delete, so monkeypatch also removes what SLURMEnvironment writes (MASTER_ADDR/PORT)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # its presence is what detection looks for (i.e. under srun)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")  # required when SLURM_NTASKS > 1, checked against devices
    monkeypatch.setenv("SLURM_NNODES", "2")  # checked against num_nodes
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", str(localid))
    monkeypatch.setenv("SLURM_NODEID", str(nodeid))
    monkeypatch.setenv("SLURM_JOB_NAME", "train")  # "bash" or "interactive" would turn detection off
    monkeypatch.setenv("SLURM_NODELIST", "gpu[7-8]")  # its first host becomes MASTER_ADDR
    monkeypatch.setenv("SLURM_JOB_ID", "123456")  # MASTER_PORT = 15000 + its last 4 digits
    # Lightning's launcher sets the thread count when OMP_NUM_THREADS is unset; keep this process's.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    # The strategy sets the process-wide rank for rank_zero_* output; later tests in this process expect 0.
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0), raising=False)


@pytest.mark.parametrize(("procid", "localid", "nodeid"), [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)])
def test_slurm_task_is_recognized(monkeypatch: pytest.MonkeyPatch, procid: int, localid: int, nodeid: int) -> None:
    _slurm_job(monkeypatch, procid, localid, nodeid)
    trainer = L.Trainer(strategy="parti", accelerator="cpu", devices=2, num_nodes=2, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, PartiStrategy)
    environment = strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert environment.creates_processes_externally  # srun started every task: parti must start none
    assert (trainer.global_rank, trainer.world_size, trainer.node_rank, trainer.local_rank) == (procid, 4, nodeid,
                                                                                               localid)
    assert trainer.num_nodes == 2 and trainer.num_devices == 2
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 4, "rank": procid}
    assert (environment.main_address, environment.main_port) == ("gpu7", 15000 + 3456)
    # The launcher checks the task layout against devices/num_nodes, then runs the function right here.
    assert strategy.launcher.launch(lambda: "ran in this process") == "ran in this process"
    assert strategy.launcher.procs == []
    assert not dist.is_initialized()


def test_slurm_layout_mismatch_and_interactive_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    _slurm_job(monkeypatch, 0, 0, 0)
    trainer = L.Trainer(strategy="parti", accelerator="cpu", devices=1, num_nodes=2, logger=False)
    with pytest.raises(ValueError, match="ntasks-per-node=2"):
        trainer.strategy.launcher.launch(lambda: None)
    # An interactive allocation (`srun --job-name=interactive --pty bash`): parti launches the ranks itself.
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    strategy = L.Trainer(strategy="parti", accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(strategy.cluster_environment, LightningEnvironment)
    assert not strategy.cluster_environment.creates_processes_externally


def test_srun_on_path_but_not_used_warns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `python train.py` inside an allocation, without `srun`: Lightning warns (the ranks would hang).
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.warns(PossibleUserWarning, match="`srun` command is available on your system but is not used"):
        strategy = L.Trainer(strategy="parti", accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(strategy.cluster_environment, LightningEnvironment)


# --------------------------------------------------------------------------- listening on loopback only


@pytest.fixture
def interface_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset GLOO/NCCL_SOCKET_IFNAME, and remove whatever the code under test sets, afterwards."""
    for key in (*network.INTERFACE_VARIABLES, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.0.1.1", "::1", "localhost"):
        assert network.is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "192.0.2.7", "10.1.2.3", "no-such-host.invalid"):
        assert not network.is_loopback_host(host), host
    name = network.loopback_interface()
    assert name is not None
    assert any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[name])


def test_backend_interfaces_respect_the_users_choice(monkeypatch: pytest.MonkeyPatch, interface_env: None) -> None:
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    chosen = network.restrict_backends_to_loopback()
    assert chosen == {"GLOO_SOCKET_IFNAME": network.loopback_interface()}
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def test_process_group_on_loopback_listens_on_loopback_only(interface_env: None) -> None:
    before = {(c.laddr.ip, c.laddr.port) for c in _listening(psutil.Process())}
    port = _free_port()
    opened: set[tuple[str, int]] = set()
    meshes = []  # kept alive, as a strategy keeps its mesh: it holds the first group's store server
    try:
        for _ in range(2):  # a second group on the same port after the first was destroyed
            network.init_process_group(
                "gloo", main_address="127.0.0.1", main_port=port, rank=0, world_size=1,
                timeout=timedelta(seconds=30),
            )
            meshes.append(init_device_mesh("cpu", (1,), mesh_dim_names=("data",)))
            dist.all_reduce(torch.ones(1), group=meshes[-1].get_group())
            opened |= {(c.laddr.ip, c.laddr.port) for c in _listening(psutil.Process())} - before
            dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert ("127.0.0.1", port) in opened  # the store, bound to MASTER_ADDR
    assert not [ip for ip, _ in opened if _listens_beyond_loopback(ip)], opened
    assert os.environ["GLOO_SOCKET_IFNAME"] == network.loopback_interface()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", str(port))


def test_multi_node_address_is_left_to_torch(monkeypatch: pytest.MonkeyPatch, interface_env: None) -> None:
    calls = []
    monkeypatch.setattr(network.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    network.init_process_group(
        "gloo", main_address="192.0.2.7", main_port=29500, rank=3, world_size=4, timeout=timedelta(seconds=5)
    )
    # env:// as Lightning does it: torch's store serves every interface, so the other nodes reach it.
    ((args, kwargs),) = calls
    assert args == ("gloo",) and kwargs["store"] is None and (kwargs["rank"], kwargs["world_size"]) == (3, 4)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("192.0.2.7", "29500")
    assert not any(os.environ.get(key) for key in network.INTERFACE_VARIABLES)


def _listening(process: psutil.Process) -> list:
    return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


@pytest.mark.timeout(120)
def test_single_node_run_listens_on_loopback_only() -> None:
    out = check(run_script(["tests/helpers/loopback_run.py"], timeout=100))
    (line,) = [line for line in out.splitlines() if line.startswith("LISTENING ")]
    sockets = json.loads(line.removeprefix("LISTENING "))
    assert len({s["pid"] for s in sockets}) == 2, sockets  # both ranks' gloo listeners were seen
    exposed = [s for s in sockets if _listens_beyond_loopback(s["ip"])]
    assert not exposed, f"sockets of a single-node run listen beyond loopback: {exposed} (all: {sockets})"
