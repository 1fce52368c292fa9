"""Compatibility matrix: every model of the zoo (``tests/helpers/zoo.py``) under every plan, against one process.

For each model and plan the model is built from the same seed on every rank, copied as a single-process
reference, and the plan is applied with parti's public API, without the Lightning Trainer:
``parallelize(module, ParallelMesh(plan, "cpu"), run_example=..., batch_size=...)``, the example run on the
rank's first batch under ``torch.no_grad()`` as the strategy runs it. Then two AdamW steps (lr 1e-3) run on
global batches of 8 (each data-parallel rank its share; tensor and pipeline ranks the whole batch), backward
passes and optimizer steps inside ``Parallelized.step_context()``, ``sync_gradients()`` after each backward,
and a third batch is evaluated under ``torch.no_grad()``. The reference does the same in one process on the
whole batches. Measured per cell:

- parity: relative error of the first loss (``L``), of the first step's gradients (``G``: ``‖g − g₁‖ / ‖g₁‖``
  over the parameters a rank holds, split gradients gathered whole, the worst rank), and of the loss after
  the two optimizer steps (``L2``); data-parallel losses are averaged over the data-parallel ranks first.
- state: bytes of parameters + gradients + AdamW state one rank holds (``rank_state_bytes``; a ``DTensor``
  counts its local shard), after the second optimizer step, as a ratio to the single process (the worst
  rank), and the same for the parameters of the repeated blocks alone (``blk``).
- status: ``split`` (the plan applied; the ratio says how much it saved), ``fell back`` (tensor parallelism
  left units unsplit: the report's ``fallbacks``; with some layers split too it says ``partly``),
  ``refused`` (``parallelize`` raised ``ValueError``/``NotImplementedError``: a clear refusal), ``crashed``
  (any other exception, or any exception after setup: the first line and where in ``parti_lightning``), or
  ``hung`` (a cell past ``--cell-timeout``: its stacks are kept). A split cell whose parity is off gets
  ``MISMATCH``.

Dropout: by default every dropout probability of the config is set to 0 (``ZooEntry.build(dropout=False)``),
since masks differ by design from one process's: a data-parallel share or a pipeline micro-batch draws its own
masks, and so does a tensor-parallel split activation. ``--dropout shipped`` keeps the library's values: the
statuses and state ratios still hold, parity then only where dropout touches replicated activations alone.

BatchNorm: under data parallel (``ddp``, ``zero3``) the model's batch norms are converted as
``Trainer(sync_batchnorm=True)`` converts them under parti (``parti_lightning.parallel.batchnorm.convert_batchnorm``
over the data-parallel group), so that statistics are the whole batch's as in the single process;
``--no-sync-batchnorm`` leaves them per rank (a ResNet then differs from one process by design).

Plans (one launch of gloo processes per plan, every model in turn; a hung or dead launch is restarted for the
models left): ``ddp`` (data=2), ``zero3`` (ZeRO-3, shard=2), ``tp`` (tensor=2), ``pp`` (pipeline=2, the ``pp``
preset: 4 micro-batches, GPipe), ``tp_pp`` (tensor=2 × pipeline=2, 4 ranks).

    python benchmarks/model_zoo.py                                 # the whole matrix (1-2 minutes on 2 CPU cores)
    python benchmarks/model_zoo.py --models llama,gpt2 --plans tp,pp --json zoo.json
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HELPERS = REPO / "tests" / "helpers"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))

# key: (column title, ranks, plan value as PartitionPlan.from_value takes it)
PLANS: dict[str, tuple[str, int, Any]] = {
    "ddp": ("ddp (data=2)", 2, "ddp"),
    "zero3": ("zero3 (shard=2)", 2, "zero3"),
    "tp": ("tensor=2", 2, "tp"),
    "pp": ("pipeline=2", 2, "pp"),
    "tp_pp": ("tensor=2 × pipeline=2", 4, {"preset": "pp", "tensor": 2}),
}
SEED = 0
GLOBAL_BATCH = 8
LR = 1e-3
# Parity thresholds: beyond them a split cell is marked MISMATCH.
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
# Exceptions from `parallelize` that are refusals (PlanError is a ValueError).
_REFUSALS = ("ValueError", "NotImplementedError", "PlanError")


# ------------------------------------------------------------------------------------------ rank side


def run_plan(
    plan_key: str, names: list[str], out_dir: str, dropout: bool, cell_timeout: float, sync_batchnorm: bool = True
) -> None:
    """On every rank: each model of ``names`` under ``plan_key`` in turn; results go to ``out_dir`` as files.

    Each cell writes ``<model>.rank<r>.json`` as soon as it ends, before any collective, so a later hang
    loses nothing. A cell past ``cell_timeout`` dumps its stacks to ``<model>.rank<r>.hang`` and ends the
    process (the driver restarts the plan for the models left).
    """
    import torch
    import torch.distributed as dist
    import transformers

    transformers.logging.set_verbosity_error()
    rank = dist.get_rank()
    out = Path(out_dir)
    for name in names:
        hang_path = out / f"{name}.rank{rank}.hang"
        with open(hang_path, "w") as hang:
            faulthandler.dump_traceback_later(cell_timeout, exit=True, file=hang)
            start = time.perf_counter()
            try:
                result = _cell(plan_key, name, dropout, sync_batchnorm)
            except BaseException as err:  # noqa: B036 - one cell never stops the matrix
                result = {"error": _error_record(err, getattr(err, "_zoo_phase", "?"))}
            finally:
                faulthandler.cancel_dump_traceback_later()
        hang_path.unlink()
        result["seconds"] = time.perf_counter() - start
        partial = out / f"{name}.rank{rank}.json.partial"
        partial.write_text(json.dumps(result))
        partial.rename(out / f"{name}.rank{rank}.json")
        torch.manual_seed(SEED)
        try:
            dist.barrier()
        except Exception:
            os._exit(3)  # the ranks are out of step: the driver restarts the plan for the models left


def _cell(plan_key: str, name: str, dropout: bool, sync_batchnorm: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from zoo import ZOO

    from parti_lightning.mesh import ParallelMesh
    from parti_lightning.parallel import parallelize
    from parti_lightning.parallel.batchnorm import convert_batchnorm
    from parti_lightning.parallel.blocks import find_blocks
    from parti_lightning.parallel.state_bytes import rank_state_bytes
    from parti_lightning.plan import PartitionPlan

    phase = "build"
    try:
        entry = ZOO[name]
        torch.manual_seed(SEED)
        model = entry.build(dropout=dropout)
        initial = copy.deepcopy(model)
        reference = copy.deepcopy(model)
        batches = [entry.batch(seed=100 + i, batch_size=GLOBAL_BATCH) for i in range(3)]
        block_names = [n for n, _ in find_blocks(model)]

        phase = "reference"
        ref = _train(reference, batches, None, None)
        ref_grads = ref.pop("grads")
        ref_state = rank_state_bytes(reference, ref.pop("optimizer"))
        ref_blocks = _block_param_bytes(reference, block_names)

        phase = "mesh"
        plan = PartitionPlan.from_value(PLANS[plan_key][2]).resolve(dist.get_world_size())
        mesh = ParallelMesh(plan, "cpu")
        dp, dp_rank = mesh.data_parallel_size, mesh.data_parallel_rank
        own = [_share(batch, dp_rank, dp) for batch in batches]
        batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if batchnorm and dp > 1 and sync_batchnorm:
            # What Trainer(sync_batchnorm=True) does under parti: statistics over the data-parallel ranks.
            model = convert_batchnorm(model, mesh.data_parallel_group)

        phase = "parallelize"

        def run_example() -> Any:
            with torch.no_grad(), torch.random.fork_rng():
                return model(own[0])

        started = time.perf_counter()
        parallel = parallelize(model, mesh, run_example=run_example, batch_size=GLOBAL_BATCH // dp)
        setup_seconds = time.perf_counter() - started
        result: dict[str, Any] = {"setup_seconds": setup_seconds, "describe": parallel.describe(),
                                  "batchnorm_per_rank": batchnorm and dp > 1 and not sync_batchnorm}
        report = parallel.tensor_report
        if report is not None:
            result["tensor"] = {
                "source": report.source,
                "split_layers": sum(row.layout != "replicate" for row in report.rows),
                "unsplit": [f"{row.name}: {row.note}" for row in report.rows if row.layout == "replicate"],
                "fallbacks": [list(f) for f in report.fallbacks],
            }
        if parallel.pipeline is not None:
            result["stages"] = parallel.pipeline.stages
        result["dtensor_parameters"] = sum(isinstance(p, DTensor) for p in model.parameters())
        result["parameters"] = sum(1 for _ in model.parameters())

        phase = "train"
        got = _train(model, own, parallel, mesh)
        held = {n for n, _ in model.named_parameters()}
        result["grad_error"], result["grads_missing"] = _grad_error(got.pop("grads"), ref_grads, held)
        state = rank_state_bytes(model, got.pop("optimizer"))
        blocks = _block_param_bytes(model, block_names)
        phase = "compare"
        result.update(
            loss=got["loss0"], loss_ref=ref["loss0"], loss_error=_rel(got["loss0"], ref["loss0"]),
            loss2=got["loss2"], loss2_ref=ref["loss2"], loss2_error=_rel(got["loss2"], ref["loss2"]),
            update_error=_update_error(model, reference, initial),
            state=state, state_ref=ref_state, state_ratio=state["total"] / ref_state["total"],
            block_bytes=blocks, block_bytes_ref=ref_blocks,
            block_ratio=blocks / ref_blocks if ref_blocks else None,
        )
        parallel.remove()
        return result
    except BaseException as err:
        err._zoo_phase = phase  # type: ignore[attr-defined]
        raise


def _share(batch: dict[str, Any], index: int, parts: int) -> dict[str, Any]:
    size = GLOBAL_BATCH // parts
    return {k: v[index * size : (index + 1) * size] for k, v in batch.items()}


def _train(model: Any, batches: list[dict[str, Any]], parallel: Any, mesh: Any) -> dict[str, Any]:
    """Two AdamW steps on ``batches[0:2]``, then the loss of ``batches[2]`` without gradients."""
    import contextlib

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    def context() -> Any:
        return parallel.step_context() if parallel is not None else contextlib.nullcontext()

    def averaged(loss: Any) -> float:
        value = loss.detach().clone()
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if mesh is not None and mesh.data_parallel_size > 1:
            dist.all_reduce(value, group=mesh.data_parallel_group)
            value /= mesh.data_parallel_size
        return value.item()

    torch.manual_seed(SEED + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    out: dict[str, Any] = {}
    for step in range(2):
        loss = model(batches[step])
        with context():
            loss.backward()
        if parallel is not None:
            parallel.sync_gradients()
        if step == 0:
            out["loss0"] = averaged(loss)
            out["grads"] = _whole_grads(model)
        with context():
            optimizer.step()
        if step == 0:
            optimizer.zero_grad()
    with torch.no_grad():
        out["loss2"] = averaged(model(batches[2]))
    out["optimizer"] = optimizer
    return out


def _whole(tensor: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _whole_grads(model: Any) -> dict[str, Any]:
    """Every gradient this rank holds, whole (a split gradient gathered over its mesh), by parameter name."""
    return {n: _whole(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(got: dict[str, Any], want: dict[str, Any], held: set[str]) -> tuple[float | None, list[str]]:
    """Relative error of the gradients this rank holds, and the held parameters that got no gradient here only."""
    num = den = 0.0
    for name, grad in got.items():
        if name in want:
            num += (grad - want[name]).pow(2).sum().item()
            den += want[name].pow(2).sum().item()
    missing = sorted(n for n in want if n in held and n not in got)
    return (math.sqrt(num / den) if den else None), missing


def _update_error(model: Any, reference: Any, initial: Any) -> float | None:
    """‖p − p₁‖ / ‖p₁ − p₀‖ after the two steps, over the parameters this rank holds (split ones whole)."""
    ref = dict(reference.named_parameters())
    init = dict(initial.named_parameters())
    num = den = 0.0
    for name, param in model.named_parameters():
        if name not in ref:
            continue
        whole = _whole(param.detach())
        num += (whole - ref[name].detach()).pow(2).sum().item()
        den += (ref[name].detach() - init[name].detach()).pow(2).sum().item()
    return math.sqrt(num / den) if den else None


def _block_param_bytes(model: Any, block_names: list[str]) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for name, param in model.named_parameters():
        if any(name.startswith(f"{b}.") for b in block_names):
            local = param.to_local() if isinstance(param, DTensor) else param
            total += local.numel() * local.element_size()
    return total


def _rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


def _error_record(err: BaseException, phase: str) -> dict[str, Any]:
    frames = traceback.extract_tb(err.__traceback__)
    parti = [f for f in frames if f"{os.sep}parti_lightning{os.sep}" in f.filename]
    first_line = (str(err).strip().splitlines() or [""])[0]
    return {
        "type": type(err).__name__,
        "line": f"{type(err).__name__}: {first_line}",
        "message": str(err),
        "phase": phase,
        "parti_frame": _frame(parti[-1]) if parti else None,
        "innermost_frame": _frame(frames[-1]) if frames else None,
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
    }


def _frame(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    for root in ("parti_lightning", "site-packages"):
        marker = f"{os.sep}{root}{os.sep}"
        if marker in path:
            path = (root + os.sep if root == "parti_lightning" else "") + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.lineno} in {frame.name}"


# ------------------------------------------------------------------------------------------ driver side


def run_matrix(
    models: list[str], plans: list[str], dropout: bool, cell_timeout: float, work: Path, sync_batchnorm: bool = True
) -> dict:
    """Every plan's launch(es); returns ``{plan: {model: cell}}``."""
    import model_zoo  # this file by module name: the ranks unpickle `run_plan` from it

    from dist_utils import DistributedTestError, run_distributed

    matrix: dict[str, dict[str, Any]] = {}
    for plan_key in plans:
        _, world, _ = PLANS[plan_key]
        out = work / plan_key
        out.mkdir(parents=True, exist_ok=True)
        left = list(models)
        started = time.perf_counter()
        launches = 0
        while left:
            launches += 1
            print(f"[{plan_key}] launch {launches}: {len(left)} model(s) on {world} ranks", file=sys.stderr, flush=True)
            launch_error = None
            try:
                run_distributed(model_zoo.run_plan, world, plan_key, left, str(out), dropout, cell_timeout,
                                sync_batchnorm, timeout=90 + cell_timeout * (len(left) + 1))
            except DistributedTestError as err:
                launch_error = str(err)
            done = [m for m in left if all((out / f"{m}.rank{r}.json").exists() for r in range(world))]
            for m in done:
                print(f"[{plan_key}] {m}: {_summary(_merge(out, m, world, None))}", file=sys.stderr, flush=True)
            remaining = [m for m in left if m not in done]
            if launch_error is None or not remaining:
                if remaining:  # should not happen: a clean launch finished every model
                    launch_error = "the launch ended without results"
                else:
                    break
            # The first model without results from every rank is the one the launch died or hung in.
            culprit = remaining[0]
            (out / f"{culprit}.launch_error.txt").write_text(launch_error)
            print(f"[{plan_key}] {culprit}: launch failed", file=sys.stderr, flush=True)
            left = remaining[1:]
        matrix[plan_key] = {m: _merge(out, m, world, (out / f"{m}.launch_error.txt")) for m in models}
        print(f"[{plan_key}] {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return matrix


def _merge(out: Path, model: str, world: int, launch_error_path: Path | None) -> dict[str, Any]:
    """One cell from the ranks' files: the status, the worst rank's figures, every rank's own."""
    ranks: list[dict[str, Any] | None] = []
    hangs: list[str] = []
    for r in range(world):
        path = out / f"{model}.rank{r}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else None)
        hang = out / f"{model}.rank{r}.hang"
        if hang.exists() and hang.read_text().strip():
            hangs.append(f"rank {r}:\n{hang.read_text()}")
    cell: dict[str, Any] = {"ranks": ranks}
    errors = [(r, res["error"]) for r, res in enumerate(ranks) if res is not None and "error" in res]
    if errors:
        rank, error = errors[0]
        cell["error"] = {**error, "rank": rank, "ranks_failed": [r for r, _ in errors]}
        refused = error["phase"] == "parallelize" and error["type"] in _REFUSALS
        cell["status"] = "refused" if refused else "crashed"
        cell["reason"] = error["line"]
        return cell
    if any(res is None for res in ranks):
        cell["status"] = "hung" if hangs else "crashed"
        launch_error = launch_error_path.read_text() if launch_error_path and launch_error_path.exists() else ""
        cell["reason"] = _hang_reason(hangs) if hangs else _launch_reason(launch_error)
        cell["stacks"] = hangs
        cell["launch_error"] = launch_error[-20000:]
        return cell
    results = [res for res in ranks if res is not None]
    first = results[0]

    def worst(key: str) -> float | None:
        values = [res[key] for res in results if res.get(key) is not None]
        return max(values) if values else None

    cell.update(
        loss_error=first["loss_error"], loss2_error=first["loss2_error"], grad_error=worst("grad_error"),
        update_error=worst("update_error"), state_ratio=worst("state_ratio"), block_ratio=worst("block_ratio"),
        describe=first["describe"], setup_seconds=worst("setup_seconds"), seconds=worst("seconds"),
    )
    tensor = first.get("tensor")
    fallbacks = sorted({tuple(f) for res in results for f in (res.get("tensor") or {}).get("fallbacks", [])})
    if tensor is not None:
        cell["tensor"] = {**tensor, "fallbacks": [list(f) for f in fallbacks]}
    if "stages" in first:
        cell["stages"] = first["stages"]
    if fallbacks:
        partly = tensor is not None and tensor["split_layers"] > 0
        cell["status"] = "partly fell back" if partly else "fell back"
        cell["reason"] = "; ".join(f"{unit}: {reason}" for unit, reason in fallbacks)
    elif tensor is not None and tensor["split_layers"] == 0:
        cell["status"] = "fell back"
        cell["reason"] = "no layer split, no fall-back reported: " + "; ".join(tensor.get("unsplit", []))
    else:
        cell["status"] = "split"
    loss_bad = max(cell["loss_error"], cell["loss2_error"]) > LOSS_TOLERANCE
    grad_bad = cell["grad_error"] is not None and cell["grad_error"] > GRAD_TOLERANCE
    missing = sorted({n for res in results for n in res.get("grads_missing", [])})
    if missing:
        cell["grads_missing"] = missing
    cell["parity_ok"] = not (loss_bad or grad_bad or missing)
    if not cell["parity_ok"] and first.get("batchnorm_per_rank"):
        cell["parity_note"] = "expected: BatchNorm statistics of each rank's share (--no-sync-batchnorm)"
    return cell


def _hang_reason(hangs: list[str]) -> str:
    for text in hangs:
        for line in text.splitlines():  # faulthandler: most recent call first
            if f"{os.sep}parti_lightning{os.sep}" in line:
                return f"past the cell timeout in {line.strip()}"
    return "past the cell timeout (no parti_lightning frame on the stack)"


def _launch_reason(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors[-1] if errors else (lines[0] if lines else "the launch failed")).strip()[:300]


def _summary(cell: dict[str, Any]) -> str:
    status = cell["status"]
    if status in ("split", "partly fell back", "fell back") and "state_ratio" in cell:
        text = (f"{status} {cell['state_ratio']:.2f}×"
                + (f" (blk {cell['block_ratio']:.2f}×)" if cell.get("block_ratio") is not None else "")
                + f" L {cell['loss_error']:.0e} G {_num(cell['grad_error'])} L2 {cell['loss2_error']:.0e}")
        if not cell.get("parity_ok", True):
            text += " MISMATCH" + (" (per-rank BatchNorm)" if cell.get("parity_note") else "")
            if cell.get("grads_missing"):
                text += f" ({len(cell['grads_missing'])} gradients missing)"
        if status != "split":
            text += f" — {cell['reason']}"
        return text
    return f"{status}: {cell.get('reason', '')}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.0e}"


def _note(notes: list[str], text: str) -> int:
    """The footnote number of ``text``, added if new."""
    if text not in notes:
        notes.append(text)
    return notes.index(text) + 1


def _grouped_reasons(cell: dict[str, Any]) -> str:
    """A fall-back reason list with the layers that share a reason grouped (the layer's name dropped from it)."""
    fallbacks = (cell.get("tensor") or {}).get("fallbacks") or []
    if not fallbacks:
        return cell.get("reason", "")
    groups: dict[str, list[str]] = {}
    for unit, reason in fallbacks:
        layer = unit.split(" (", 1)[1].rstrip(")") if " (" in unit else unit
        text = reason[len(layer) + 2:] if reason.startswith(f"{layer}: ") else reason
        groups.setdefault(text, []).append(unit)
    parts = []
    for text, units in groups.items():
        shown = ", ".join(units[:2]) + (f", … ({len(units)} in all)" if len(units) > 2 else "")
        parts.append(f"{shown}: {text}")
    return "; ".join(parts)


def _cell_text(cell: dict[str, Any], notes: list[str]) -> str:
    status = cell["status"]
    if status == "split":
        return _summary(cell)
    if "state_ratio" in cell:  # fell back, partly: the figures and a note
        base = _summary(cell).split(" — ")[0]
        return f"{base} [{_note(notes, _grouped_reasons(cell))}]"
    return f"{status} [{_note(notes, cell.get('reason', ''))}]"


def git_state() -> str:
    """The commit and whether ``parti_lightning`` has uncommitted changes (the matrix is of the working tree)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    dirty = git("status", "--porcelain", "--", "parti_lightning")
    return f"{git('rev-parse', '--short', 'HEAD')}{' + uncommitted parti_lightning changes' if dirty else ''}"


def markdown(
    matrix: dict[str, dict[str, Any]], models: list[str], seconds: float, dropout: bool, sync_batchnorm: bool = True
) -> str:
    from zoo import ZOO

    plans = list(matrix)
    notes: list[str] = []
    head = ["model", "category", "features", *(PLANS[p][0] for p in plans)]
    lines = [
        f"Model zoo × plans (parti_lightning, CPU gloo; global batch {GLOBAL_BATCH}, dropout "
        f"{'as shipped' if dropout else 'zeroed'}; BatchNorm {'synced' if sync_batchnorm else 'per rank'} under data"
        f" parallel; {seconds:.0f} s; parti_lightning at {git_state()}).",
        "Cell: status, state per rank / one process (worst rank; blk: the repeated blocks' parameters alone),"
        " relative error against one process of the first loss (L), first gradients (G), loss after 2 AdamW"
        " steps (L2); [n]: the fall-back or error below.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for m in models:
        entry = ZOO[m]
        cells = [_cell_text(matrix[p][m], notes) for p in plans]
        lines.append("| " + " | ".join([m, entry.category, entry.features, *cells]) + " |")
    if notes:
        lines.append("")
        lines.extend(f"[{i}] {note}" for i, note in enumerate(notes, start=1))
    details = []
    for p in plans:
        for m in models:
            cell = matrix[p][m]
            if cell["status"] in ("crashed", "refused", "hung"):
                error = cell.get("error") or {}
                where = error.get("parti_frame") or ""
                inner = error.get("innermost_frame") or ""
                details.append(f"- {m} × {p}: {cell['status']} in {error.get('phase', '?')}"
                               f" (ranks failed: {error.get('ranks_failed', '?')}): {cell.get('reason', '')}"
                               f"\n    parti: {where}; innermost: {inner}")
    if details:
        lines += ["", "Failures:", *details]
    return "\n".join(lines)


def main() -> None:
    from zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of: {','.join(ZOO)}")
    parser.add_argument("--plans", help=f"comma-separated subset of: {','.join(PLANS)}")
    parser.add_argument("--json", help="write the whole matrix (every rank's figures, tracebacks) here")
    parser.add_argument("--dropout", choices=("off", "shipped"), default="off")
    parser.add_argument("--cell-timeout", type=float, default=300.0, help="seconds one cell may take")
    parser.add_argument("--no-sync-batchnorm", action="store_true",
                        help="leave BatchNorm per rank under data parallel (default: as Trainer(sync_batchnorm=True))")
    parser.add_argument("--work", help="keep the ranks' per-cell files here (default: a temporary directory)")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else list(ZOO)
    plans = args.plans.split(",") if args.plans else list(PLANS)
    unknown = [m for m in models if m not in ZOO] + [p for p in plans if p not in PLANS]
    if unknown:
        parser.error(f"unknown model(s) or plan(s): {', '.join(unknown)}")
    dropout = args.dropout == "shipped"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="model-zoo-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        matrix = run_matrix(models, plans, dropout, args.cell_timeout, work, not args.no_sync_batchnorm)
    seconds = time.perf_counter() - started
    print(markdown(matrix, models, seconds, dropout, not args.no_sync_batchnorm))
    if args.json:
        record = {"seconds": seconds, "dropout": args.dropout, "sync_batchnorm": not args.no_sync_batchnorm,
                  "git": git_state(), "models": models, "plans": plans, "matrix": matrix}
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
