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
