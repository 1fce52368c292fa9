"""A checkpoint carrying pickled code is refused, and the code never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch

from parti_lightning import PartiStrategy

from scenarios import ToyRegressor


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("weights_only", [None, False])
def test_malicious_checkpoint_is_refused_before_its_code_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_only: bool | None
) -> None:
    # torch's own default (weights_only=True) is what an environment like this one turns off; parti
    # must refuse the payload even then.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.ckpt"
    state = ToyRegressor().state_dict()
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0, "payload": _Payload(str(marker))}, checkpoint,
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    trainer = L.Trainer(strategy=PartiStrategy(), accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit(ToyRegressor(), ckpt_path=checkpoint, weights_only=weights_only)
    assert not marker.exists(), "the checkpoint's payload ran"
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("carrier", ["index", "meta", "bytes entry"])
def test_malicious_sharded_checkpoint_is_refused_before_its_code_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, carrier: str
) -> None:
    """The payload rides in DCP's `.metadata` index (read by DCP with plain pickle), in parti's `meta.pt`, or as a
    non-tensor DCP entry (which DCP would unpickle with weights_only=False)."""
    import torch.distributed.checkpoint as dcp

    from parti_lightning.checkpoint import save_sharded
    from parti_lightning.convert import convert

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.ckpt"
    save_sharded(checkpoint, {"state_dict": ToyRegressor().state_dict(), "epoch": 0, "global_step": 0}, {})
    if carrier == "index":
        (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    elif carrier == "meta":
        torch.save({"parti": {"format": "parti-sharded/1"}, "payload": _Payload(str(marker))}, checkpoint / "meta.pt")
    else:
        dcp.save({"model": {"x": _Payload(str(marker))}}, checkpoint_id=checkpoint, no_dist=True)
    with pytest.raises(pickle.UnpicklingError):
        convert(checkpoint, tmp_path / "out.ckpt")
    trainer = L.Trainer(strategy=PartiStrategy(), accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        with pytest.raises(pickle.UnpicklingError):
            trainer.fit(ToyRegressor(), ckpt_path=checkpoint)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    assert not marker.exists(), "the checkpoint's payload ran"
