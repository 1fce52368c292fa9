"""Pipeline parallelism of an unmodified forward, against one process.

Tier 1 (no process group): the trunk contract's dry run (what passes, one test per kind of
breakage), stage splitting, settings refused before launch.
Tier 2 (gloo, 2 CPU ranks): one group of ranks runs every scenario and the tests read its results.
Each scenario trains a tiny model from the same weights for a few AdamW steps with gradient
clipping, pipelined (2 stages, 4 micro-batches) and as one process on the same batches in the same
rank, and compares: a nanoGPT-style model with tied embeddings, a ViT-style encoder built from
``nn.TransformerEncoderLayer`` and a Llama decoder from transformers (built from a config).
"""

from __future__ import annotations

import copy
import functools
import os
import time
from datetime import timedelta
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pipeline_models import build, make_batch
from torch import Tensor, nn

from parti_lightning.parallel.pipeline import apply_pipeline, check_pipeline_settings
from parti_lightning.parallel.pipeline.contract import check_trunk_contract, trunk_layout
from parti_lightning.parallel.pipeline.cuts import stage_starts

from dist_utils import run_distributed

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MICRO_BATCHES, BATCH, STEPS, ACCUMULATE, LR, MAX_NORM = 4, 8, 2, 2, 1e-2, 0.5
# fp32 parity: micro-batches sum gradients in another order than one batch, and Adam divides by
# sqrt(v) + eps. An element whose true gradient cancels to ~1e-9 (seen in a key projection) is
# rounding noise that eps=1e-8 would turn into a sizeable part of an update; eps=1e-6 keeps such
# noise at its own scale and leaves real gradients (>= 1e-5 here) untouched. A real error shows
# at the scale of the update (lr=1e-2).
RTOL, ATOL, ADAM_EPS = 1e-5, 1e-5, 1e-6
SCENARIOS = [("gpt", "gpipe"), ("gpt", "1f1b"), ("vit", "gpipe"), ("vit", "1f1b"), ("hf", "gpipe"), ("hf", "1f1b"),
             ("shifted", "gpipe"), ("shifted", "1f1b"), ("handing", "gpipe"), ("handing", "1f1b"),
             ("gpt", "interleaved-1f1b"), ("hf", "interleaved-1f1b"), ("handing", "interleaved-1f1b")]


# ----------------------------------------------------------------------------------- tier 1: contract


def _meta_example(kind: str) -> tuple[nn.Module, Any]:
    device = "cpu" if kind == "hf" else "meta"  # HF's mask code branches on tensor values: not on meta
    with torch.device(device):
        model = build(kind)
    batch = tuple(t.to(device) for t in make_batch(kind, 4, 0))
    return model, lambda: model.loss(batch)


@pytest.mark.parametrize("kind", ["gpt", "vit", "hf"])
def test_contract_accepts_gpt_vit_and_hugging_face(kind: str) -> None:
    model, example = _meta_example(kind)
    names = [name for name, _ in check_trunk_contract(model, example)]
    assert len(names) == 4 and names[0].endswith("0") and names[-1].endswith("3")


