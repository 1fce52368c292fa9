"""Sharded storage (ZeRO-1/2/3, hybrid data × shard) against a single-process reference.

Tier 1 (no process group): finding and naming units, activation checkpointing.
Tier 2 (gloo, 2 and 4 CPU ranks): every scenario trains the same tiny transformer from the same
weights for ``STEPS`` AdamW steps, each rank on its slice of the same global batch, and is compared
with one process training on the whole batch. Starting processes is the slow part on a small
machine, so one group of ranks runs every scenario of its world size and the tests read its results.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from parti_lightning.parallel.activation_checkpoint import apply_activation_checkpointing
from parti_lightning.parallel.blocks import find_blocks, resolve_units
from parti_lightning.parallel.full_state import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from parti_lightning.parallel.state_bytes import rank_state_bytes
from parti_lightning.parallel.storage import MESH_DIMS, apply_storage, retarget_lr_scheduler, shard_optimizer
from parti_lightning.plan import PartitionPlan

from dist_utils import DistributedTestError, run_distributed

VOCAB, DIM, HEADS, SEQ, N_BLOCKS = 37, 16, 2, 8, 3
GLOBAL_BATCH, STEPS, LR, WEIGHT_DECAY, GAMMA, MAX_NORM = 8, 10, 1e-2, 0.1, 0.9, 0.5
# fp32 parity after 10 AdamW steps. The reduction order differs (reduce-scatter of per-rank means vs
# one mean over the whole batch), and Adam divides by sqrt(v): an element whose gradient is near zero
# turns ~1e-7 rounding into ~1e-6 of update. A real error shows at the scale of the update (lr=1e-2).
RTOL, ATOL = 1e-5, 1e-5


# ------------------------------------------------------------------------------------------ model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)  # a key bias gets a zero gradient (softmax shift), i.e. noise
        self.proj = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, DIM))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)  # 37 rows: uneven shards at 2 and 4 ranks
        self.unused = nn.Parameter(torch.randn(3, 5))  # never reaches the loss: its grad stays None

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


def _batch(step: int) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))
    return tokens[:, :-1], tokens[:, 1:]


def _eval_tokens() -> Tensor:
    return torch.randint(VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(99))


def _loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))


def _optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=GAMMA)


# -------------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    storage: str
    data: int
    shard: int
    clip: bool = False
    checkpointing: bool = False

    @property
    def world_size(self) -> int:
        return self.data * self.shard

    def plan(self) -> PartitionPlan:
        checkpointing = "blocks" if self.checkpointing else "none"
        plan = PartitionPlan(
            data=self.data, shard=self.shard, storage=self.storage, activation_checkpointing=checkpointing
        )
        return plan.resolve(self.world_size)


SCENARIOS = {
    2: (
        Scenario("zero1", "optimizer", 1, 2, clip=True),
        Scenario("zero2", "gradients", 1, 2),
        Scenario("zero3", "parameters", 1, 2, clip=True, checkpointing=True),
    ),
    4: (
        Scenario("zero1", "optimizer", 1, 4),
        Scenario("zero2", "gradients", 1, 4, clip=True),
        Scenario("zero3", "parameters", 1, 4),
        Scenario("hybrid-zero3", "parameters", 2, 2, clip=True, checkpointing=True),
        Scenario("hybrid-zero2", "gradients", 2, 2),
        Scenario("hybrid-zero1", "optimizer", 2, 2, clip=True),
    ),
}
ALL = [(ws, s) for ws, scenarios in SCENARIOS.items() for s in scenarios]
CLIPPED = [(ws, s) for ws, s in ALL if s.clip]
ZERO1 = [(ws, s) for ws, s in ALL if s.storage == "optimizer"]


def _ids(cases: list[tuple[int, Scenario]]) -> list[str]:
    return [f"ws{ws}-{s.name}" for ws, s in cases]


# ------------------------------------------------------------------------------- rank-side code


def _sharded(scenario: Scenario, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The model, optimizer and scheduler of ``scenario``, in the order the Lightning strategy applies them."""
    plan = scenario.plan()
    mesh = init_device_mesh("cpu", (plan.data, plan.shard), mesh_dim_names=MESH_DIMS)
    model = _model(seed)
    if plan.activation_checkpointing == "blocks":
        apply_activation_checkpointing(model, resolve_units(model, plan.sharding_units))
    apply_storage(model, mesh, plan)
    optimizer, scheduler = _optimizer(model)  # configure_optimizers runs on the sharded model
    if plan.storage == "optimizer":
        optimizer = shard_optimizer(optimizer, mesh[MESH_DIMS[1]].get_group())
        retarget_lr_scheduler(scheduler, optimizer)
    return model, optimizer, scheduler


