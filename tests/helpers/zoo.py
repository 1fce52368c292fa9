"""A zoo of tiny third-party models, each wrapped the way a user's ``LightningModule`` would compute its loss.

Every entry builds a model from a config (nothing is downloaded): Hugging Face ``transformers`` architectures at
the library's shipped defaults except for the sizes (hidden 32-64, 2-4 layers, vocabulary 128, sequence 16),
plus torch's own ``nn.TransformerEncoder``. Nothing is turned off: ``use_cache``, tied heads, sliding windows,
routers and the default attention implementation (``"sdpa"``) stay as shipped. The one exception is opt-in:
``build(dropout=False)`` zeroes every dropout probability of the config, so that a run can be compared
numerically with a single process (dropout masks differ by design between a data-parallel shard and a whole
batch, and between a tensor-parallel split and a whole layer).

A wrapper's ``forward(batch)`` returns the scalar loss, as ``training_step`` would compute it:

- decoders and mixtures of experts: ``model(input_ids=..., attention_mask=..., labels=input_ids).loss``;
- encoder-decoders: ``model(input_ids=..., attention_mask=..., labels=...).loss`` (decoder inputs from the labels);
- encoders, ViT, ResNet: a classification head, ``labels=`` -> cross entropy;
- ``torch_encoder``: embedding, causal ``nn.TransformerEncoder``, linear head, cross entropy on the next token.

Sizes: heads divisible by 2, every hidden and intermediate size divisible by 2 and 4, so that a tensor
degree of 2 or 4 splits them evenly.

    from zoo import ZOO
    entry = ZOO["llama"]
    module = entry.build()
    loss = module(entry.batch(seed=0, batch_size=8))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 128
SEQ = 16
NUM_LABELS = 4
IMAGE = 16  # ViT: 16 x 16 pixels in 4 x 4 patches
RESNET_IMAGE = 32
CATEGORIES = ("decoder", "moe", "encoder-decoder", "encoder", "vision", "conv", "torch")
# Token ids below this are left out of random batches: they are special tokens (pad, bos, eos) in some configs,
# and RoBERTa's positions skip padding.
_FIRST_ORDINARY_TOKEN = 4

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo.

    Attributes:
        name: registry key.
        category: one of :data:`CATEGORIES`.
        features: what the architecture exercises (short text).
        make: builds the wrapped model; takes ``dropout`` (``False``: every dropout probability zeroed).
        make_batch: ``(generator, batch_size) -> batch``.
    """

    name: str
    category: str
    features: str
    make: Callable[[bool], nn.Module]
    make_batch: Callable[[torch.Generator, int], Batch]

    def build(self, dropout: bool = True) -> nn.Module:
        """The model wrapped with its loss, initialised from torch's global random state.

        Args:
            dropout: ``True`` (the default): the library's shipped dropout; ``False``: every dropout
                probability of the config set to 0 (for numerical comparisons; nothing else changes).
        """
        return self.make(dropout)

    def batch(self, seed: int, batch_size: int) -> Batch:
        """A batch of ``batch_size`` samples, the same for the same ``seed`` (a dict of CPU tensors)."""
        return self.make_batch(torch.Generator().manual_seed(seed), batch_size)


# ------------------------------------------------------------------------------------------ wrappers


class HfLoss(nn.Module):
    """A Hugging Face model inside a user's module: the loss the model computes from ``labels=``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        return self.model(**batch).loss


class TorchEncoderLM(nn.Module):
    """Torch's own ``nn.TransformerEncoder`` (shipped defaults, batch first) between an embedding and a head."""

    def __init__(self, dropout: bool, width: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(SEQ, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, batch_first=True,
                                           **({} if dropout else {"dropout": 0.0}))
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, batch: Batch) -> Tensor:
        idx = batch["input_ids"]
        inputs, targets = idx[:, :-1], idx[:, 1:]
        t = inputs.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        x = self.embed(inputs) + self.pos[:t]
        x = self.encoder(x, mask=mask, is_causal=True)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


# ------------------------------------------------------------------------------------------ batches


def _tokens(generator: torch.Generator, batch_size: int, length: int = SEQ) -> Tensor:
    return torch.randint(_FIRST_ORDINARY_TOKEN, VOCAB, (batch_size, length), generator=generator)


def _causal_lm_batch(generator: torch.Generator, batch_size: int) -> Batch:
    ids = _tokens(generator, batch_size)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _seq2seq_batch(generator: torch.Generator, batch_size: int) -> Batch:
    ids = _tokens(generator, batch_size)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _tokens(generator, batch_size)}


def _classification_batch(generator: torch.Generator, batch_size: int) -> Batch:
    ids = _tokens(generator, batch_size)
    labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _image_batch(size: int) -> Callable[[torch.Generator, int], Batch]:
    def make(generator: torch.Generator, batch_size: int) -> Batch:
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        return {"pixel_values": pixels, "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)}

    return make


def _token_batch(generator: torch.Generator, batch_size: int) -> Batch:
    return {"input_ids": _tokens(generator, batch_size)}


# ------------------------------------------------------------------------------------------ builders


def _zero_dropout(config: Any) -> None:
    """Every float dropout probability of ``config`` (``*dropout*``, ``*pdrop*``) set to 0."""
    for key, value in list(vars(config).items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


def _hf(config_class: str, model_class: str, **config: Any) -> Callable[[bool], nn.Module]:
    """A builder of ``model_class(config_class(**config))`` wrapped in :class:`HfLoss`."""

    def make(dropout: bool) -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_class)(**config)
        if not dropout:
            _zero_dropout(cfg)
        return HfLoss(getattr(transformers, model_class)(cfg))

    return make


# Shared sizes of the decoders: hidden 64, 4 query heads of 16, 2 key/value heads, MLP 128, 2 layers.
_DECODER = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64}
_GQA = {"num_key_value_heads": 2}
_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_ENCODER = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "num_labels": NUM_LABELS}


