"""One model of each zoo category trained through ``Trainer(strategy=PartiStrategy(plan=...), devices=2)``.

Run as a script (``python tests/helpers/zoo_run.py OUT``), every case trains in one launch of 2 processes
(later Trainers reuse the process group), and each rank saves ``OUT/<case>.rank<r>.pt``: the gathered state
dict after training, the logged losses, and the bytes of the blocks' parameters this rank holds. The tests
(``tests/test_zoo.py``) train the same module in one process and compare.

The models are built as their library ships them (caches on, tied heads, routers, sliding windows), with
dropout probabilities zeroed where a case compares numbers (``dropout=False``): a tensor-parallel split
activation or a pipeline micro-batch draws its own masks by design, so numbers with dropout cannot match one
process. The ``*_shipped_dropout`` case trains with the library's dropout and is checked for splitting only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from zoo import ZOO

SEED = 4321
BATCH = 8
STEPS = 3


@dataclass(frozen=True)
class ZooCase:
    name: str
    model: str
    plan: str
    dropout: bool = False
    # Resumed from the checkpoint another case wrote (under its plan), then trained as many steps again; the
    # reference resumes from the same file in one process.
    resume_from: str | None = None

    @property
    def steps(self) -> int:
        return 2 * STEPS if self.resume_from else STEPS


# One model per category under tensor=2; pipeline=2 where the trunk contract holds.
CASES = [
    ZooCase("llama_tp", "llama", "tp"),
    ZooCase("llama_pp", "llama", "pp"),
    ZooCase("gemma2_pp", "gemma2", "pp"),  # a sliding-window mask on some layers, a full one on the others
    ZooCase("mixtral_tp", "mixtral", "tp"),
    ZooCase("mixtral_pp", "mixtral", "pp"),
    ZooCase("t5_tp", "t5", "tp"),
    ZooCase("t5_pp", "t5", "pp"),  # block 0's position bias carried to the later blocks, across stages
    ZooCase("t5_tp_resumed_from_pp", "t5", "tp", resume_from="t5_pp"),  # a checkpoint resumed under another plan
    ZooCase("llama_tp_resumed_from_pp", "llama", "tp", resume_from="llama_pp"),
    # Two trunks, each split over both ranks; the decoder's blocks take the encoder's output.
    ZooCase("bart_pp", "bart", "pp"),
    ZooCase("bert_tp", "bert", "tp"),
    ZooCase("bert_pp", "bert", "pp"),
    ZooCase("vit_tp", "vit", "tp"),
    ZooCase("vit_pp", "vit", "pp"),
    ZooCase("resnet_tp", "resnet", "tp"),
    ZooCase("torch_encoder_tp", "torch_encoder", "tp"),
    ZooCase("bert_tp_shipped_dropout", "bert", "tp", dropout=True),
]


class Samples(Dataset):
    """The zoo entry's batch of ``n`` samples, one sample per index (the default collate stacks them again)."""

    def __init__(self, model: str, n: int = BATCH * STEPS) -> None:
        self.batch = ZOO[model].batch(seed=0, batch_size=n)

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


class ZooModule(L.LightningModule):
    """A user's LightningModule around a zoo model: the loss the model computes, AdamW."""

    def __init__(self, model: str, dropout: bool) -> None:
        super().__init__()
        self.net = ZOO[model].build(dropout=dropout)
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.net(batch)
        self.log("train_loss", loss)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # One foreach kernel over every parameter, as many users ask for: it must take sharded (DTensor) and whole
        # parameters in one list (tensor splits, pipeline's sharded embeddings beside a stage's whole blocks).
        return torch.optim.AdamW(self.parameters(), lr=1e-3, foreach=True)


def fit(case: ZooCase, strategy: Any, devices: int, ckpt_path: str | None = None) -> tuple[L.Trainer, ZooModule]:
    L.seed_everything(SEED, verbose=False)
    module = ZooModule(case.model, case.dropout)
    trainer = L.Trainer(
        max_steps=case.steps, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # Every case has one data-parallel rank (tensor and pipeline ranks see the same batch): the loader's own
        # order on every rank, as in one process.
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(Samples(case.model), batch_size=BATCH), ckpt_path=ckpt_path)
    return trainer, module


def block_bytes(case: ZooCase, module: ZooModule) -> int:
    """Bytes of the repeated blocks' parameters this rank holds (a DTensor by its local shard; freed: none)."""
    from torch.distributed.tensor import DTensor

    from parti_lightning.parallel.blocks import find_blocks

    with torch.device("meta"):  # the blocks of the module as built: a pipeline stage freed the others' here
        names = [name for name, _ in find_blocks(ZooModule(case.model, case.dropout))]
    held = [p for n, p in module.named_parameters() if any(n.startswith(f"{b}.") for b in names)]
    local = [p.to_local() if isinstance(p, DTensor) else p for p in held]
    return sum(t.numel() * t.element_size() for t in local)


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of all the parameters this rank holds (a DTensor by its local shard; a freed block: none)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in module.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def generate_after_fit(case: ZooCase, module: ZooModule) -> list[list[int]] | None:
    """Greedy decoding with the trained decoder (its cache now carries keys and values between steps)."""
    if ZOO[case.model].category not in ("decoder", "moe"):
        return None
    prompt = ZOO[case.model].batch(seed=1, batch_size=2)["input_ids"][:, :4]
    with torch.no_grad():
        tokens = module.net.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                           do_sample=False)
    return tokens.tolist()


def main(out: str) -> None:
    from parti_lightning import PartiStrategy

    os.makedirs(out, exist_ok=True)
    for case in CASES:
        resume = os.path.join(out, f"{case.resume_from}.ckpt") if case.resume_from else None
        trainer, module = fit(case, PartiStrategy(plan=case.plan, state_dict_type="full"), devices=2, ckpt_path=resume)
        state = trainer.strategy.lightning_module_state_dict()
        result = {
            "state": {k: v.detach().clone() for k, v in state.items()},
            "losses": module.losses,
            "block_bytes": block_bytes(case, module),
            "model_bytes": model_bytes(module),
            "generated": generate_after_fit(case, module) if case.plan == "tp" else None,
        }
        torch.save(result, os.path.join(out, f"{case.name}.rank{trainer.global_rank}.pt"))
        # A plain Lightning checkpoint written under the plan: what resumes under any other plan.
        trainer.save_checkpoint(os.path.join(out, f"{case.name}.ckpt"))


if __name__ == "__main__":
    main(sys.argv[1])
