"""Qwen3 (dense): Llama's architecture with an RMSNorm over each query and key head before rotary
embedding, no qkv bias, and an explicit head_dim."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from engine.communication import rms_norm
from engine.models.layers import RMSNorm, apply_rotary_emb
from engine.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of

# On CUDA the query and key heads' RMSNorm and rotation run as one Triton kernel (ops/triton_qk_norm.py, the op
# below) instead of the three inductor makes of them: ~0.06 ms of nano's full-batch step against ~0.2 (H100, session
# 25). ENGINE_QK_NORM_KERNEL=0: what inductor makes.
QK_NORM_KERNEL = os.environ.get("ENGINE_QK_NORM_KERNEL", "1") != "0"


def qk_norm_rope_reference(qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, q_heads: int, eps: float) -> torch.Tensor:
    """qk [T, heads, head_dim] (the query heads, then the key heads) RMS-normed head by head (q_weight on the
    query heads, k_weight on the key heads), then rotated by cos / sin [T, 1, head_dim]."""
    is_query = torch.arange(qk.shape[1], device=qk.device)[:, None] < q_heads
    weight = torch.where(is_query, q_weight, k_weight)  # [heads, head_dim], inlined once compiled
    return apply_rotary_emb(rms_norm(qk, weight, eps), cos, sin)


@torch.library.custom_op("engine::qk_norm_rope", mutates_args=())
def qk_norm_rope(qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, q_heads: int, eps: float) -> torch.Tensor:
    """qk_norm_rope_reference as one kernel on CUDA (a new contiguous tensor either way)."""
    if qk.is_cuda:
        if qk.stride(2) != 1 or qk.stride(1) != qk.shape[2]:
            qk = qk.contiguous()
        kernel = importlib.import_module("ops.triton_qk_norm")  # Triton is not installed on CPU-only machines
        return kernel.qk_norm_rope(qk, q_weight, k_weight, cos.contiguous(), sin.contiguous(), q_heads, eps)
    return qk_norm_rope_reference(qk, q_weight, k_weight, cos, sin, q_heads, eps).contiguous()


@qk_norm_rope.register_fake
def _(qk, q_weight, k_weight, cos, sin, q_heads, eps):
    return qk.new_empty(qk.shape)


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
        qk = qkv[..., : q_size + k_size].unflatten(-1, (-1, self.head_dim))
        args = (qk, self.q_norm.weight, self.k_norm.weight, cos, sin, q_size // self.head_dim, self.q_norm.eps)
        qk = torch.ops.engine.qk_norm_rope(*args) if QK_NORM_KERNEL and qk.is_cuda else qk_norm_rope_reference(*args)
        return qk, qkv[..., q_size + k_size :].unflatten(-1, (-1, self.head_dim))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
