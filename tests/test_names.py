"""The one parameter-name map: tied parameters are named once, as torch's checkpoint functions name them."""

from __future__ import annotations

import torch
from torch import nn

from parti_lightning.checkpoint import named_optimizer_state
from parti_lightning.parallel.full_state import load_full_optimizer_state_dict
from parti_lightning.parallel.names import optimizer_parameter_names, parameter_names


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embedding.weight  # as nanoGPT and GPT-2 tie them

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embedding(tokens)))


def _trained() -> tuple[Tied, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_tied_parameter_has_its_first_name() -> None:
    model, optimizer = _trained()
    assert list(parameter_names(model).values()) == ["embedding.weight", "mix.weight", "mix.bias"]
    assert optimizer_parameter_names(model, optimizer) == ["embedding.weight", "mix.weight", "mix.bias"]


def test_positional_state_of_tied_weights_resumes_with_their_state() -> None:
    # A Lightning (torch, positional) optimizer state, as a stock `ddp` checkpoint holds it.
    model, optimizer = _trained()
    positional = optimizer.state_dict()
    named = named_optimizer_state(positional, model, optimizer)
    assert set(named["state"]) == {"embedding.weight", "mix.weight", "mix.bias"}
    fresh, _ = _trained()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_full_optimizer_state_dict(fresh, fresh_optimizer, named)
    tied = fresh_optimizer.state[fresh.embedding.weight]
    torch.testing.assert_close(tied["exp_avg"], optimizer.state[model.embedding.weight]["exp_avg"])
