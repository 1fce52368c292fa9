"""One prepared check of every CUDA path of parti: one line per check, ``ok`` or ``FAILED``, then a summary.

    python benchmarks/gpu_check.py          # on a CUDA machine: at most about 6 minutes
    python benchmarks/gpu_check.py --cpu    # the same checks on 2 CPU ranks with small sizes (CI runs this)

The exit code is non-zero when any check failed. Lines that say ``skipped (reason)`` are not failures:
a check that means nothing here (CPU offload on CPU ranks), or a plan not implemented yet.

Every multi-rank part runs as 2 ranks started by this script, each a one-device "node" of a 2-node job
(``NODE_RANK``), so the same code runs the CPU ranks, one rank per GPU (nccl), and a machine with one
GPU: nccl refuses two ranks on one device, so there both ranks share ``cuda:0`` over gloo (said in the
output). Three launches: a sharded checkpoint written on CPU; on the device, parity with one process
for every plan and precision, sync batch norm, resuming the CPU checkpoint and writing one, ``plan="auto"``,
throughput; then the device's checkpoint resumed on CPU. Single-process references run in this process,
on the same device, from the same weights over the same global batches.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "helpers"), str(REPO / "examples")]

PLANS: dict[str, Any] = {
    "ddp": "ddp",
    "zero1": "zero1",
    "zero2": "zero2",
    "zero3": "zero3",
    "zero3+offload": {"preset": "zero3", "offload": "cpu"},
    "tensor": "tp",
    "pipeline": "pp",
}
PRECISIONS = ("32-true", "bf16-mixed")
WORLD = 2
RTOL, ATOL = 1e-5, 1e-5  # fp32 parity, as in tests/test_parity.py
# bf16 autocast rounds each rank's half-batch matmuls differently from the whole batch's: the trained
# weights must match to within this fraction of how far training moved them (a wrong average, e.g. a
# sum, moves them twice as far).
BF16_RELATIVE = 0.05
GPU_BUDGET_S = 360.0  # the whole check on a CUDA machine


@dataclass(frozen=True)
class Setup:
    """Where the ranks run: device type, process-group backend, how many GPUs they use, and why."""

    device: str
    backend: str
    gpus: int
    note: str


# ----------------------------------------------------------------------------------------- rank side


def _trainer(setup: Setup, strategy: Any, steps: int, precision: str = "32-true", **kwargs: Any) -> Any:

    from parti_lightning import PartiAccelerator, PartiStrategy

    accelerator: Any = setup.device
    if isinstance(strategy, PartiStrategy):
        # Both ranks are local rank 0 of their "node": pinning would put them on the same cores.
        accelerator = PartiAccelerator(setup.device, pin_cores=False)
    return L.Trainer(
        accelerator=accelerator, devices=1, num_nodes=WORLD, strategy=strategy, max_steps=steps, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def _parti(setup: Setup, plan: Any, **kwargs: Any) -> Any:
    from parti_lightning import PartiStrategy

    return PartiStrategy(plan=plan, process_group_backend=setup.backend, timeout=120, **kwargs)


def _module(name: str) -> Any:

    from scenarios import SEED, BlockRegressor, ToyRegressor

    L.seed_everything(SEED, verbose=False)
    if name == "blocks":
        return BlockRegressor()
    return ToyRegressor(norm=name == "norm")


class RecordNormLayers(L.Callback):
    """Records, as training starts, the class of every batch-norm layer (after any conversion)."""

    def __init__(self) -> None:
        self.classes: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.classes = [type(m).__name__ for m in pl_module.modules() if "Norm" in type(m).__name__]


def _gathered(trainer: Any) -> dict[str, Any]:
    from checkpoint_run import gathered_state

    state = gathered_state(trainer)
    return {"state_dict": {k: v.detach().cpu() for k, v in state["state_dict"].items()},
            "optimizer_states": _to_cpu(state["optimizer_states"])}


def _to_cpu(tree: Any) -> Any:

    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def task_parity(setup: Setup, plan: str, precision: str, module: str, steps: int, sync_batchnorm: bool = False):
    recorder = RecordNormLayers()
    strategy = _parti(setup, PLANS.get(plan, plan), state_dict_type="full")
    trainer = _trainer(setup, strategy, steps, precision, sync_batchnorm=sync_batchnorm, callbacks=[recorder])
    pl_module = _module(module)
    trainer.fit(pl_module)
    state = trainer.strategy.lightning_module_state_dict()
    return {"state": {k: v.detach().float().cpu() for k, v in state.items()}, "layers": recorder.classes}


def task_save(setup: Setup, plan: str, steps: int, path: str):
    """Trains a few steps under ``plan`` and writes a sharded checkpoint; returns the gathered state saved."""
    trainer = _trainer(setup, _parti(setup, plan), steps)
    trainer.fit(_module("blocks"))
    trainer.save_checkpoint(path)
    return {**_gathered(trainer), "global_step": trainer.global_step, "device": str(trainer.strategy.root_device)}


def task_resume(setup: Setup, plan: str, steps: int, path: str):
    """Resumes ``path`` under ``plan``; returns the state as restored (before any step) and after training on."""

    class Restored(L.Callback):
        state: dict[str, Any] = {}

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.state = {**_gathered(trainer), "global_step": trainer.global_step}

    restored = Restored()
    trainer = _trainer(setup, _parti(setup, plan), steps, callbacks=[restored])
    pl_module = _module("blocks")
    trainer.fit(pl_module, ckpt_path=path)
    device = str(next(pl_module.parameters()).device)
    return {"restored": restored.state, "final_step": trainer.global_step, "device": device}


def task_auto(setup: Setup, steps: int):
    """``plan="auto"``: the planner's choice, the hardware it measured, and its prediction beside the measurement."""
    trainer = _trainer(setup, _parti(setup, "auto"), steps)
    trainer.fit(_module("blocks"))
    strategy = trainer.strategy
    report, meter = strategy.plan_report, strategy._step_meter
    chosen = next((c for c in report.candidates if c.chosen), None) if report is not None else None
    hardware = getattr(report, "hardware", None)
    return {
        "plan": strategy.resolved_plan.describe(),
        "hardware": None if hardware is None else {
            "device_type": hardware.device_type, "name": hardware.device_name, "flops": hardware.flops_per_s,
            "bandwidth": hardware.bandwidth_bytes_per_s,
        },
        "predicted": None if chosen is None else {"seconds": chosen.estimate.seconds,
                                                  "peak_bytes": chosen.estimate.peak_bytes},
        "measured": None if meter is None else meter.measured,
    }


