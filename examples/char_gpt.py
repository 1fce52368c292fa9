"""A small GPT-style character language model, written as a plain Lightning module.

Nothing in this file knows about parti-lightning: the point of the example is that an ordinary
``LightningModule`` / ``LightningDataModule`` pair trains unmodified under ``strategy="parti"``.

The corpus is ``data/python_docs.txt`` (the Python reference documentation shipped with CPython
in ``pydoc_data/topics.py``; see ``data/README.md``). The character vocabulary is derived from that
file by :func:`load_vocab`, which both the model and the data module call, so that a YAML config for
LightningCLI does not need to pass the vocabulary size from one to the other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "data" / "python_docs.txt"


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: id ``i`` is the ``i``-th character of ``chars``.

    Attributes:
        chars: every character of the vocabulary, sorted, without repetition.
    """

    chars: str
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # frozen dataclass: the lookup table has to be set through object.__setattr__
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Maps text to ids; raises ``ValueError`` naming the characters outside the vocabulary."""
        unknown = sorted(set(text) - self._index.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return [self._index[c] for c in text]

    def decode(self, ids: list[int] | Tensor) -> str:
        """Maps ids back to text."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)


def resolve_data_path(path: str | Path | None) -> Path:
    """The corpus to use: ``path`` if given, else the text file shipped next to this module."""
    return DEFAULT_DATA_PATH if path is None else Path(path).expanduser().resolve()


