"""Tiny models for the pipeline tests: each a stem, a trunk of repeated blocks and a head with its loss.

Written as users write them (a plain loop over the blocks), nothing pipeline-aware.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 48
SEQ = 8


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        # No bias: a key bias has a zero gradient (softmax shift), i.e. rounding noise that Adam scales up.
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim)
        self.heads = heads
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.attn_dropout(att.masked_fill(~mask, float("-inf")).softmax(dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT in miniature: token + position embeddings (tied to the head), dropout, blocks, final norm."""

    def __init__(self, layers: int = 4, dim: int = 16, heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(VOCAB, dim),
                "wpe": nn.Embedding(SEQ, dim),
                "drop": nn.Dropout(dropout),
                "h": nn.ModuleList([GPTBlock(dim, heads, dropout) for _ in range(layers)]),
                "ln_f": nn.LayerNorm(dim),
            }
        )
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        idx, targets = batch
        return F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())


class ShiftedBlock(GPTBlock):
    """A GPT block that also takes a learned tensor computed outside the trunk (as decoder blocks take an encoder's
    output): every block adds to its gradient."""

    def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        return super().forward(x if shift is None else x + shift)


class ShiftedGPT(TinyGPT):
    """TinyGPT whose blocks all take a shift computed from a learned parameter, per sample."""

    def __init__(self, layers: int = 4, dim: int = 16, heads: int = 2) -> None:
        super().__init__(layers, dim, heads)
        self.transformer.h = nn.ModuleList([ShiftedBlock(dim, heads, 0.0) for _ in range(layers)])
        self.shift = nn.Linear(dim, dim)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        shift = self.shift(x.mean(dim=1, keepdim=True))  # (batch, 1, dim): split with the micro-batches
        for block in self.transformer.h:
            x = block(x, shift=shift)
        return self.lm_head(self.transformer.ln_f(x))


class HandingBlock(GPTBlock):
    """T5's pattern: the first block owns a learned position bias, adds it and returns it; later blocks take it."""

    def __init__(self, dim: int, heads: int, first: bool) -> None:
        super().__init__(dim, heads, 0.0)
        self.position_bias = nn.Embedding(SEQ, dim) if first else None

    def forward(self, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.position_bias is not None:
            bias = self.position_bias(torch.arange(x.shape[1], device=x.device))
        assert bias is not None
        return super().forward(x + bias), bias


class HandingGPT(TinyGPT):
    """TinyGPT whose block 0 computes a value every later block takes (its gradient flows back to block 0)."""

    def __init__(self, layers: int = 4, dim: int = 16, heads: int = 2) -> None:
        super().__init__(layers, dim, heads)
        self.transformer.h = nn.ModuleList([HandingBlock(dim, heads, first=i == 0) for i in range(layers)])

    def forward(self, idx: Tensor) -> Tensor:
        x = self.transformer.wte(idx)
        bias = None
        for block in self.transformer.h:
            x, bias = block(x, bias=bias)
        return self.lm_head(self.transformer.ln_f(x))


class TinyViT(nn.Module):
    """A vision-transformer encoder: patch embedding, class token, ``nn.TransformerEncoderLayer`` blocks, head."""

    def __init__(self, layers: int = 4, dim: int = 16, heads: int = 2, patch: int = 4, image: int = 8) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True, bias=False
                )
                for _ in range(layers)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: Tensor) -> Tensor:
        b, c, _, _ = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)


class HFCausalLM(nn.Module):
    """A Llama decoder from transformers, built from a config (no download), wrapped as a user would."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=SEQ,
            attn_implementation="eager",
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(input_ids=idx).logits

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        idx, targets = batch
        return F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())


def build(kind: str, **kwargs: float) -> nn.Module:
    models = {"gpt": TinyGPT, "vit": TinyViT, "hf": HFCausalLM, "shifted": ShiftedGPT, "handing": HandingGPT}
    return models[kind](**kwargs)


def make_batch(kind: str, batch: int, seed: int, device: str = "cpu") -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return torch.randn(batch, 3, 8, 8, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=gen)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