def _matmul_peak(device: str, size: int, dtype: Any) -> float:
    """FLOP/s of one large square matmul on this device: the peak the utilization is measured against."""

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def task_throughput(setup: Setup, variant: str, model: dict[str, int], batch: int, warmup: int, steps: int,
                    precision: str):
    """Samples/s of the example model under one strategy: parti's plans or Lightning's ddp/fsdp."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from char_gpt import CharDataModule, CharGPT

    class Stamps(L.Callback):
        times: list[float] = []

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            if setup.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    if variant.startswith("parti"):
        strategy: Any = _parti(setup, variant.split("-", 1)[1])
    elif variant == "ddp":
        strategy = DDPStrategy(process_group_backend=setup.backend)
    else:
        strategy = FSDPStrategy(process_group_backend=setup.backend)
    stamps = Stamps()
    trainer = _trainer(setup, strategy, warmup + steps, precision, limit_val_batches=0, callbacks=[stamps])
    L.seed_everything(0, verbose=False)
    trainer.fit(CharGPT(**model), datamodule=CharDataModule(block_size=model["block_size"], batch_size=batch))
    seconds = stamps.times[-1] - stamps.times[warmup - 1]
    return {"samples_per_s": WORLD * batch * steps / seconds}


def task_peak(setup: Setup, precision: str):

    dtype = torch.bfloat16 if precision.startswith("bf16") and setup.device == "cuda" else torch.float32
    return {"flops": _matmul_peak(setup.device, 8192 if setup.device == "cuda" else 512, dtype)}


TASKS = {f.__name__.removeprefix("task_"): f for f in
         (task_parity, task_save, task_resume, task_auto, task_throughput, task_peak)}


def worker(job_path: str) -> None:
    """Runs every task of the job in order on this rank; rank 0 writes each result (or its error)."""
    import torch.distributed as dist

    import parti_lightning  # noqa: F401

    job = json.loads(Path(job_path).read_text())
    setup = Setup(**job["setup"])
    if setup.device == "cpu":
        torch.set_num_threads(1)
    out = Path(job["out"])
    rank = int(os.environ["NODE_RANK"])
    for task in job["tasks"]:
        name = task.pop("name")
        try:
            result: Any = {"ok": TASKS[task.pop("kind")](setup, **task)}
        except Exception as err:  # one failing check must not stop the others
            result = {"error": f"{type(err).__name__}: {err}".strip().splitlines()[0][:300],
                      "traceback": traceback.format_exc()}
            print(result["traceback"], file=sys.stderr, flush=True)
        if rank == 0:
            torch.save(result, out / f"{name}.pt")
        if dist.is_initialized():
            dist.barrier()


# ----------------------------------------------------------------------------------------- this process


class Report:
    def __init__(self) -> None:
        self.failed = self.passed = self.skipped = 0

    def line(self, name: str, status: str, detail: str = "") -> None:
        if status == "ok":
            self.passed += 1
        elif status.startswith("skipped"):
            self.skipped += 1
        else:
            self.failed += 1
        print(f"{name:<40} {status}{'  ' + detail if detail else ''}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(setup: Setup, tasks: list[dict[str, Any]], out: Path, timeout: float, name: str) -> str:
    """Starts the 2 ranks on ``tasks``; returns '' or why the job did not finish. Kills everything it started."""
    job = out / f"{name}.json"
    job.write_text(json.dumps({"setup": setup.__dict__, "out": str(out), "tasks": tasks}))
    port = str(_free_port())
    procs = []
    for rank in range(WORLD):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(WORLD), NODE_RANK=str(rank),
                   LOCAL_RANK="0", PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(out / "cache"))
        if setup.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"
        elif setup.gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(rank)
        with open(out / f"{name}.rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(job)], env=env, cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    started = time.monotonic()
    deadline = started + timeout
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"# launch {name}: {len(tasks)} task(s) in {time.monotonic() - started:.0f}s", flush=True)
    if any(p.returncode != 0 for p in procs):
        log = (out / f"{name}.rank0.log").read_text(errors="replace").strip().splitlines()
        why = f"timed out after {timeout:.0f}s" if time.monotonic() >= deadline else "a rank failed"
        return f"{name} launch: {why}; last output: {log[-1][:200] if log else '(none)'}"
    return ""


def _result(out: Path, name: str, launch_error: str) -> tuple[Any, str]:

    path = out / f"{name}.pt"
    if not path.exists():
        return None, launch_error or "no result"
    result = torch.load(path, weights_only=True)
    return result.get("ok"), result.get("error", "")


def reference(setup: Setup, module: str, precision: str, steps: int, data_parallel: int = WORLD) -> dict[str, Any]:
    """The same training in one process on ``setup.device``, over the global batches of ``data_parallel`` ranks
    (tensor- and pipeline-parallel ranks see the same batch)."""
    from torch.utils.data import DataLoader

    from scenarios import BATCH, GlobalBatchSampler, make_dataset

    pl_module = _module(module)  # seeds first: the sampler shuffles as the ranks' samplers do, by that seed
    dataset = make_dataset()
    loader = DataLoader(dataset, batch_sampler=GlobalBatchSampler(dataset, data_parallel, BATCH, epochs=1))
    initial = {k: v.detach().float().clone() for k, v in pl_module.state_dict().items()}
    trainer = L.Trainer(accelerator=setup.device, devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(pl_module, train_dataloaders=loader)
    return {"state": {k: v.detach().float().cpu() for k, v in pl_module.state_dict().items()}, "initial": initial}


def compare(got: dict[str, Any], want: dict[str, Any], precision: str) -> tuple[bool, str]:
    """Whether the trained states match within the precision's tolerance, and how close they are."""
    if got.keys() != want["state"].keys():
        return False, f"state keys differ: {sorted(set(got) ^ set(want['state']))[:4]}"
    floats = [k for k, v in want["state"].items() if v.is_floating_point()]
    if precision == "32-true":
        for key in floats:
            if not torch.allclose(got[key], want["state"][key], rtol=RTOL, atol=ATOL):
                return False, f"{key}: max difference {(got[key] - want['state'][key]).abs().max().item():.2e}"
        return True, f"rtol {RTOL:g}, atol {ATOL:g}"
    diff = torch.cat([(got[k] - want["state"][k]).flatten() for k in floats]).norm()
    moved = torch.cat([(want["state"][k] - want["initial"][k].cpu()).flatten() for k in floats]).norm()
    close = bool(diff <= BF16_RELATIVE * moved)
    return close, f"difference {diff / moved:.2%} of the training update (bound {BF16_RELATIVE:.0%})"


