"""Qwen3 (dense): Llama's architecture with an RMSNorm over each query and key head before rotary
embedding, no qkv bias, and an explicit head_dim."""

from __future__ import annotations

from typing import Any

import torch

from engine.communication import rms_norm
from engine.models.layers import RMSNorm, apply_rotary_emb
from engine.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: Any, layer_idx: int, tp_rank: int, tp_size: int, quant_config: Any, prefix: str):
        super().__init__(config, layer_idx, tp_rank, tp_size, quant_config, prefix)
        self.q_norm = RMSNorm(head_dim_of(config), config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim_of(config), config.rms_norm_eps)

    def rotated_qkv(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query and key head RMS-normed (q_norm's weight on the query heads, k_norm's on the key heads),
        then rotated: all of them in one pass side by side in the qkv output, as Llama's rotation (one
        kernel a layer once compiled, not one for q and one for k). The same arithmetic element by element."""
        qkv = self.qkv_proj(hidden)
        q_size, k_size, _ = self.split_sizes
        q_heads, k_heads = q_size // self.head_dim, k_size // self.head_dim
        is_query = torch.arange(q_heads + k_heads, device=qkv.device)[:, None] < q_heads
        weight = torch.where(is_query, self.q_norm.weight, self.k_norm.weight)  # [heads, head_dim], inlined once compiled
        qk = qkv[..., : q_size + k_size].unflatten(-1, (-1, self.head_dim))
        qk = apply_rotary_emb(rms_norm(qk, weight, self.q_norm.eps), cos, sin)
        return qk, qkv[..., q_size + k_size :].unflatten(-1, (-1, self.head_dim))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