def _average_gradients(model: nn.Module) -> None:
    # What plain data parallel does for ZeRO-1 (parallel/data.py in the package): mean over all data-parallel ranks.
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()


def _local(step: int) -> tuple[Tensor, Tensor]:
    tokens, targets = _batch(step)
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    rows = slice(dist.get_rank() * per_rank, (dist.get_rank() + 1) * per_rank)
    return tokens[rows], targets[rows]


def _train_step(scenario: Scenario, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float | None:
    _loss(model, *_local(step)).backward()
    if scenario.storage == "optimizer":
        _average_gradients(model)
    norm = None
    if scenario.clip:
        # Exactly what Lightning's clip_gradients calls, on (DTensor) parameters.
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        norm = float(total.full_tensor() if isinstance(total, DTensor) else total)
    optimizer.step()
    return norm


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.clone() for name, tensor in full_state_dict(model, rank0_only=False).items()}


def _run_scenario(scenario: Scenario) -> dict[str, Any]:
    model, optimizer, scheduler = _sharded(scenario)
    norms, state_bytes = [], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            norms.append(_train_step(scenario, model, optimizer, step))
            if step == STEPS - 1:
                state_bytes = rank_state_bytes(model, optimizer)  # gradients still there
            scheduler.step()
            optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        eval_logits = model(_eval_tokens())
    model.train()
    params = _snapshot(model)
    optim_state = full_optimizer_state_dict(model, optimizer)
    return {
        "params": params,
        "norms": norms,
        "bytes": state_bytes,
        "eval_logits": eval_logits,
        "optim_state": optim_state,
        "roundtrip_diff": _roundtrip(scenario, model, optimizer, params, optim_state),
        "scheduler_warnings": [str(w.message) for w in caught if "step()" in str(w.message)],
    }


def _roundtrip(
    scenario: Scenario, model: nn.Module, optimizer: torch.optim.Optimizer, params: dict, optim_state: dict
) -> float:
    """Load the full states into a fresh sharded copy, take one more step on both, return the largest difference."""
    restored, restored_optimizer, _ = _sharded(scenario, seed=1)
    load_full_state_dict(restored, params)  # every rank passes the whole dict
    # Copied: like Optimizer.load_state_dict, the loader adopts the given tensors rather than copying them.
    optim_state = tree_map_only(Tensor, Tensor.clone, optim_state)
    load_full_optimizer_state_dict(restored, restored_optimizer, optim_state, from_rank0=True)  # rank 0 only
    for pair in ((model, optimizer), (restored, restored_optimizer)):
        _train_step(scenario, *pair, step=STEPS)
    after, restored_after = _snapshot(model), _snapshot(restored)
    return max(float((after[name] - restored_after[name]).abs().max()) for name in after)


def _errors() -> dict[str, str]:
    """The messages apply_storage raises for plans and models it cannot shard."""
    messages = {}
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=MESH_DIMS)
    plan = PartitionPlan(data=2, shard=1, storage="parameters").resolve(2)
    messages["shard=1"] = _raised(lambda: apply_storage(_model(), mesh, plan))
    flat = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    messages["mesh dims"] = _raised(
        lambda: apply_storage(_model(), flat, PartitionPlan(storage="parameters").resolve(2))
    )
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    sharded_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=MESH_DIMS)
    plan = PartitionPlan(storage="parameters", sharding_units=("0", "1")).resolve(2)
    messages["tied"] = _raised(lambda: apply_storage(tied, sharded_mesh, plan))
    return messages