def _entries() -> list[ZooEntry]:
    lm, s2s, cls = _causal_lm_batch, _seq2seq_batch, _classification_batch
    return [
        # ---------------------------------------------------------------- decoders
        ZooEntry("llama", "decoder", "rotary, GQA, SwiGLU, RMSNorm; 4 layers",
                 _hf("LlamaConfig", "LlamaForCausalLM", **{**_DECODER, "num_hidden_layers": 4}, **_GQA, **_TOKENS), lm),
        ZooEntry("qwen3", "decoder", "q/k norm, GQA, rotary",
                 _hf("Qwen3Config", "Qwen3ForCausalLM", **_DECODER, **_GQA, **_TOKENS, head_dim=16), lm),
        ZooEntry("mistral", "decoder", "sliding window (8 of 16 tokens), GQA",
                 _hf("MistralConfig", "MistralForCausalLM", **_DECODER, **_GQA, **_TOKENS, head_dim=16,
                     sliding_window=8), lm),
        ZooEntry("gemma2", "decoder",
                 "alternating sliding (8)/full layers, softcapping, tied head, eager attention (its default); 4 layers",
                 _hf("Gemma2Config", "Gemma2ForCausalLM", **{**_DECODER, "num_hidden_layers": 4}, **_GQA, **_TOKENS,
                     head_dim=16, sliding_window=8), lm),
        ZooEntry("phi3", "decoder", "fused qkv, fused gate_up",
                 _hf("Phi3Config", "Phi3ForCausalLM", **_DECODER, **_GQA, **_TOKENS), lm),
        ZooEntry("falcon", "decoder", "fused qkv, multi-query, parallel attention+MLP, tied head",
                 _hf("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, **_TOKENS), lm),
        ZooEntry("gpt_bigcode", "decoder", "fused qkv (Linear), multi-query, learned positions, tied head",
                 _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_positions=64, n_embd=64,
                     n_layer=2, n_head=4, **_TOKENS), lm),
        ZooEntry("gpt_neox", "decoder", "parallel residual, partial rotary, fused qkv",
                 _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DECODER, **_TOKENS), lm),
        ZooEntry("opt", "decoder", "learned positions (offset 2), tied head",
                 _hf("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=64, ffn_dim=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                     word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2, eos_token_id=2), lm),
        ZooEntry("gpt2", "decoder", "Conv1D (transposed weights), fused qkv, learned positions, tied head; 4 layers",
                 _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=4,
                     n_head=4, bos_token_id=1, eos_token_id=2), lm),
        # ---------------------------------------------------------------- mixtures of experts
        ZooEntry("mixtral", "moe", "4 experts top-2 (fused 3-D expert weights), GQA, rotary",
                 _hf("MixtralConfig", "MixtralForCausalLM", **_DECODER, **_GQA, **_TOKENS, num_local_experts=4,
                     num_experts_per_tok=2), lm),
        ZooEntry("qwen2_moe", "moe", "4 experts top-2 + shared expert with gate, GQA",
                 _hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_DECODER, **_GQA, **_TOKENS, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128), lm),
        ZooEntry("olmoe", "moe", "4 experts top-2, q/k norm",
                 _hf("OlmoeConfig", "OlmoeForCausalLM", **_DECODER, **_GQA, **_TOKENS, num_experts=4,
                     num_experts_per_tok=2), lm),
        # ---------------------------------------------------------------- encoder-decoders
        ZooEntry("t5", "encoder-decoder", "relative position bias (block 0 owns it), two trunks, tied head",
                 _hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128,
                     num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0), s2s),
        ZooEntry("bart", "encoder-decoder", "learned positions, two trunks, cross-attention, tied head",
                 _hf("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=64, encoder_layers=2,
                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2), s2s),
        # ---------------------------------------------------------------- encoders
        ZooEntry("bert", "encoder", "post-norm, token types, pooler + classifier; 4 layers",
                 _hf("BertConfig", "BertForSequenceClassification", **{**_ENCODER, "num_hidden_layers": 4}), cls),
        ZooEntry("roberta", "encoder", "post-norm, padding-offset positions, classifier head",
                 _hf("RobertaConfig", "RobertaForSequenceClassification", **_ENCODER, pad_token_id=1), cls),
        ZooEntry("distilbert", "encoder", "no token types, q/k/v/out_lin, classifier head",
                 _hf("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=VOCAB, dim=64,
                     hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=NUM_LABELS), cls),
        # ---------------------------------------------------------------- vision
        ZooEntry("vit", "vision", "patch embedding (conv), CLS token, pre-norm",
                 _hf("ViTConfig", "ViTForImageClassification", hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, image_size=IMAGE, patch_size=4,
                     num_labels=NUM_LABELS), _image_batch(IMAGE)),
        ZooEntry("resnet", "conv", "BatchNorm (running stats), residual conv stages, downsampling",
                 _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32],
                     depths=[2, 2], layer_type="basic", num_labels=NUM_LABELS), _image_batch(RESNET_IMAGE)),
        # ---------------------------------------------------------------- torch
        ZooEntry("torch_encoder", "torch", "nn.TransformerEncoder (MultiheadAttention in_proj), causal mask",
                 TorchEncoderLM, _token_batch),
    ]


ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _entries()}
