"""Tier 3 on the models people bring: one model of each zoo category through the Trainer under tensor=2 and
pipeline=2, against the same module trained in one process (``benchmarks/model_zoo.py`` runs every model and
plan without the Trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoo_run import CASES, STEPS, ZooCase, block_bytes, fit, generate_after_fit, model_bytes

from launch import check, run_script

# After 3 AdamW steps (lr 1e-3) from the same weights. Split matrices reorder sums (~1e-7 relative), and Adam
# turns a gradient that is rounding noise (a key projection's bias, exactly zero in exact arithmetic) into an
# update of up to lr per step in a random direction: seen 6e-5. A wrong layout moves most weights by ~lr.
RTOL, ATOL = 1e-4, 1e-4
# Blocks' parameters one rank holds against one process: half, plus what stays whole (norms, rowwise biases,
# a router). Conv nets train replicated under tensor parallel.
CEILING = {"resnet_tp": 1.0}


@pytest.fixture(scope="module")
def zoo_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    check(run_script(["tests/helpers/zoo_run.py", str(out)], timeout=500))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo_model_trains_split_as_one_process(zoo_results: Path, case: ZooCase) -> None:
    ranks = [torch.load(zoo_results / f"{case.name}.rank{r}.pt", weights_only=True) for r in range(2)]
    # A resumed case is compared with one process resuming from the same checkpoint (Lightning's own resume
    # is not step-for-step an uninterrupted run: measured, stock Lightning alike).
    resume = str(zoo_results / f"{case.resume_from}.ckpt") if case.resume_from else None
    _, reference = fit(case, "auto", devices=1, ckpt_path=resume)
    whole = block_bytes(case, reference)
    for rank in ranks:
        # Really held less (or, for a conv net, trained replicated): counted from the tensors on each rank.
        assert rank["block_bytes"] <= CEILING.get(case.name, 0.55) * whole, (rank["block_bytes"], whole)
    if case.plan == "pp":  # the embeddings and head too: sharded over the pipeline ranks, not whole on each
        model = model_bytes(reference)
        assert all(rank["model_bytes"] <= 0.55 * model for rank in ranks), ([r["model_bytes"] for r in ranks], model)
    if case.dropout:  # split activations draw their own masks: trained, not compared
        assert all(torch.isfinite(torch.tensor(rank["losses"])).all() for rank in ranks)
        return
    if ranks[0]["generated"] is not None:  # generate() after fit under tensor parallel decodes as one process does
        assert [rank["generated"] for rank in ranks] == [generate_after_fit(case, reference)] * 2
    # The last STEPS: the strategy's setup check may have run one example step of the module first.
    assert ranks[0]["losses"][-STEPS:] == pytest.approx(reference.losses[-STEPS:], rel=RTOL)
    expected = reference.state_dict()
    assert ranks[0]["state"].keys() == expected.keys()
    checkpoint = torch.load(zoo_results / f"{case.name}.ckpt", weights_only=True)["state_dict"]
    for key in expected:  # the checkpoint written under the plan holds the same weights
        torch.testing.assert_close(checkpoint[key], ranks[0]["state"][key], rtol=0, atol=0)
    for key, value in expected.items():
        got = ranks[0]["state"][key]
        torch.testing.assert_close(got, value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


def test_a_conv_net_is_refused_under_pipeline_before_any_process_starts() -> None:
    """A ResNet's stages change the activation's shape: no pipeline; said before launch (its code reads values,
    so the dry run is on a real copy, not on meta tensors)."""
    import lightning as L
    from torch.utils.data import DataLoader
    from zoo_run import Samples, ZooModule

    from parti_lightning import PartiStrategy

    module = ZooModule("resnet", dropout=False)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy=PartiStrategy(plan="pp"), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"stages\.1' returns a \(8, 32, 4, 4\) .* hidden state of a \(8, 16, 8, 8\)"):
        trainer.fit(module, train_dataloaders=DataLoader(Samples("resnet"), batch_size=8))
    assert not torch.distributed.is_initialized()  # rank 0 joins a process group as soon as the ranks start
