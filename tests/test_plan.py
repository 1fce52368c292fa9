"""Tier 1: PartitionPlan construction, presets, resolution and validation (no process group)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from parti_lightning.plan import PRESETS, PartitionPlan, PlanError, preset


@pytest.mark.parametrize("name", ["auto", "ddp", "zero1", "zero2", "zero3", "hybrid", "ZeRO3", " ddp "])
def test_presets_are_plans(name: str) -> None:
    assert isinstance(preset(name), PartitionPlan)


def test_preset_storage_levels() -> None:
    assert [PRESETS[n].zero_stage for n in ("ddp", "zero1", "zero2", "zero3")] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("plan", "world", "mesh"),
    [
        ("ddp", 4, {"data": 4, "shard": 1}),
        ("zero3", 4, {"data": 1, "shard": 4}),
        ({"preset": "zero3", "data": 2}, 4, {"data": 2, "shard": 2}),
        ({"preset": "zero2", "shard": 2}, 4, {"data": 2, "shard": 2}),
        ("ddp", 1, {"data": 1, "shard": 1}),
    ],
)
def test_resolve_fills_auto_degrees(plan: object, world: int, mesh: dict[str, int]) -> None:
    resolved = PartitionPlan.from_value(plan).resolve(world)  # type: ignore[arg-type]
    assert {k: resolved.mesh_shape[k] for k in mesh} == mesh
    assert resolved.data_parallel_size == world


@pytest.mark.parametrize("plan", [*PRESETS.values(), PartitionPlan(data=2, shard=2, storage="parameters")])
def test_round_trip_through_yaml(plan: PartitionPlan) -> None:
    text = yaml.safe_dump(plan.to_dict())
    assert PartitionPlan.from_value(yaml.safe_load(text)) == plan


def test_hybrid_shards_inside_a_node_and_replicates_across() -> None:
    assert preset("hybrid").resolve(8, ranks_per_node=4).mesh_shape == {"data": 2, "shard": 4, "tensor": 1,
                                                                        "pipeline": 1}
    assert preset("hybrid").resolve(4, ranks_per_node=4).mesh_shape["data"] == 1


def test_plan_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["ddp"].storage = "parameters"  # type: ignore[misc]


BAD_PLANS = [
    # (value, world size or None, expected error type, text the message must contain)
    ("zero9", None, PlanError, "unknown plan 'zero9'"),
    ("", None, PlanError, "unknown plan"),
    (42, None, PlanError, "plan=42 is invalid"),
    ({"storage": "everything"}, None, PlanError, "plan.storage='everything'"),
    ({"offload": "disk"}, None, PlanError, "plan.offload='disk'"),
    ({"activation_checkpointing": "all"}, None, PlanError, "plan.activation_checkpointing='all'"),
    ({"data": 0}, None, PlanError, "plan.data=0"),
    ({"data": -2}, None, PlanError, "plan.data=-2"),
    ({"data": "many"}, None, PlanError, "plan.data='many'"),
    ({"data": 2.0}, None, PlanError, "plan.data=2.0"),
    ({"data": True}, None, PlanError, "plan.data=True"),
    ({"shard": 0}, None, PlanError, "plan.shard=0"),
    ({"tensor": 0}, None, PlanError, "plan.tensor=0"),
    ({"pipeline": "auto"}, None, PlanError, "plan.pipeline='auto'"),
    ({"micro_batches": 0}, None, PlanError, "plan.micro_batches=0"),
    ({"shard": 2}, None, PlanError, "plan.shard=2 with plan.storage='replicated' shards nothing"),
    ({"offload": "cpu"}, None, PlanError, "plan.offload='cpu' needs sharded storage"),
    ({"preset": "zero1", "offload": "cpu"}, None, PlanError, "storage='parameters' only"),
    ({"sharding_units": "blocks"}, None, PlanError, "plan.sharding_units='blocks'"),
    ({"sharding_units": ["blocks.0", ""]}, None, PlanError, "plan.sharding_units"),
    ({"colour": "blue"}, None, PlanError, "unknown plan field(s) ['colour']"),
    ({"preset": "zero7"}, None, PlanError, "unknown plan 'zero7'"),
    ({"data": 3}, 4, PlanError, "mesh data=3 × shard=1 × tensor=1 × pipeline=1 = 3 does not match world size 4"),
    ({"preset": "zero3", "data": 3}, 4, PlanError, "plan.data=3 does not divide the 4 data-parallel ranks"),
    ({"preset": "zero3", "shard": 3}, 4, PlanError, "plan.shard=3 does not divide the 4 data-parallel ranks"),
    ({"data": 2, "shard": 1}, 3, PlanError, "does not match world size 3"),
    ("ddp", 0, PlanError, "world size 0 is invalid"),
    ("hybrid", 4, PlanError, "plan.shard='node' needs the number of ranks per node"),
    ({"data": "node"}, None, PlanError, "plan.data='node' is invalid"),
    ({"tensor": 2, "storage": "optimizer"}, None, NotImplementedError, "ZeRO-1 on top of tensor parallelism"),
    ({"tensor": 0}, None, PlanError, "plan.tensor=0 is invalid"),
    ({"tensor_rules": {"blocks.*.fc": "colwise"}}, None, PlanError, "plan.tensor=1 splits nothing"),
    ({"tensor": 2, "tensor_rules": {"blocks.*.fc": "columns"}}, None, PlanError, "choose one of 'colwise'"),
    ({"preset": "tp", "data": "auto"}, 4, PlanError, "plan.tensor='auto' takes the ranks the other axes leave"),
    ({"tensor": 3}, 4, PlanError, "does not divide world size 4"),
    ({"micro_batches": 4}, None, PlanError, "plan.micro_batches=4 only applies to pipeline parallelism"),
    ({"preset": "zero3", "pipeline": 2, "schedule": "1f1b"}, None, NotImplementedError, "runs schedule='gpipe' only"),
    ({"preset": "zero1", "pipeline": 2, "schedule": "interleaved-1f1b"}, None, NotImplementedError,
     "storage='optimizer' under schedule='interleaved-1f1b'"),
    ({"preset": "zero3", "pipeline": 2, "tensor": 2, "schedule": "gpipe"}, None, NotImplementedError,
     "all three together"),
    ({"pipeline": 2, "schedule": "zigzag"}, None, PlanError, "plan.schedule='zigzag' is invalid"),
    ({"pipeline": 2, "stages_per_rank": 2}, None, PlanError, "an interleaved schedule holds 2 or more stages"),
    ({"pipeline": 2, "schedule": "interleaved-1f1b", "stages_per_rank": 1}, None, PlanError,
     "an interleaved schedule holds 2 or more stages"),
    ({"preset": "zero3", "pipeline": 2, "schedule": "interleaved-1f1b"}, None, NotImplementedError,
     "runs schedule='gpipe' only"),
    ({"preset": "pp", "tensor": 2, "schedule": "interleaved-1f1b"}, 4, NotImplementedError,
     "under schedule='interleaved-1f1b' is not implemented yet"),
    ({"pipeline": "auto", "tensor": "auto"}, None, PlanError, "cannot both be 'auto'"),
]


@pytest.mark.parametrize(("value", "world", "error", "message"), BAD_PLANS, ids=[str(b[0]) for b in BAD_PLANS])
def test_bad_plans_are_rejected_with_the_field_named(value: object, world: int | None, error: type, message: str):
    with pytest.raises(error) as info:
        plan = PartitionPlan.from_value(value)  # type: ignore[arg-type]
        if world is not None:
            plan.resolve(world)
    assert message in str(info.value)


def test_zero3_with_tensor_shards_over_the_ranks_tensor_leaves() -> None:
    two_d = PartitionPlan.from_value({"preset": "zero3", "tensor": 2}).resolve(4)
    assert two_d.mesh_shape == {"data": 1, "shard": 2, "tensor": 2, "pipeline": 1}
    assert two_d.storage == "parameters" and two_d.data_parallel_size == 2


def test_tp_preset_splits_every_rank_and_combines_with_data() -> None:
    assert preset("tp").resolve(4).mesh_shape == {"data": 1, "shard": 1, "tensor": 4, "pipeline": 1}
    two_d = PartitionPlan.from_value({"preset": "tp", "data": 2}).resolve(4)
    assert two_d.mesh_shape == {"data": 2, "shard": 1, "tensor": 2, "pipeline": 1}
    rules = PartitionPlan.from_value({"tensor": 2, "tensor_rules": {"blocks.*.mlp.0": "colwise"}})
    assert PartitionPlan.from_value(rules.to_dict()) == rules
    assert rules.to_dict()["tensor_rules"] == {"blocks.*.mlp.0": "colwise"}


def test_pp_preset_puts_one_stage_on_every_rank() -> None:
    plan = preset("pp").resolve(2)
    assert plan.mesh_shape == {"data": 1, "shard": 1, "tensor": 1, "pipeline": 2}
    assert (plan.micro_batches, plan.schedule) == (4, "gpipe")
    interleaved = PartitionPlan.from_value({"preset": "pp", "schedule": "interleaved-1f1b"})
    assert interleaved.virtual_stages == 2 and "stages_per_rank=2" in interleaved.resolve(2).describe()
    assert PartitionPlan.from_value(interleaved.to_dict()) == interleaved
    cut = PartitionPlan.from_value({"preset": "pp", "pipeline_cuts": ["blocks.3"]})
    assert PartitionPlan.from_value(cut.to_dict()) == cut
