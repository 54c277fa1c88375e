"""Qwen2 / Qwen2.5: Llama's architecture with a bias on the q, k and v projections (never on o)."""

from __future__ import annotations

from typing import Any

from engine.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    def __init__(self, config: Any, layer_idx: int, tp_rank: int, tp_size: int, quant_config: Any, prefix: str):
        super().__init__(config, layer_idx, tp_rank, tp_size, quant_config, prefix, qkv_bias=True, o_bias=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2's sliding window (`use_sliding_window`, off in released checkpoints) is not implemented;
    the engine caps max_model_len instead."""

    attention_cls = Qwen2Attention
