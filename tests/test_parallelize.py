"""Tier 2: what the Trainer used to be the only way to reach, called directly on 2 gloo ranks.

- ``parallelize`` on a :class:`ParallelMesh`: replicated gradient averaging and ZeRO-3 give one
  process's gradients and weights;
- the CPU sync batch norm (:func:`convert_batchnorm`) gives the statistics, outputs and gradients of
  one batch norm over the whole batch;
- sharded save and load on a mesh, across plans (ZeRO-3 -> replicated -> ZeRO-3), and with each rank
  holding only part of the module's parameter names (as a pipeline stage will).

One group of ranks runs every check (starting processes is the slow part); the tests read its results.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from parti_lightning.checkpoint import load_sharded, save_sharded, sharded_model_state, sharded_optimizer_state
from parti_lightning.mesh import ParallelMesh
from parti_lightning.parallel import holds_sharded_tensors, parallelize
from parti_lightning.parallel.batchnorm import convert_batchnorm
from parti_lightning.parallel.full_state import full_optimizer_state_dict, full_state_dict
from parti_lightning.plan import PartitionPlan

from dist_utils import run_distributed

WORLD, DIM, BATCH = 2, 8, 8
RTOL, ATOL = 1e-5, 1e-6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, DIM, generator=generator), torch.randn(BATCH, 1, generator=generator)


def _local(tensor: Tensor) -> Tensor:
    return tensor.chunk(WORLD)[dist.get_rank()]


def _whole(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in full_state_dict(model, rank0_only=False).items()}


def _train(model: nn.Module, steps: int, x: Tensor, y: Tensor, parallel: Any = None) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        F.mse_loss(model(x), y).backward()
        if parallel is not None:
            parallel.sync_gradients()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


# ------------------------------------------------------------------------------------------ checks


def _parallelize_checks(tmp: str) -> dict[str, Any]:
    x, y = _data()
    out: dict[str, Any] = {}
    for name in ("ddp", "zero3"):
        plan = PartitionPlan.from_value(name).resolve(WORLD)
        model = _net()
        parallel = parallelize(model, ParallelMesh(plan, "cpu"))
        optimizer = _train(model, 3, _local(x), _local(y), parallel)
        out[name] = {"sharded": holds_sharded_tensors(model), "state": _whole(model)}
        out[f"{name}-optim"] = full_optimizer_state_dict(model, optimizer, rank0_only=False)
        parallel.remove()
    out["roundtrip"] = _sharded_roundtrip(Path(tmp))
    out["partial"] = _partial_names(Path(tmp))
    out["batchnorm"] = _batchnorm()
    return out


def _sharded_roundtrip(tmp: Path) -> dict[str, Any]:
    """Save under ZeRO-3, load under replicated, save again, load under ZeRO-3: every tensor equal."""
    x, y = _data()
    zero3 = PartitionPlan(storage="parameters").resolve(WORLD)
    ddp = PartitionPlan().resolve(WORLD)
    model = _net()
    parallelize(model, ParallelMesh(zero3, "cpu"))
    optimizer = _train(model, 2, _local(x), _local(y))
    want = (_whole(model), full_optimizer_state_dict(model, optimizer, rank0_only=False))
    save_sharded(tmp / "a", _checkpoint(model, optimizer), {})
    results = []
    for plan, source, target in ((ddp, "a", "b"), (zero3, "b", None)):
        fresh = _net()
        fresh.stem.weight.data.add_(1.0)  # so that a load that did nothing shows
        parallel = parallelize(fresh, ParallelMesh(plan, "cpu"))
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        load_sharded(tmp / source, fresh, [fresh_optimizer])
        results.append((_whole(fresh), full_optimizer_state_dict(fresh, fresh_optimizer, rank0_only=False)))
        if target is not None:
            save_sharded(tmp / target, _checkpoint(fresh, fresh_optimizer), {})
        parallel.remove()
    return {"want": want, "got": results}


def _checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"state_dict": sharded_model_state(model), "optimizer_states": [sharded_optimizer_state(model, optimizer)]}


def _stage(model: Net, rank: int) -> Net:
    # As a pipeline stage will hold it: the other rank's block is gone, the names of the rest unchanged.
    model.blocks[1 - rank] = nn.Identity()
    return model


def _partial_names(tmp: Path) -> dict[str, Any]:
    """Each rank holds its own block only: saves what it holds, loads into whole and partial modules."""
    rank = dist.get_rank()
    model = _stage(_net(), rank)
    for param in model.parameters():
        param.data.add_(0.5)  # so that a load that did nothing shows
    optimizer = torch.optim.AdamW(model.blocks[rank].parameters(), lr=1e-2)
    for param in model.blocks[rank].parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state = {name: {k: v.clone() for k, v in s.items()} for name, s in sharded_optimizer_state(model, optimizer)
             ["state"].items()}
    save_sharded(tmp / "partial", _checkpoint(model, optimizer), {})
    whole = _net()
    whole_optimizer = torch.optim.AdamW(whole.blocks.parameters(), lr=1e-2)
    load_sharded(tmp / "partial", whole, [whole_optimizer], strict=False)
    stage = _stage(_net(), rank)
    stage_optimizer = torch.optim.AdamW(stage.blocks[rank].parameters(), lr=1e-2)
    load_sharded(tmp / "partial", stage, [stage_optimizer])
    return {
        "saved": saved,
        "saved_state": state,
        "whole": whole.state_dict(),
        "whole_state": sharded_optimizer_state(whole, whole_optimizer)["state"],
        "stage": stage.state_dict(),
        "stage_state": sharded_optimizer_state(stage, stage_optimizer)["state"],
    }


def _batchnorm() -> dict[str, Any]:
    torch.manual_seed(3)
    x = torch.randn(BATCH, 4, 5) * 3 + 1
    out = {}
    for name, group in (("reference", None), ("synced", dist.group.WORLD)):
        torch.manual_seed(4)
        norm = nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4))
        inputs = x if group is None else _local(x)
        if group is not None:
            norm = convert_batchnorm(norm, group)
        inputs = inputs.clone().requires_grad_(True)
        y = norm(inputs)
        # A loss over the whole batch: each rank computes its share, so gradients add up across ranks.
        weights = torch.arange(x.numel()).reshape(x.shape).float().sin()
        (y * (weights if group is None else _local(weights))).sum().backward()
        out[name] = {
            "output": y.detach(),
            "input_grad": inputs.grad,
            "weight_grad": norm[1].weight.grad.clone(),
            "running": (norm[1].running_mean.clone(), norm[1].running_var.clone()),
            "converted": type(norm[1]).__name__,
        }
    return out


# ------------------------------------------------------------------------------------------- tests


@functools.cache
def _results() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_parallelize_checks, WORLD, tmp, timeout=180)


def _close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _reference() -> dict[str, Tensor]:
    x, y = _data()
    model = _net()
    _train(model, 3, x, y)
    return model.state_dict()


@pytest.mark.parametrize("plan", ["ddp", "zero3"])
def test_parallelize_trains_as_one_process(plan: str) -> None:
    want = _reference()
    for rank, result in enumerate(_results()):
        assert result[plan]["sharded"] == (plan == "zero3")
        for key, expected in want.items():
            _close(result[plan]["state"][key], expected, f"rank {rank} {plan} {key}")


def test_sharded_checkpoint_moves_between_plans_with_every_tensor_equal() -> None:
    for rank, result in enumerate(_results()):
        want_state, want_optim = result["roundtrip"]["want"]
        for step, (state, optim) in enumerate(result["roundtrip"]["got"]):
            assert state.keys() == want_state.keys()
            for key in want_state:
                torch.testing.assert_close(state[key], want_state[key], rtol=0, atol=0, msg=f"rank {rank} load {step}")
            assert optim["state"].keys() == want_optim["state"].keys()
            for name, values in want_optim["state"].items():
                for key, value in values.items():
                    torch.testing.assert_close(optim["state"][name][key], value, rtol=0, atol=0)


def test_ranks_holding_part_of_the_names_save_and_load() -> None:
    results = _results()
    for rank, result in enumerate(results):
        partial = result["partial"]
        # The stage gets back exactly what it wrote.
        for key, value in partial["saved"].items():
            torch.testing.assert_close(partial["stage"][key], value, rtol=0, atol=0)
        assert partial["stage_state"].keys() == partial["saved_state"].keys() == {
            f"blocks.{rank}.0.weight", f"blocks.{rank}.0.bias"}
        # A whole module gets each block, and its optimizer state, from the rank that held it.
        for owner, other in enumerate(results):
            for key, value in other["partial"]["saved"].items():
                if key.startswith(f"blocks.{owner}."):
                    torch.testing.assert_close(partial["whole"][key], value, rtol=0, atol=0)
            for name, values in other["partial"]["saved_state"].items():
                for key, value in values.items():
                    torch.testing.assert_close(partial["whole_state"][name][key], value, rtol=0, atol=0)
        assert set(partial["whole_state"]) == {f"blocks.{i}.0.{p}" for i in (0, 1) for p in ("weight", "bias")}


def test_cpu_sync_batchnorm_matches_one_batchnorm_over_the_whole_batch() -> None:
    for rank, result in enumerate(_results()):
        ref, synced = result["batchnorm"]["reference"], result["batchnorm"]["synced"]
        assert synced["converted"] == "DistributedBatchNorm"
        _close(synced["output"], ref["output"].chunk(WORLD)[rank], f"rank {rank} output")
        _close(synced["input_grad"], ref["input_grad"].chunk(WORLD)[rank], f"rank {rank} input grad")
        # Weight gradients are per-rank partial sums here (no data-parallel averaging in this check).
        total = sum(r["batchnorm"]["synced"]["weight_grad"] for r in _results())
        _close(total, ref["weight_grad"], "weight grad summed over ranks")
        _close(synced["running"], ref["running"], f"rank {rank} running stats")