@functools.lru_cache(maxsize=8)
def _read_text_cached(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def read_text(path: str | Path | None = None) -> str:
    """Reads the corpus (cached, since the model and the data module both need it)."""
    return _read_text_cached(resolve_data_path(path))


def load_vocab(path: str | Path | None = None) -> CharVocab:
    """The vocabulary of a corpus: its sorted set of characters, so ids are deterministic across runs and ranks."""
    return CharVocab("".join(sorted(set(read_text(path)))))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class WindowDataset(Dataset[tuple[Tensor, Tensor]]):
    """Fixed-length windows of a token stream, each paired with the same window shifted by one.

    The set of windows is fixed at construction (``offsets``), so the dataset is an ordinary map-style
    dataset that a ``DistributedSampler`` can split between ranks.

    Args:
        tokens: 1-D tensor of token ids.
        offsets: start index of every window.
        block_size: length of a window.
    """

    def __init__(self, tokens: Tensor, offsets: Tensor, block_size: int) -> None:
        if offsets.numel() and int(offsets.max()) + block_size + 1 > tokens.numel():
            raise ValueError("a window would run past the end of the token stream")
        self.tokens = tokens
        self.offsets = offsets
        self.block_size = block_size

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = int(self.offsets[index])
        chunk = self.tokens[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharDataModule(L.LightningDataModule):
    """Character-level windows of a text file, split 90/10 into training and validation text.

    Training windows start at random (but seeded, hence identical on every rank) offsets; validation
    windows tile the validation text without overlap, so each validation pass sees all of it once.

    Args:
        data_path: text file to read; ``None`` for the Python documentation shipped in ``data/``.
        block_size: characters per window; must not exceed the model's ``block_size``.
        batch_size: windows per batch, per process.
        val_fraction: fraction of the text (its tail) held out for validation.
        train_windows: number of training windows per epoch; ``None`` for about one pass over the
            training text (its length divided by ``block_size``).
        num_workers: ``DataLoader`` workers. Slicing a tensor is cheap, so 0 is right on small machines.
        seed: seed of the training window offsets.
    """

    def __init__(
        self,
        data_path: str | None = None,
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        train_windows: int | None = None,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.vocab = load_vocab(data_path)
        self.train_set: WindowDataset | None = None
        self.val_set: WindowDataset | None = None

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters in the corpus."""
        return len(self.vocab)

    @property
    def block_size(self) -> int:
        """Characters per window."""
        return self.hparams.block_size

    def setup(self, stage: str | None = None) -> None:
        """Encodes the text and builds the training and validation windows (idempotent)."""
        if self.train_set is not None:
            return
        text = read_text(self.hparams.data_path)
        tokens = torch.tensor(self.vocab.encode(text), dtype=torch.long)
        split = int(len(tokens) * (1.0 - self.hparams.val_fraction))
        train_tokens, val_tokens = tokens[:split], tokens[split:]
        self.train_set = WindowDataset(train_tokens, self._train_offsets(len(train_tokens)), self.block_size)
        self.val_set = WindowDataset(val_tokens, self._val_offsets(len(val_tokens)), self.block_size)

    def _train_offsets(self, num_tokens: int) -> Tensor:
        last_start = num_tokens - self.block_size - 1
        if last_start < 0:
            raise ValueError(f"training text ({num_tokens} chars) is shorter than one window")
        count = self.hparams.train_windows or max(1, num_tokens // self.block_size)
        # A private generator: the offsets must not depend on (or disturb) the global RNG state,
        # so every rank builds exactly the same dataset before the sampler splits it.
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return torch.randint(0, last_start + 1, (count,), generator=generator)

    def _val_offsets(self, num_tokens: int) -> Tensor:
        last_start = num_tokens - self.block_size - 1
        if last_start < 0:
            raise ValueError(f"validation text ({num_tokens} chars) is shorter than one window")
        return torch.arange(0, last_start + 1, self.block_size)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        # drop_last keeps every optimizer step on a full batch (and equal batch counts on all ranks)
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Query, key and value are separate projections, and heads are counted from the tensor shapes
    (``view(B, T, -1, head_dim)``) rather than from ``n_head``, so the layer keeps working when a
    tensor-parallel strategy shards the projections column-wise and each rank holds a subset of heads.

    Args:
        n_embd: model width.
        n_head: number of heads; must divide ``n_embd``.
        dropout: dropout on the attention weights and the output.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.q_proj = nn.Linear(n_embd, n_embd)
        self.k_proj = nn.Linear(n_embd, n_embd)
        self.v_proj = nn.Linear(n_embd, n_embd)
        self.out_proj = nn.Linear(n_embd, n_embd)
        self.out_dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.out_dropout(self.out_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward layer, 4x wide with GELU."""

    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    Args:
        n_embd: model width.
        n_head: number of attention heads.
        dropout: dropout probability.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(L.LightningModule):
    """A small causal transformer over characters.

    Token and position embeddings, ``n_layer`` identical :class:`Block` modules in an ``nn.ModuleList``,
    a final LayerNorm and a linear head. The embedding and the head are deliberately not tied, so the
    module has no parameter shared between its first and last layers (which would tie together the
    first and last stages of a pipeline split).

    Args:
        vocab_size: number of token ids; ``None`` to take it from the corpus vocabulary (the usual case).
            Only a model whose ``vocab_size`` matches the corpus can :meth:`generate` text.
        data_path: corpus whose vocabulary the model uses; ``None`` for the shipped one.
        block_size: longest context, in characters.
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        dropout: dropout probability.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices and embeddings only.
        betas: AdamW betas.
        warmup_steps: steps of linear warm-up before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        data_path: str | None = None,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab = load_vocab(data_path)
        self.save_hyperparameters()
        if vocab_size is None:
            vocab_size = len(self.vocab)
            # Record the concrete size, so a checkpoint states the shape of its embedding and head.
            self.hparams.vocab_size = vocab_size

        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self._init_weights(n_layer)

        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()
        self.val_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro")

    def _init_weights(self, n_layer: int) -> None:
        # GPT-2 initialisation: N(0, 0.02), with the projections that write into the residual stream
        # scaled down by sqrt(2 * n_layer) so its variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("out_proj.weight", "mlp.proj.weight")) else 0.02
                nn.init.normal_(param, mean=0.0, std=std)

    def setup(self, stage: str) -> None:
        # LightningCLI cannot link the two block sizes from YAML, so catch a mismatch before it fails mid-run.
        datamodule = getattr(self.trainer, "datamodule", None)
        data_block = getattr(datamodule, "block_size", None)
        if data_block is not None and data_block > self.hparams.block_size:
            raise ValueError(
                f"data block_size ({data_block}) exceeds the model's block_size ({self.hparams.block_size})"
            )

    def forward(self, idx: Tensor) -> Tensor:
        """Logits of the next character at every position: ``(B, T)`` ids -> ``(B, T, vocab_size)``."""
        t = idx.size(1)
        if t > self.hparams.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.hparams.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @staticmethod
    def _loss(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        # Weighted by the number of predicted characters, so a short last batch counts for what it is.
        self.val_loss.update(loss, weight=y.numel())
        self.val_ppl.update(logits, y)
        self.val_acc.update(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        # torchmetrics objects synchronise their own state across processes when computed;
        # sync_dist is passed for uniformity and is a no-op for them.
        self.log("val_loss", self.val_loss, prog_bar=True, sync_dist=True)
        self.log("val_ppl", self.val_ppl, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        # Decay matrices and embeddings; leave biases and LayerNorm parameters alone.
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = functools.partial(
            warmup_cosine, warmup_steps=hp.warmup_steps, total_steps=total_steps, min_ratio=hp.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def generate(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """Samples a continuation of ``prompt``, one character at a time.

        Args:
            prompt: text to continue; its characters must be in the vocabulary. Empty means a newline.
            max_new_tokens: number of characters to generate.
            temperature: softmax temperature; lower is more conservative. Must be positive.
            top_k: if given, sample only among the ``top_k`` most likely characters.
            generator: random generator, for reproducible samples.

        Returns:
            The generated continuation alone (exactly ``max_new_tokens`` characters), without the prompt.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if self.hparams.vocab_size != len(self.vocab):
            raise ValueError("this model's vocab_size does not match its corpus vocabulary; it cannot decode text")
        was_training = self.training
        self.eval()
        try:
            device = self.lm_head.weight.device
            idx = torch.tensor([self.vocab.encode(prompt or "\n")], dtype=torch.long, device=device)
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.hparams.block_size :])[:, -1, :] / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(device)
                idx = torch.cat([idx, next_id], dim=1)
        finally:
            self.train(was_training)
        return self.vocab.decode(idx[0, idx.size(1) - max_new_tokens :])


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
