"""Qwen3 (dense): Llama's architecture with an RMSNorm over each query and key head before rotary
embedding, no qkv bias, and an explicit head_dim."""

from __future__ import annotations

from typing import Any

import torch

from engine.models.layers import RMSNorm, apply_rotary_emb
from engine.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: Any, layer_idx: int, tp_rank: int, tp_size: int, quant_config: Any, prefix: str):
        super().__init__(config, layer_idx, tp_rank, tp_size, quant_config, prefix)
        self.q_norm = RMSNorm(head_dim_of(config), config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim_of(config), config.rms_norm_eps)

    def rotated_qkv(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each query and key head normed (its own weights for q and k), then rotated."""
        q, k, v = self.project_qkv(hidden)
        return apply_rotary_emb(self.q_norm(q), cos, sin), apply_rotary_emb(self.k_norm(k), cos, sin), v


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