class _Block(nn.Module):
    def __init__(self, tuple_out: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tuple_out = tuple_out

    def forward(self, x: Tensor, mask: Tensor | None = None, bias: Tensor | None = None, cache: Any = None) -> Any:
        y = self.lin(x) if mask is None else self.lin(x) * mask
        y = y if bias is None else y + bias
        return (y, y.mean()) if self.tuple_out else y


class _Chain(nn.Module):
    """Three blocks, called the way ``mode`` says: each mode breaks the contract one way."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        tuple_out = mode in ("aux_output", "handed_between_blocks")
        self.h = nn.ModuleList([_Block(tuple_out=tuple_out) for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        h, mode = self.h, self.mode
        if mode == "indexed":
            for i in range(len(h)):
                x = h[i // 2](x)
        elif mode == "reversed":
            for block in reversed(h):
                x = block(x)
        elif mode == "skipped":
            for block in h[:-1]:
                x = block(x)
        elif mode == "per_layer_args":  # computed before the trunk, one per layer (Gemma 2's masks by layer type)
            masks = [x.new_full((4,), float(i)) for i in range(len(h))]
            for block, mask in zip(h, masks, strict=True):
                x = block(x, mask=mask)
        elif mode == "handed_between_blocks":  # T5's position bias: block 0 computes it, later blocks take it
            bias = None
            for block in h:
                x, bias = block(x, bias=bias)
        elif mode == "changed_between":
            for block in h:
                x = block(x) * 0.5
        elif mode == "aux_output":
            aux = x.new_zeros(())
            for block in h:
                x, extra = block(x)
                aux = aux + extra
            x = x + aux
        elif mode == "intermediate_used":
            hidden = []
            for block in h:
                x = block(x)
                hidden.append(x)
            x = torch.stack(hidden).sum(0)
        elif mode == "cache":
            cache = {"keys": x.detach()}  # filled before the trunk: state across passes, not scratch
            for block in h:
                x = block(x, cache=cache)
        elif mode in ("two_passes", "partial_second_pass"):
            # Manual optimization's pattern: the trunk run twice in one step, each pass a whole chain
            # with its own extras.
            first, ones, zeros = x, torch.ones_like(x[0]), torch.zeros_like(x[0])
            for block in h:
                first = block(first, mask=ones)
            for block in h if mode == "two_passes" else h[:-1]:
                x = block(x, mask=zeros)
            x = x + first
        return x


BREAKAGES = {
    "indexed": "is called again after 'h.0', before the trunk's last block 'h.2'",
    "reversed": "called right after",
    "skipped": "never called",
    "changed_between": "is not fed the output of block 'h.0'",
    "aux_output": "output element 1 of block 'h.0' is used outside the blocks",
    "intermediate_used": "the output of block 'h.0' (not the last block) is used outside the blocks",
    "cache": "is passed a cache that already holds keys and values: 'cache' (dict, not empty)",
    "partial_second_pass": "the last pass stops at block 'h.1', before 'h.2'",
}


def test_contract_accepts_whole_passes_repeated() -> None:
    with torch.device("meta"):
        model = _Chain("two_passes")
        x = torch.randn(2, 4)
    assert [name for name, _ in check_trunk_contract(model, lambda: model(x))] == ["h.0", "h.1", "h.2"]


def test_contract_takes_an_empty_cache_as_scratch_and_refuses_a_filled_one() -> None:
    """Hugging Face's default cache (``use_cache=True``) is empty as the trunk starts: accepted. Decoding with a
    cache that holds a prompt's keys and values is state across passes: refused, with the cache named."""
    model, _ = _meta_example("hf")
    idx = make_batch("hf", 2, 0)[0]
    assert model.model.config.use_cache  # the library's default, untouched
    assert len(check_trunk_contract(model, lambda: model.model(input_ids=idx))) == 4
    prompt = model.model(input_ids=idx[:, :-1]).cache
    with pytest.raises(ValueError, match=r"already holds keys and values: 'cache' \(DynamicCache, 7 positions\)"):
        check_trunk_contract(model, lambda: model.model(input_ids=idx[:, -1:], cache=prompt))


def test_a_sliding_window_cache_is_empty_until_a_layer_writes_to_it() -> None:
    """Sliding-window layers (Mistral, Gemma 2) keep their window as a 0-d tensor: a setting, not content."""
    from transformers import DynamicCache, MistralConfig

    from parti_lightning.parallel.scratch import filled_caches, is_empty

    config = MistralConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                           sliding_window=4)
    cache = DynamicCache(config=config)
    assert is_empty(cache) and not filled_caches((None,), {"cache": cache})
    cache.update(torch.ones(1, 1, 3, 8), torch.ones(1, 1, 3, 8), layer_idx=0)
    assert not is_empty(cache)
    assert filled_caches((None,), {"cache": cache}) == ["'cache' (DynamicCache, 3 positions)"]


