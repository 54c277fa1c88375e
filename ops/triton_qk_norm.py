"""Qwen3's per-head RMSNorm of the query and key heads and their rotary embedding, as one Triton kernel.

Compiled by inductor, the same arithmetic is three kernels a layer on the H100 (the norm's reduction, its
pointwise pass, then the rotation: 0.071 + 0.055 + 0.072 ms of a nano step at 256 sequences, perf/RESULTS.md,
session 24), because the rotation reads the other half of each head the norm has just reduced. Here one
program reads HEADS_BLOCK heads of one token as their two halves, reduces, scales and rotates them in
registers and writes them once.

The arithmetic is `engine.communication.rms_norm` then `engine.models.layers.apply_rotary_emb` (HF's):
the norm in float32, cast to the model dtype before the weight multiply; the rotation's cos / sin cast to
the model dtype first; the rest in float32, rounded once at the end (as inductor computes a fused kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HEADS_BLOCK = 4


@triton.jit
def _qk_norm_rope_kernel(x_ptr, out_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr,
                         stride_xt, stride_ot, stride_ct, num_heads, q_heads, eps,
                         HALF: tl.constexpr, HEADS_BLOCK: tl.constexpr):
    """Program (token, head block): heads [block * HEADS_BLOCK, ...) of one token."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    dims = tl.arange(0, HALF)
    mask = (heads < num_heads)[:, None]
    first = x_ptr + token * stride_xt + heads[:, None] * (2 * HALF) + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
    is_query = (heads < q_heads)[:, None]
    w1 = tl.where(is_query, tl.load(q_weight_ptr + dims)[None, :], tl.load(k_weight_ptr + dims)[None, :])
    w2 = tl.where(is_query, tl.load(q_weight_ptr + HALF + dims)[None, :], tl.load(k_weight_ptr + HALF + dims)[None, :])
    n1 = (x1 * inv_rms[:, None]).to(dtype).to(tl.float32) * w1.to(tl.float32)
    n2 = (x2 * inv_rms[:, None]).to(dtype).to(tl.float32) * w2.to(tl.float32)
    # The table's halves are equal (HF duplicates them): the first half serves both.
    cos = tl.load(cos_ptr + token * stride_ct + dims).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_ct + dims).to(dtype).to(tl.float32)[None, :]
    out = out_ptr + token * stride_ot + heads[:, None] * (2 * HALF) + dims[None, :]
    tl.store(out, (n1 * cos - n2 * sin).to(dtype), mask=mask)
    tl.store(out + HALF, (n2 * cos + n1 * sin).to(dtype), mask=mask)


def qk_norm_rope(qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, q_heads: int, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """qk [T, heads, head_dim] (the query heads, then the key heads; rows may be strided, heads contiguous),
    weights [head_dim], cos / sin [T, 1, head_dim] (rows contiguous) -> a contiguous [T, heads, head_dim]
    (`out` if given)."""
    num_tokens, num_heads, head_dim = qk.shape
    assert qk.stride(2) == 1 and qk.stride(1) == head_dim and cos.stride(2) == sin.stride(2) == 1
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=qk.dtype, device=qk.device)
    if num_tokens:
        grid = (num_tokens, triton.cdiv(num_heads, HEADS_BLOCK))
        _qk_norm_rope_kernel[grid](qk, out, q_weight, k_weight, cos, sin, qk.stride(0), out.stride(0), cos.stride(0),
                                   num_heads, q_heads, eps, HALF=head_dim // 2, HEADS_BLOCK=HEADS_BLOCK)
    return out