def _states_equal(a: dict[str, Any], b: dict[str, Any]) -> str:

    flat_a, flat_b = _flatten(a), _flatten(b)
    if flat_a.keys() != flat_b.keys():
        return f"entries differ: {sorted(set(flat_a) ^ set(flat_b))[:4]}"
    for key, value in flat_a.items():
        if isinstance(value, torch.Tensor) and not torch.equal(value, flat_b[key]):
            return f"{key} changed"
    return ""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flatten(value, f"{prefix}/{i}").items()}
    return {prefix: tree}


def choose_setup(cpu: bool) -> Setup:

    if cpu:
        return Setup("cpu", "gloo", 0, "2 CPU ranks over gloo")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu for the CPU version of these checks")
    gpus = torch.cuda.device_count()
    if gpus >= WORLD:
        return Setup("cuda", "nccl", WORLD, f"2 ranks on 2 of {gpus} GPUs over nccl")
    return Setup("cuda", "gloo", 1, "1 GPU: nccl refuses two ranks on one device, so 2 ranks share cuda:0 over gloo")


def probe_plans(report: Report) -> list[str]:
    """The plans to check: those not implemented yet say so (NotImplementedError) and are skipped."""
    from parti_lightning import PartitionPlan

    runnable = []
    for name, value in PLANS.items():
        try:
            PartitionPlan.from_value(value).resolve(WORLD, ranks_per_node=1)
        except NotImplementedError as err:
            report.line(f"parity {name}", "skipped (tensor/pipeline parallel not implemented yet)", str(err)[:90])
            continue
        except Exception as err:  # a plan that should work but is refused is a failure
            report.line(f"parity {name}", "FAILED", f"plan refused: {type(err).__name__}: {err}")
            continue
        runnable.append(name)
    return runnable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the checks on CPU ranks (small sizes)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    started = time.monotonic()
    setup = choose_setup(args.cpu)
    gpu = setup.device == "cuda"
    report = Report()
    print(f"# parti gpu_check on {setup.device}: {setup.note}", flush=True)
    steps = 4 if gpu else 3
    with tempfile.TemporaryDirectory(prefix="parti-gpu-check-") as tmp:
        out = Path(tmp)
        (out / "cache").mkdir()  # plan="auto" measures this machine afresh
        plans = probe_plans(report)
        parity, skipped = _parity_tasks(plans, gpu, steps)
        cpu_ckpt, dev_ckpt = str(out / "saved_on_cpu"), str(out / "saved_on_device")
        save_cpu = [{"name": "save_cpu", "kind": "save", "plan": "zero3", "steps": 3, "path": cpu_ckpt}]
        resume_on_cpu = [{"name": "resume_device_ckpt", "kind": "resume", "plan": "zero3", "steps": 4,
                          "path": dev_ckpt}]
        model, batch, warmup, timed = _throughput_sizes(setup)
        precision = "bf16-mixed" if gpu else "32-true"
        variants = ("parti-ddp", "ddp", "parti-zero3", "fsdp")
        device_tasks = [
            *parity,
            {"name": "resume_cpu_ckpt", "kind": "resume", "plan": "ddp", "steps": 4, "path": cpu_ckpt},
            {"name": "save_device", "kind": "save", "plan": "zero2", "steps": 3, "path": dev_ckpt},
            {"name": "auto", "kind": "auto", "steps": 9},
            {"name": "peak", "kind": "peak", "precision": precision},
            *({"name": f"throughput {v}", "kind": "throughput", "variant": v, "model": model, "batch": batch,
               "warmup": warmup, "steps": timed, "precision": precision} for v in variants),
        ]
        if gpu:
            # Three launches: CPU ranks write a checkpoint, the device run resumes it and writes one, CPU
            # ranks resume that. Each launch gets what is left of the time budget, less a reserve.
            cpu = Setup("cpu", "gloo", 0, "")
            errors = [run_job(cpu, save_cpu, out, _left(started, 60), "cpu_save")]
            errors.append(run_job(setup, device_tasks, out, _left(started, 70), "device"))
            errors.append(run_job(cpu, resume_on_cpu, out, _left(started, 25), "cpu_resume"))
        else:
            # On CPU the three are one launch: the checkpoints still cross plans and Trainers.
            errors = [run_job(setup, [*save_cpu, *device_tasks, *resume_on_cpu], out, 240, "cpu")] * 3
        _report_parity(report, setup, out, plans, skipped, steps, errors[1])
        _report_checkpoints(report, setup, out, *errors)
        _report_auto(report, out, errors[1])
        _report_throughput(report, setup, out, variants, model, batch, errors[1])
    elapsed = time.monotonic() - started
    print(f"summary: {report.passed} ok, {report.failed} FAILED, {report.skipped} skipped in {elapsed:.0f}s"
          f" on {setup.device} ({setup.note})", flush=True)
    return 1 if report.failed else 0


