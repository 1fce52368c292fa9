"""Sharding strategies DTensor lacks for ops that transformer blocks run on CPU.

torch 2.13 registers DTensor strategies for the CUDA attention kernels only: scaled dot-product
attention on CPU DTensors raises ``NotImplementedError``. The CPU flash kernel is independent per
batch element and per head, so it runs unchanged on a batch- or head-sharded input; these
registrations (torch's ``register_sharding`` API, nothing re-implemented) say so, and the
tensor-parallel layout keeps attention head-sharded with no communication.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

_aten = torch.ops.aten


@functools.cache
def register_cpu_attention_sharding() -> None:
    """Register head- and batch-sharded strategies for the CPU flash attention kernel (once per process)."""
    register_sharding(_aten._scaled_dot_product_flash_attention_for_cpu.default)(_attention_forward)
    register_sharding(_aten._scaled_dot_product_flash_attention_for_cpu_backward.default)(_attention_backward)


def _mask_placement(attn_mask: object, dim: int) -> object:
    """The mask's placement when q/k/v are sharded on ``dim``: broadcast dims stay replicated."""
    if attn_mask is None:
        return None
    shape = attn_mask.tensor_meta.shape
    return Shard(dim) if shape[dim] != 1 else Replicate()


def _replicated_mask(attn_mask: object) -> object:
    return None if attn_mask is None else Replicate()


def _attention_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    # Outputs: (output [B, H, T, D], logsumexp [B, H, T]); inputs: q, k, v, dropout_p, is_causal, attn_mask.
    strategies = [
        ([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), None, None, _replicated_mask(attn_mask)])
    ]
    for dim in (0, 1):
        shard = Shard(dim)
        strategies.append(([shard, shard], [shard, shard, shard, None, None, _mask_placement(attn_mask, dim)]))
    return strategies


def _attention_backward(
    grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None
):
    # Outputs: grad_q, grad_k, grad_v; inputs: grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, attn_mask.
    replicate = Replicate()
    strategies = [([replicate] * 3, [replicate] * 6 + [None, None, _replicated_mask(attn_mask)])]
    for dim in (0, 1):
        shard = Shard(dim)
        strategies.append(([shard] * 3, [shard] * 6 + [None, None, _mask_placement(attn_mask, dim)]))
    return strategies