def test_contract_takes_a_value_one_block_hands_to_the_later_ones() -> None:
    """T5's position bias: block 0 returns it, every later block takes it; carried between stages."""
    with torch.device("meta"):
        model = _Chain("handed_between_blocks")
        x = torch.randn(2, 4)
    layout = trunk_layout(model, lambda: model(x))
    assert layout.handed and layout.per_block_extras and layout.tensor_elements == (1,)


def test_contract_takes_per_layer_arguments_and_runs_the_trunk_at_its_last_block() -> None:
    """A sliding-window mask on some layers and a full one on others (Gemma 2): each block's own arguments."""
    with torch.device("meta"):
        model, same = _Chain("per_layer_args"), _Chain("two_passes")
        x = torch.randn(2, 4)
    layout = trunk_layout(model, lambda: model(x))
    assert layout.per_block_extras and layout.output_template is None
    assert not trunk_layout(same, lambda: same(x)).per_block_extras


@pytest.mark.parametrize("mode", sorted(BREAKAGES))
def test_contract_refuses_each_kind_of_breakage(mode: str) -> None:
    with torch.device("meta"):
        model = _Chain(mode)
        x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="trunk contract broken") as error:
        check_trunk_contract(model, lambda: model(x))
    assert BREAKAGES[mode] in str(error.value)


class _LightningChain(L.LightningModule):
    """A LightningModule over :class:`_Chain`, trained through the Trainer's ``fit``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.chain = _Chain(mode)

    def forward(self, x: Tensor) -> Tensor:
        return self.chain(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4, shuffle=True)


def test_a_broken_contract_is_refused_before_launch() -> None:
    from parti_lightning import PartiStrategy

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PartiStrategy(plan="pp"), max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module, loader = _LightningChain("reversed"), _loader()
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="trunk contract broken: block 'chain.h.1' is called right after 'chain.h.2'"):
        trainer.fit(module, loader)
    assert torch.equal(torch.get_rng_state(), rng), "drawing the example batch moved the caller's RNG"
    assert not dist.is_initialized(), "a process group was started"


class _ValueReadingChain(_LightningChain):
    """Reads a value in its step (as Hugging Face's mask and loss code do): cannot run on meta tensors."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self(batch[0]).pow(2).mean()
        return loss if loss.item() >= 0 else -loss


def test_the_contract_check_before_launch_says_what_it_ran() -> None:
    from parti_lightning.lightning_adapters.trunk_precheck import check_trunk_before_launch

    good = _LightningChain("two_passes")
    assert check_trunk_before_launch(good, (good, _loader())).startswith("checked before launch (training_step")
    good.example_input_array = torch.randn(2, 4)
    assert check_trunk_before_launch(good, (good,)).startswith("checked before launch (forward on example_input_array")
    good.example_input_array = None
    assert check_trunk_before_launch(good, (good, None, None, object())).startswith("checked at setup (no DataLoader")
    manual = _LightningChain("two_passes")
    manual.training_step = lambda batch, batch_idx: manual.optimizers()  # reads the Trainer: not on a meta copy
    assert "checked at setup (training_step on the first batch of the loader cannot run before launch" in (
        check_trunk_before_launch(manual, (manual, _loader()))
    )
    reads_values = _ValueReadingChain("two_passes")
    assert "on a copy of the module: it cannot run on meta tensors" in (
        check_trunk_before_launch(reads_values, (reads_values, _loader()))
    )


def test_contract_refuses_a_model_without_repeated_trunk_and_names_the_containers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    expected = r"no repeated trunk.*searched: <root> \(Sequential of Linear, ReLU, LayerNorm\)"
    with pytest.raises(ValueError, match=expected):
        check_trunk_contract(model, lambda: model(torch.randn(2, 4)))


def test_contract_refuses_blocks_that_change_the_hidden_shape() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="must return a tensor of the input's shape"):
        check_trunk_contract(model, lambda: model(torch.randn(2, 4)))