def _left(started: float, reserve: float) -> float:
    """Seconds a launch may take so that the whole GPU check ends within its budget."""
    return max(30.0, GPU_BUDGET_S - (time.monotonic() - started) - reserve)


def _parity_tasks(plans: list[str], gpu: bool, steps: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    tasks: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for plan in plans:
        for precision in PRECISIONS:
            name = f"parity {plan} {precision}"
            if plan == "zero3+offload" and not gpu:
                skipped[name] = "skipped (offload='cpu' keeps CPU ranks' storage where it is: nothing to check)"
                continue
            tasks.append({"name": name, "kind": "parity", "plan": plan, "precision": precision,
                          "module": _parity_module(plan), "steps": steps})
    tasks.append({"name": "sync_batchnorm", "kind": "parity", "plan": "ddp", "precision": "32-true",
                  "module": "norm", "steps": steps, "sync_batchnorm": True})
    return tasks, skipped


def _parity_module(plan: str) -> str:
    # Tensor and pipeline plans need repeated blocks to split; the others run the smallest module.
    return "blocks" if plan in ("tensor", "pipeline") else "toy"


def _throughput_sizes(setup: Setup) -> tuple[dict[str, int], int, int, int]:
    """The example model, per-rank batch, warm-up and timed steps for the throughput comparison."""
    if setup.device == "cpu":
        return {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}, 4, 2, 6
    if setup.backend == "nccl":  # a GPU per rank: a GPT-2-small-sized model fills each
        return {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}, 16, 3, 10
    # Two ranks on one GPU over gloo: every gradient byte crosses the host twice, so a smaller model
    # keeps the four runs inside the time budget; the GPU is still busy, the ratios are what count.
    return {"n_layer": 6, "n_head": 8, "n_embd": 512, "block_size": 256}, 32, 3, 10


def _report_parity(report: Report, setup: Setup, out: Path, plans: list[str], skipped: dict[str, str], steps: int,
                   launch_error: str) -> None:
    references: dict[tuple[str, str, int], Any] = {}
    for plan in plans:
        for precision in PRECISIONS:
            name = f"parity {plan} {precision}"
            if name in skipped:
                report.line(name, skipped[name])
                continue
            got, error = _result(out, name, launch_error)
            if got is None:
                report.line(name, "FAILED", error)
                continue
            module = _parity_module(plan)
            data_parallel = 1 if plan in ("tensor", "pipeline") else WORLD
            key = (module, precision, data_parallel)
            if key not in references:
                references[key] = reference(setup, module, precision, steps, data_parallel)
            close, detail = compare(got["state"], references[key], precision)
            report.line(name, "ok" if close else "FAILED", f"{steps} steps against one process: {detail}")
    got, error = _result(out, "sync_batchnorm", launch_error)
    if got is None:
        report.line("sync_batchnorm", "FAILED", error)
        return
    layers = ",".join(sorted(set(got["layers"])))
    # torch's SyncBatchNorm needs nccl; over gloo parti computes the same statistics itself.
    want = "SyncBatchNorm" if setup.backend == "nccl" else "DistributedBatchNorm"
    close, detail = compare(got["state"], reference(setup, "norm", "32-true", steps), "32-true")
    if want not in got["layers"]:
        close, detail = False, f"layers were {layers}, expected {want}"
    detail = f"{layers} over {setup.backend}, against one process: {detail}"
    report.line("sync_batchnorm", "ok" if close else "FAILED", detail)


def _report_checkpoints(report: Report, setup: Setup, out: Path, save_error: str, device_error: str,
                        back_error: str) -> None:
    """Each checkpoint restored every tensor exactly in another launch (or Trainer) under another plan."""
    for name, saved, resumed, errors in (
        (f"checkpoint cpu zero3 -> {setup.device} ddp", "save_cpu", "resume_cpu_ckpt", save_error or device_error),
        (f"checkpoint {setup.device} zero2 -> cpu zero3", "save_device", "resume_device_ckpt",
         device_error or back_error),
    ):
        want, error_a = _result(out, saved, errors)
        got, error_b = _result(out, resumed, errors)
        if want is None or got is None:
            report.line(name, "FAILED", error_a or error_b)
            continue
        problem = _states_equal(want["state_dict"], got["restored"]["state_dict"])
        problem = problem or _states_equal(want["optimizer_states"], got["restored"]["optimizer_states"])
        if not problem and got["restored"]["global_step"] != want["global_step"]:
            problem = f"resumed at step {got['restored']['global_step']}, saved at {want['global_step']}"
        if not problem and got["final_step"] <= want["global_step"]:
            problem = "training did not continue after the resume"
        detail = (f"sharded, saved on {want['device']}, resumed on {got['device']}: every tensor restored exactly,"
                  " training continued")
        report.line(name, "FAILED" if problem else "ok", problem or detail)


def _report_auto(report: Report, out: Path, launch_error: str) -> None:
    got, error = _result(out, "auto", launch_error)
    if got is None:
        report.line("plan=auto", "FAILED", error)
        return
    hardware, predicted, measured = got["hardware"], got["predicted"], got["measured"]
    if hardware is None or predicted is None or measured is None:
        report.line("plan=auto", "FAILED", f"missing: hardware={hardware} predicted={predicted} measured={measured}")
        return
    detail = (f"chose {got['plan']}; hardware {hardware['device_type']} {hardware['name']}"
              f" {hardware['flops'] / 1e12:.2f} TFLOP/s; step {measured['step_seconds']:.3f}s measured vs"
              f" {predicted['seconds']:.3f}s predicted ({measured['step_seconds'] / predicted['seconds']:.2f}x),"
              f" peak {measured['peak_bytes'] / 2**30:.2f} GiB vs {predicted['peak_bytes'] / 2**30:.2f} GiB")
    report.line("plan=auto", "ok", detail)


def _report_throughput(report: Report, setup: Setup, out: Path, variants: tuple[str, ...], model: dict[str, int],
                       batch: int, launch_error: str) -> None:
    peak, _ = _result(out, "peak", launch_error)
    rates = {v: _result(out, f"throughput {v}", launch_error) for v in variants}
    tokens = WORLD * batch * model["block_size"]
    n_params = _gpt_params(model)
    # Model FLOPs per step: 6 per parameter per token plus attention (nanoGPT's and PaLM's estimate).
    flops = tokens * (6 * n_params + 12 * model["n_layer"] * model["n_embd"] * model["block_size"])
    devices = max(setup.gpus, 1) if setup.device == "cuda" else WORLD
    for parti, baseline in (("parti-ddp", "ddp"), ("parti-zero3", "fsdp")):
        name = f"throughput {parti} vs Lightning {baseline}"
        (ours, error), (theirs, their_error) = rates[parti], rates[baseline]
        if ours is None:
            report.line(name, "FAILED", error)
            continue
        mfu = ""
        if peak is not None:
            step_flops_per_s = flops / (WORLD * batch / ours["samples_per_s"])
            mfu = f", MFU {step_flops_per_s / (peak['flops'] * devices):.1%} of measured matmul peak"
        figure = f"{ours['samples_per_s']:.1f} samples/s{mfu}"
        if theirs is None:
            report.line(name, f"skipped (Lightning {baseline} did not run here: {their_error[:120]})", figure)
            continue
        ratio = ours["samples_per_s"] / theirs["samples_per_s"]
        shared = "; 2 ranks share one GPU" if setup.gpus == 1 else ""
        report.line(name, "ok", f"ratio {ratio:.3f} ({figure} vs {theirs['samples_per_s']:.1f}){shared}")


def _gpt_params(model: dict[str, int]) -> int:
    from char_gpt import CharGPT

    with torch.device("meta"):
        return sum(p.numel() for p in CharGPT(**model).parameters())


if __name__ == "__main__":
    sys.exit(main())