class Branchy(nn.Module):
    """A parameter that only some ranks use, depending on their data."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.extra = nn.Linear(4, 4)

    def forward(self, x: Tensor, use_extra: bool) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.extra(x) if use_extra else x


def _edge_cases() -> dict[str, float]:
    """Data-dependent unused parameters (reduce_unused_parameters) and offload='cpu' on a CPU mesh."""
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=MESH_DIMS)
    inputs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(rank)) for rank in range(2)]
    torch.manual_seed(0)
    plain, sharded = Branchy(), Branchy()
    sharded.load_state_dict(plain.state_dict())
    apply_storage(sharded, mesh, PartitionPlan(storage="parameters").resolve(2), reduce_unused_parameters=True)
    sharded(inputs[dist.get_rank()], use_extra=dist.get_rank() == 0).sum().backward()
    plain(inputs[0], use_extra=True).sum().backward()  # rank 1 contributes nothing: mean = rank 0's / 2
    expected = plain.extra.weight.grad / 2
    results = {"partly used grad diff": float((sharded.extra.weight.grad.full_tensor() - expected).abs().max())}

    offloaded = _model()
    apply_storage(offloaded, mesh, PartitionPlan(storage="parameters", offload="cpu").resolve(2))
    _loss(offloaded, *_local(0)).backward()
    results["offload grad norm"] = float(torch.nn.utils.clip_grad_norm_(offloaded.parameters(), 1e9).full_tensor())
    return results


def _raised(fn: Any) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "(nothing raised)"


def _run_all(world_size: int) -> dict[str, Any]:
    results: dict[str, Any] = {s.name: _run_scenario(s) for s in SCENARIOS[world_size]}
    if world_size == 2:
        results["errors"] = _errors()
        results["edge cases"] = _edge_cases()
    return results


# ---------------------------------------------------------------------------------- parent side


@functools.cache
def _reference(clip: bool) -> dict[str, Any]:
    """One process, whole global batch, same initial weights, same optimizer and schedule."""
    model = _model()
    optimizer, scheduler = _optimizer(model)
    norms = []
    for step in range(STEPS):
        tokens, targets = _batch(step)
        _loss(model, tokens, targets).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)) if clip else None)
        optimizer.step()
        if step == STEPS - 1:
            state_bytes = rank_state_bytes(model, optimizer)
        scheduler.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        eval_logits = model(_eval_tokens())
    options = StateDictOptions(full_state_dict=True)
    return {
        "params": {name: t.clone() for name, t in model.state_dict().items()},
        "norms": norms,
        "bytes": state_bytes,
        "eval_logits": eval_logits,
        "optim_state": get_optimizer_state_dict(model, optimizer, options=options),
    }


_RUNS: dict[int, list[dict[str, Any]] | Exception] = {}


def _distributed(world_size: int) -> list[dict[str, Any]]:
    """Every scenario of ``world_size``, run once per session; a failed run fails each test that reads it, at once."""
    if world_size not in _RUNS:
        try:
            _RUNS[world_size] = run_distributed(_run_all, world_size, world_size, timeout=150)
        except Exception as err:
            _RUNS[world_size] = err
    run = _RUNS[world_size]
    if isinstance(run, Exception):
        raise run
    return run


# ------------------------------------------------------------------------------ tier 1: blocks


def test_find_blocks_takes_the_repeated_children_of_a_module_list() -> None:
    assert [name for name, _ in find_blocks(_model())] == ["blocks.0", "blocks.1", "blocks.2"]


def test_find_blocks_picks_the_outermost_repeated_level() -> None:
    stages = nn.ModuleList(nn.ModuleList(Block() for _ in range(2)) for _ in range(3))
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.Sequential(*stages))
    assert [name for name, _ in find_blocks(nn.ModuleDict({"stages": stages}))] == ["stages.0", "stages.1", "stages.2"]
    # In a Sequential of a Linear and a Sequential, nothing repeats at the top: the search goes down.
    assert [name for name, _ in find_blocks(model)] == ["1.0", "1.1", "1.2"]


def test_find_blocks_skips_parameterless_and_one_of_a_kind_children() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())
    assert [name for name, _ in find_blocks(mlp)] == ["0", "2"]
    assert find_blocks(nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)])) == []
    shared = Block()
    # A module registered twice is listed (and would be sharded) once.
    assert [name for name, _ in find_blocks(nn.ModuleList([shared, shared, Block()]))] == ["0", "2"]


def test_find_blocks_finds_every_trunk() -> None:
    model = nn.ModuleDict(
        {"encoder": nn.ModuleList(Block() for _ in range(2)), "decoder": nn.Sequential(Block(), Block())}
    )
    assert [name for name, _ in find_blocks(model)] == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]


def test_units_resolve_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = TinyTransformer()
    assert [name for name, _ in resolve_units(model, None)] == ["blocks.0", "blocks.1", "blocks.2"]
    units = resolve_units(model, ["blocks.1", "head", "blocks.1"])
    assert [(name, unit) for name, unit in units] == [("blocks.1", model.blocks[1]), ("head", model.head)]


def test_unknown_unit_names_the_module_and_close_matches() -> None:
    with pytest.raises(
        ValueError, match=r"'block\.1' is not a submodule of TinyTransformer; close matches: 'blocks\.1'"
    ):
        resolve_units(_model(), ["block.1"])
    with pytest.raises(ValueError, match=r"valid names include: 'blocks\.0', 'blocks\.1', 'blocks\.2'"):
        resolve_units(_model(), ["zzz"])
    with pytest.raises(ValueError, match="root module"):
        resolve_units(_model(), [""])


def test_activation_checkpointing_keeps_names_and_gradients() -> None:
    plain, checkpointed = _model(), _model()
    apply_activation_checkpointing(checkpointed, find_blocks(checkpointed))
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    for model in (plain, checkpointed):
        _loss(model, *_batch(0)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


def test_optimizer_state_saved_before_any_step_is_empty_and_loads_as_empty() -> None:
    model = _model()
    optimizer, _ = _optimizer(model)
    saved = full_optimizer_state_dict(model, optimizer)
    assert saved["state"] == {} and not optimizer.state  # saving created no state (no zero-lr step)
    assert saved["param_groups"][0]["params"][:2] == ["unused", "embed.weight"]  # own parameters first
    restored, _ = _optimizer(model)
    load_full_optimizer_state_dict(model, restored, saved)
    assert not restored.state


def test_parameters_without_saved_state_load_without_state() -> None:
    model = _model()
    optimizer, _ = _optimizer(model)
    _loss(model, *_batch(0)).backward()
    optimizer.step()
    saved = full_optimizer_state_dict(model, optimizer)
    restored, _ = _optimizer(model)
    load_full_optimizer_state_dict(model, restored, saved)
    assert model.unused not in restored.state  # as in the checkpoint: its first step will be step 1
    assert float(restored.state[model.embed.weight]["step"]) == 1.0


# ------------------------------------------------------------------------------- tier 2: gloo


def _result(world_size: int, scenario: Scenario, rank: int = 0) -> dict[str, Any]:
    return _distributed(world_size)[rank][scenario.name]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=_ids(ALL))
def test_parameters_match_single_process(world_size: int, scenario: Scenario) -> None:
    reference = _reference(scenario.clip)
    for rank in range(world_size):
        params = _result(world_size, scenario, rank)["params"]
        assert params.keys() == reference["params"].keys()
        for name, expected in reference["params"].items():
            torch.testing.assert_close(
                params[name], expected, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}"
            )


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=_ids(ALL))
def test_inference_after_training_matches(world_size: int, scenario: Scenario) -> None:
    expected = _reference(scenario.clip)["eval_logits"]
    for rank in range(world_size):
        torch.testing.assert_close(_result(world_size, scenario, rank)["eval_logits"], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "scenario"), CLIPPED, ids=_ids(CLIPPED))
def test_clip_grad_norm_uses_the_global_norm(world_size: int, scenario: Scenario) -> None:
    expected = _reference(True)["norms"]
    assert expected[0] > MAX_NORM, "the reference gradients must be large enough to be clipped"
    for rank in range(world_size):
        torch.testing.assert_close(_result(world_size, scenario, rank)["norms"], expected, rtol=RTOL, atol=0)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=_ids(ALL))
def test_full_optimizer_state_is_keyed_by_name_and_matches(world_size: int, scenario: Scenario) -> None:
    expected = _reference(scenario.clip)["optim_state"]
    got = _result(world_size, scenario)["optim_state"]
    assert "unused" not in got["state"]  # never had a gradient, so AdamW never made state for it
    assert got["state"].keys() == expected["state"].keys()
    for name, state in expected["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(got["state"][name][key], value, rtol=RTOL, atol=ATOL, msg=f"{name}.{key}")
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    assert [g["lr"] for g in got["param_groups"]] == pytest.approx([g["lr"] for g in expected["param_groups"]])
    for rank in range(1, world_size):
        assert _result(world_size, scenario, rank)["optim_state"] == {}  # rank0_only


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=_ids(ALL))
def test_checkpoint_roundtrip_resumes_exactly(world_size: int, scenario: Scenario) -> None:
    for rank in range(world_size):
        assert _result(world_size, scenario, rank)["roundtrip_diff"] == 0.0


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "scenario"), ZERO1, ids=_ids(ZERO1))
def test_retargeted_scheduler_does_not_warn(world_size: int, scenario: Scenario) -> None:
    assert _result(world_size, scenario)["scheduler_warnings"] == []


def _sharded_bytes(counts: dict[str, int]) -> int:
    return counts["parameters"] + counts["gradients"] + counts["optimizer_state"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=_ids(ALL))
def test_rank_holds_its_share_of_the_bytes(world_size: int, scenario: Scenario) -> None:
    whole = _reference(scenario.clip)["bytes"]
    per_rank = [_result(world_size, scenario, rank)["bytes"] for rank in range(world_size)]
    shard = scenario.shard
    for counts in per_rank:
        print(f"{scenario.name} at {world_size} ranks: {counts} (unsharded: {whole})")
        if scenario.storage == "optimizer":
            # ZeRO-1: parameters and gradients whole; optimizer state split by whole parameters.
            assert counts["parameters"] == whole["parameters"]
            assert counts["gradients"] == whole["gradients"]
            assert counts["optimizer_state"] < whole["optimizer_state"]
        else:
            # FSDP2 (ZeRO-2 and ZeRO-3 alike at rest): a 1/shard slice of everything.
            assert _sharded_bytes(counts) <= 1.1 * _sharded_bytes(whole) / shard
        assert counts["scalars"] <= whole["scalars"]  # Adam's step counters: never sharded, at most all
    # Every byte of optimizer state lives on exactly one rank of each shard group.
    first_group = per_rank[:shard]
    assert sum(c["optimizer_state"] for c in first_group) == whole["optimizer_state"]


@pytest.mark.timeout(240)
def test_apply_storage_refuses_what_it_cannot_shard() -> None:
    errors = _distributed(2)[0]["errors"]
    assert "shards nothing: use plain data parallel" in errors["shard=1"]
    assert "needs a 2-D mesh with dims ('data', 'shard')" in errors["mesh dims"]
    assert "sharding unit '0' shares a parameter with '2.weight'" in errors["tied"]


@pytest.mark.timeout(240)
def test_gradients_of_partly_used_parameters_are_averaged_when_asked() -> None:
    # Without reduce_unused_parameters the ranks would hang in mismatched reduce-scatters.
    assert _distributed(2)[0]["edge cases"]["partly used grad diff"] < 1e-6


@pytest.mark.timeout(240)
def test_cpu_offload_is_accepted_on_a_cpu_mesh() -> None:
    model = _model()
    _loss(model, *_batch(0)).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    assert _distributed(2)[0]["edge cases"]["offload grad norm"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- the harness itself


def _fail_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()


def _hang() -> None:
    dist.barrier()
    time.sleep(600)


@pytest.mark.timeout(60)
def test_harness_reports_every_failed_rank() -> None:
    with pytest.raises(DistributedTestError, match=r"(?s)rank 0: error.*rank 1: error.*boom on rank 1"):
        run_distributed(_fail_on_rank_1, 2, timeout=30)


@pytest.mark.timeout(60)
def test_harness_kills_hung_ranks_and_shows_their_stacks() -> None:
    with pytest.raises(DistributedTestError, match=r"(?s)rank 0: hung.*in _hang.*rank 1: hung"):
        # The timeout covers start-up (importing torch and Lightning, ~5 s per rank on 2 cores): long
        # enough that both ranks reach `_hang` on a busy machine too.
        run_distributed(_hang, 2, timeout=20)