# ------------------------------------------------------------------------- tier 1: splits and settings


def test_stages_balance_costs_or_follow_cuts() -> None:
    names = [f"h.{i}" for i in range(6)]
    assert stage_starts(names, 2) == [0, 3]
    assert stage_starts(names, 3, costs=[4, 1, 1, 1, 1, 4]) == [0, 1, 5]
    assert stage_starts(names, 2, cuts=["h.4"]) == [0, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cuts": ["h.9"]}, "is not a trunk block"),
        ({"cuts": ["h.0"]}, "must name blocks after the first"),
        ({"cuts": ["h.1", "h.2"]}, "needs 1 cut"),
    ],
)
def test_bad_cuts_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_starts([f"h.{i}" for i in range(4)], 2, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_blocks": 2, "num_stages": 3, "micro_batches": 4}, "only 2 blocks"),
        ({"num_blocks": 4, "num_stages": 2, "micro_batches": 3, "batch_size": 8}, "does not divide the batch of 8"),
        ({"num_blocks": 4, "num_stages": 2, "micro_batches": 4, "schedule": "zigzag"}, "unknown pipeline schedule"),
        ({"num_blocks": 4, "num_stages": 2, "micro_batches": 0}, "at least 1"),
        ({"num_blocks": 4, "num_stages": 2, "micro_batches": 1, "schedule": "1f1b"}, "at least as many micro-batches"),
    ],
)
def test_bad_settings_are_refused_before_launch(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_pipeline_settings(**kwargs)


# ----------------------------------------------------------------------------------- tier 2: ranks


def _train(model: nn.Module, kind: str, clip: Any, steps: int = STEPS) -> dict[str, Any]:
    """AdamW steps, each accumulating ACCUMULATE batches, clipped by ``clip``; losses and norms recorded."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(ACCUMULATE):
            loss = model.loss(make_batch(kind, BATCH, seed=step * ACCUMULATE + micro)) / ACCUMULATE
            loss.backward()
            losses.append(loss.detach())
        norms.append(clip(model.parameters(), MAX_NORM).detach())
        optimizer.step()
        optimizer.zero_grad()
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    return {"losses": torch.stack(losses), "norms": torch.stack(norms), "state_bytes": state_bytes}


def _parity(kind: str, schedule: str) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = build(kind)
    model = copy.deepcopy(reference)
    example = make_batch(kind, BATCH, seed=10_000)

    def run_example() -> None:  # as the strategy runs it: one step's forward, no gradients
        with torch.no_grad():
            model.loss(example)

    pp = apply_pipeline(
        model, dist.group.WORLD, micro_batches=MICRO_BATCHES, schedule=schedule, device=torch.device("cpu"),
        stages_per_rank=2 if schedule == "interleaved-1f1b" else 1, run_example=run_example,
    )
    expected = _train(reference, kind, torch.nn.utils.clip_grad_norm_)
    got = _train(model, kind, pp.clip_grad_norm_)
    eval_batch = make_batch(kind, 6, seed=99)[0]  # 6 is not a multiple of 4: forward-only uses 3 micro-batches
    reference.eval()
    model.eval()
    with torch.no_grad():
        eval_expected, eval_got = reference(eval_batch), model(eval_batch)
    with torch.inference_mode():
        inference_got = model(eval_batch).clone()
    ref_params = dict(reference.named_parameters())
    # Replicated parameters must stay bit-identical on every pipeline rank (no drift between replicas).
    replicated = torch.cat([p.detach().flatten() for p in model.parameters() if not pp.is_stage_parameter(p)])
    replicas = [torch.empty_like(replicated) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, replicated)
    return {
        "replicas_identical": all(torch.equal(r, replicated) for r in replicas),
        "expected": expected,
        "got": got,
        "params": {name: (p.detach(), ref_params[name].detach()) for name, p in model.named_parameters()},
        "eval": (eval_got, eval_expected, inference_got),
        "owned": pp.owned_blocks,
        "freed": pp.freed_blocks,
        "state_dict_keys": list(model.state_dict()),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "reference_param_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
        "trunk_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if pp.is_stage_parameter(p)),
    }


def _dropout_replay(schedule: str) -> dict[str, Any]:
    """float64, dropout 0.1: the backward's gradient is that of the forward's masks (1F1B: recomputed with them).

    Exact single-process parity is impossible with dropout and micro-batches (a mask drawn per
    micro-batch is not a slice of a mask drawn for the whole batch), so what is checked is that the
    gradient is the gradient of the function the forward computed: a central difference of the
    pipelined loss along a random direction, each evaluation under the same global seed, equals the
    gradient's projection on it. Masks not replayed would make them differ at O(1).
    """
    torch.manual_seed(0)
    model = build("gpt", dropout=0.1).double()
    pp = apply_pipeline(
        model, dist.group.WORLD, micro_batches=MICRO_BATCHES, schedule=schedule, device=torch.device("cpu")
    )
    batch = make_batch("gpt", BATCH, seed=5)

    def loss() -> Tensor:
        torch.manual_seed(1234)
        return model.loss(batch)

    loss().backward()
    gen = torch.Generator().manual_seed(7)
    # Every rank draws the same direction for every parameter of the whole model, by name.
    shapes = [(name, p.shape) for name, p in build("gpt").named_parameters()]
    direction = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in shapes}
    params = dict(model.named_parameters())
    slope_stage = torch.zeros((), dtype=torch.float64)
    slope_rest = torch.zeros((), dtype=torch.float64)
    for name, p in params.items():
        if pp.is_stage_parameter(p):
            slope_stage += (p.grad * direction[name]).sum()
        else:
            slope_rest += (p.grad * direction[name]).sum()
    dist.all_reduce(slope_stage)
    eps = 1e-5

    def shift(scale: float) -> None:
        for name, p in params.items():
            p.add_(direction[name], alpha=scale * eps)

    with torch.no_grad():
        shift(1.0)
        plus = loss()
        shift(-2.0)
        minus = loss()
        shift(1.0)
    dropout_on = loss().item()
    model.eval()
    dropout_off = model.loss(batch).item()
    rng = torch.get_rng_state()
    states = [torch.empty_like(rng) for _ in range(dist.get_world_size())]
    dist.all_gather(states, rng)
    return {
        "slope": (slope_stage + slope_rest).item(),
        "difference": ((plus - minus) / (2 * eps)).item(),
        "dropout_changes_loss": abs(dropout_on - dropout_off) > 1e-6,
        "rng_equal_on_ranks": all(torch.equal(s, states[0]) for s in states),
    }


def _two_backward_passes(schedule: str) -> float:
    """Manual optimization's pattern: two losses from one forward, each with its own backward.

    Under GPipe the first backward uses the activations its forward kept, the second recomputes.
    """
    torch.manual_seed(0)
    reference = build("gpt")
    model = copy.deepcopy(reference)
    apply_pipeline(
        model, dist.group.WORLD, micro_batches=MICRO_BATCHES, schedule=schedule, device=torch.device("cpu")
    )
    idx, targets = make_batch("gpt", BATCH, seed=3)
    for m in (reference, model):
        logits = m(idx)
        first = F.cross_entropy(logits[:, :4].flatten(0, 1), targets[:, :4].flatten())
        second = F.cross_entropy(logits[:, 4:].flatten(0, 1), targets[:, 4:].flatten())
        first.backward(retain_graph=True)
        second.backward()
    expected = dict(reference.named_parameters())
    return max((p.grad - expected[n].grad).abs().max().item() for n, p in model.named_parameters())


def _block_runs_per_step(schedule: str) -> int:
    """How many times one owned block runs in a training step: GPipe keeps its forward, 1F1B recomputes it."""
    torch.manual_seed(0)
    model = build("gpt")
    pp = apply_pipeline(
        model, dist.group.WORLD, micro_batches=MICRO_BATCHES, schedule=schedule, device=torch.device("cpu")
    )
    runs = [0]
    model.get_submodule(pp.owned_blocks[0]).register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    model.loss(make_batch("gpt", BATCH, seed=0)).backward()
    return runs[0]


def _bad_batch() -> str:
    torch.manual_seed(0)
    model = build("gpt")
    apply_pipeline(model, dist.group.WORLD, micro_batches=MICRO_BATCHES, device=torch.device("cpu"))
    try:
        model.loss(make_batch("gpt", 6, seed=0))
    except ValueError as error:
        return str(error)
    return "no error"


def _peer_timeout() -> str:
    """Stage 1 enters a training step that stage 0 never runs: its receive must fail after the group's timeout."""
    dist.barrier()  # both ranks create the short-timeout group at the same moment (creation obeys it too)
    group = dist.new_group([0, 1], timeout=timedelta(seconds=4))
    torch.manual_seed(0)
    model = build("gpt")
    apply_pipeline(model, group, micro_batches=2, device=torch.device("cpu"))
    batch = make_batch("gpt", 4, seed=0)
    model.loss(batch).backward()  # a first step together: the schedules are set up
    outcome = "absent"
    if dist.get_rank() == 1:
        start = time.monotonic()
        try:
            model.loss(batch).backward()
            outcome = "no error"
        except RuntimeError as error:
            outcome = f"raised after {time.monotonic() - start:.1f}s: {error}"
    # Stage 0 stays alive but absent from the pipeline group: it waits here, on the default group.
    dist.barrier()
    return outcome


def _run_all() -> dict[str, Any]:
    results: dict[str, Any] = {f"{kind}-{schedule}": _parity(kind, schedule) for kind, schedule in SCENARIOS}
    results["dropout"] = {schedule: _dropout_replay(schedule) for schedule in ("gpipe", "1f1b")}
    results["two_backward"] = {schedule: _two_backward_passes(schedule) for schedule in ("gpipe", "1f1b")}
    results["block_runs"] = {schedule: _block_runs_per_step(schedule) for schedule in ("gpipe", "1f1b")}
    results["bad_batch"] = _bad_batch()
    results["timeout"] = _peer_timeout()
    return results


@functools.cache
def _results() -> list[dict[str, Any]]:
    return run_distributed(_run_all, 2, timeout=150)


@pytest.mark.parametrize(("kind", "schedule"), SCENARIOS)
def test_training_matches_one_process(kind: str, schedule: str) -> None:
    for rank, result in enumerate(_results()):
        got = result[f"{kind}-{schedule}"]
        torch.testing.assert_close(got["got"]["losses"], got["expected"]["losses"], rtol=RTOL, atol=0)
        torch.testing.assert_close(got["got"]["norms"], got["expected"]["norms"], rtol=RTOL, atol=0)
        assert got["replicas_identical"]
        for name, (param, expected) in got["params"].items():
            where = f"rank {rank} {name}"
            torch.testing.assert_close(param, expected, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize(("kind", "schedule"), SCENARIOS[::2])
def test_forward_only_matches_one_process(kind: str, schedule: str) -> None:
    for result in _results():
        got, expected, inference = result[f"{kind}-{schedule}"]["eval"]
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(inference, expected, rtol=RTOL, atol=ATOL)


def test_interleaved_ranks_hold_every_other_stage() -> None:
    ranks = [result["gpt-interleaved-1f1b"] for result in _results()]
    # 4 stages of one block on 2 ranks: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    held = [[f"transformer.h.{i}" for i in stages] for stages in ((0, 2), (1, 3))]
    assert [r["owned"] for r in ranks] == held
    for r in ranks:
        assert not any(key.startswith(tuple(f"{name}." for name in r["freed"])) for key in r["state_dict_keys"])


def test_each_rank_holds_only_its_stage() -> None:
    ranks = [result["gpt-1f1b"] for result in _results()]
    assert [r["owned"] for r in ranks] == [[f"transformer.h.{i}" for i in s] for s in ((0, 1), (2, 3))]
    for r in ranks:
        assert not any(key.startswith(tuple(f"{name}." for name in r["freed"])) for key in r["state_dict_keys"])
        assert not any(name.startswith(tuple(r["freed"])) for name in r["params"])
    # Two equal stages: each rank holds the replicated part plus half the trunk, and Adam state to match.
    trunk = sum(r["trunk_param_bytes"] for r in ranks)
    replicated = ranks[0]["param_bytes"] - ranks[0]["trunk_param_bytes"]
    assert trunk + replicated == ranks[0]["reference_param_bytes"]
    for r in ranks:
        assert r["trunk_param_bytes"] == trunk // 2
        assert r["got"]["state_bytes"] == 2 * r["param_bytes"]  # exp_avg and exp_avg_sq of what it holds
        assert r["got"]["state_bytes"] < r["expected"]["state_bytes"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_gradients_are_those_of_the_forward_masks(schedule: str) -> None:
    for result in _results():
        got = result["dropout"][schedule]
        assert got["dropout_changes_loss"]
        assert got["rng_equal_on_ranks"]
        assert got["difference"] == pytest.approx(got["slope"], rel=1e-6)


def test_two_backward_passes_through_one_forward_accumulate_like_one_process() -> None:
    for result in _results():
        assert result["two_backward"]["gpipe"] < 1e-6
        assert result["two_backward"]["1f1b"] < 1e-6


def test_gpipe_keeps_the_forward_and_1f1b_recomputes_it() -> None:
    for result in _results():
        assert result["block_runs"] == {"gpipe": MICRO_BATCHES, "1f1b": 2 * MICRO_BATCHES}


def test_micro_batches_that_do_not_divide_the_batch_are_refused() -> None:
    for result in _results():
        assert "micro_batches=4 does not divide the batch of 6" in result["bad_batch"]


def test_a_peer_waiting_in_a_receive_fails_after_the_group_timeout() -> None:
    absent, waiting = (result["timeout"] for result in _results())
    assert absent == "absent"
    assert waiting.startswith("raised after") and "Timed out" in waiting, waiting
    assert float(waiting.split()[2].rstrip("s:")) < 7.0


class _UnevenTrunk(nn.Module):
    """Four blocks of equal parameter count whose first two also mix the sequence (parameter-free, costly)."""

    class Block(nn.Module):
        def __init__(self, mixes: bool) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.mixes = mixes

        def forward(self, x: Tensor) -> Tensor:
            if self.mixes:
                x = x + (x @ x.transpose(-1, -2)).softmax(-1) @ x
            return x + self.lin(x)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(self.Block(mixes=i < 2) for i in range(4))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_stages_balance_the_blocks_flops_counted_on_the_example() -> None:
    from parti_lightning.parallel.pipeline.cuts import BlockFlops

    model = _UnevenTrunk()
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    flops = BlockFlops(blocks)
    flops.wrap(lambda: model(torch.randn(2, 64, 16)))()
    costs = flops.costs()
    assert costs is not None and costs[0] == costs[1] > 4 * costs[2] and costs[2] == costs[3]
    names = [name for name, _ in blocks]
    assert stage_starts(names, 2) == [0, 2]  # equal parameters: two blocks a stage
    assert stage_starts(names, 2, costs=costs) == [0, 1]  # by FLOPs the first block alone is half the work
    assert BlockFlops(blocks).costs() is None  # nothing ran: parameter counts decide
