"""Fast, single-process tests of the character-level GPT example in ``examples/``."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The example is a script folder, not a package: make `char_gpt` importable the way the script and the CLI do.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
char_gpt = importlib.import_module("char_gpt")

# Small enough for a CPU test, large enough to learn something in 20 steps.
TINY = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64}


def _tiny_model(**overrides: object) -> L.LightningModule:
    return char_gpt.CharGPT(**{**TINY, "lr": 3e-3, "warmup_steps": 2, **overrides})


def _trainer(tmp_path: Path, **overrides: object) -> L.Trainer:
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 20,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **overrides,
    }
    return L.Trainer(**kwargs)


def test_corpus_is_shipped_with_its_licence() -> None:
    data = EXAMPLES / "data"
    text_file = char_gpt.DEFAULT_DATA_PATH
    assert text_file.parent == data.resolve()
    assert 100_000 < text_file.stat().st_size <= 1_500_000
    readme = (data / "README.md").read_text(encoding="utf-8")
    assert "Python Software Foundation" in readme
    assert (data / "LICENSE-PSF.txt").is_file()


def test_vocab_is_sorted_and_round_trips() -> None:
    vocab = char_gpt.load_vocab()
    text = char_gpt.read_text()
    assert vocab.chars == "".join(sorted(set(text)))
    assert len(vocab) == len(set(vocab.chars))
    sample = text[:5000]
    ids = vocab.encode(sample)
    assert all(0 <= i < len(vocab) for i in ids)
    assert vocab.decode(ids) == sample
    assert vocab.decode(torch.tensor(ids)) == sample
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("\x00")


def test_datamodule_builds_deterministic_shifted_windows() -> None:
    dm = char_gpt.CharDataModule(block_size=32, batch_size=4, seed=7)
    dm.setup("fit")
    assert dm.vocab_size == len(char_gpt.load_vocab())
    num_chars = len(char_gpt.read_text())
    train_chars = int(num_chars * 0.9)
    assert len(dm.train_set) == train_chars // 32
    # validation windows tile the held-out tail without overlap
    assert len(dm.val_set) == (num_chars - train_chars - 1) // 32
    assert torch.equal(dm.val_set.offsets, torch.arange(len(dm.val_set)) * 32)

    x, y = dm.train_set[3]
    assert x.shape == y.shape == (32,)
    assert x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])  # targets are the inputs shifted by one character

    # Same seed -> same windows: every rank of a distributed run builds the identical dataset.
    again = char_gpt.CharDataModule(block_size=32, batch_size=4, seed=7)
    again.setup("fit")
    assert torch.equal(again.train_set.offsets, dm.train_set.offsets)

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == yb.shape == (4, 32)


def test_model_records_vocab_size_and_forward_shape() -> None:
    model = _tiny_model()
    vocab_size = len(char_gpt.load_vocab())
    assert model.hparams.vocab_size == vocab_size
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == TINY["n_layer"]
    idx = torch.randint(0, vocab_size, (3, 17))
    assert model(idx).shape == (3, 17, vocab_size)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, TINY["block_size"] + 1, dtype=torch.long))


def test_forward_is_causal() -> None:
    model = _tiny_model().eval()
    idx = torch.randint(0, model.hparams.vocab_size, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % model.hparams.vocab_size
    with torch.no_grad():
        # changing later characters must not change the predictions at earlier positions
        torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10])


def test_warmup_cosine_schedule() -> None:
    lr = [char_gpt.warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(120)]
    assert lr[0] == pytest.approx(0.1)
    assert lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.55)
    assert lr[110] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[10:-1], lr[11:], strict=True))


def test_training_on_the_corpus_reduces_loss(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = char_gpt.CharDataModule(block_size=TINY["block_size"], batch_size=16)
    dm.setup("fit")
    x, y = (torch.stack(t) for t in zip(*(dm.val_set[i] for i in range(16)), strict=True))
    model = _tiny_model()

    def held_out_loss() -> float:
        with torch.no_grad():
            return model._loss(model(x), y).item()

    before = held_out_loss()
    assert before == pytest.approx(math.log(model.hparams.vocab_size), abs=0.3)  # an untrained model guesses uniformly
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 20
    after = held_out_loss()
    assert after < before - 0.8, (before, after)


def test_validation_metrics_agree(tmp_path: Path) -> None:
    dm = char_gpt.CharDataModule(block_size=TINY["block_size"], batch_size=16)
    model = _tiny_model()
    trainer = _trainer(tmp_path, limit_val_batches=3)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert set(metrics) >= {"val_loss", "val_ppl", "val_acc"}
    # perplexity is exp(mean per-character loss), and both are averaged over the same characters
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-3)
    assert 0.0 <= metrics["val_acc"] <= 1.0


def test_block_size_mismatch_is_caught(tmp_path: Path) -> None:
    dm = char_gpt.CharDataModule(block_size=128, batch_size=2)
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        _trainer(tmp_path, max_steps=1).fit(_tiny_model(), datamodule=dm)


def test_generate_returns_requested_length_over_vocab() -> None:
    model = _tiny_model()
    vocab = set(char_gpt.load_vocab().chars)
    # longer than block_size, so the context window has to slide
    text = model.generate("The ", max_new_tokens=TINY["block_size"] + 30, temperature=0.8)
    assert isinstance(text, str) and len(text) == TINY["block_size"] + 30
    assert set(text) <= vocab
    assert model.training  # generate restores the mode it found

    first = model.generate("x", 25, top_k=5, generator=torch.Generator().manual_seed(3))
    second = model.generate("x", 25, top_k=5, generator=torch.Generator().manual_seed(3))
    assert first == second and len(first) == 25
    assert model.generate("", 0) == ""
    with pytest.raises(ValueError, match="temperature"):
        model.generate("x", 5, temperature=0.0)


def test_progress_bar_names_the_last_step_when_training_by_steps() -> None:
    # Lightning's own bar says "Epoch 9/-2" when only max_steps is set (max_epochs=-1).
    train = importlib.import_module("train_char_gpt")
    bar = train.StepProgressBar()
    bar.setup(L.Trainer(max_steps=500, logger=False, enable_checkpointing=False, callbacks=[bar]), None, "fit")
    assert bar._get_train_description(9).strip() == "Epoch 9 (training to step 500)"
    bar.setup(L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, callbacks=[bar]), None, "fit")
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
