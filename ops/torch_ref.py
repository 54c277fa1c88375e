"""Pure-torch PagedAttention: the reference every GPU kernel is checked against, and the CPU path.

Written for clarity, one sequence at a time; float32 softmax. The cache may hold the model's dtype or
float8 e4m3 (kv_cache_dtype="fp8": written saturated, read back as float32).
"""

from __future__ import annotations

import torch

from ops.forward_context import AttentionMetadata


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Store each token's key and value in its cache slot; tokens with slot -1 are padding."""
    num_tokens = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat[slots] = to_cache_dtype(key[:num_tokens][valid], k_cache.dtype)
    v_flat[slots] = to_cache_dtype(value[:num_tokens][valid], v_cache.dtype)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: an 8-bit float cache (scale 1.0) saturates at its largest finite
    value, rounding to nearest even once, from float32 (torch's own cast would make NaN past it)."""
    if dtype.is_floating_point and dtype.itemsize == 1:
        fmax = torch.finfo(dtype).max
        return x.float().clamp(-fmax, fmax).to(dtype)
    return x.to(dtype)


def context_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions 0..seq_len-1 of one sequence."""
    positions = torch.arange(seq_len, device=block_table.device)
    blocks = block_table[positions // block_size].long()
    return blocks * block_size + positions % block_size


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
) -> None:
    """Causal attention of each sequence's query tokens over its cached context."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    starts = (meta.query_start_loc_cpu if meta.query_start_loc_cpu is not None else meta.query_start_loc).tolist()
    seq_lens = (meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens).tolist()
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        if seq_len == 0:  # padding row
            out[start:end] = 0
            continue
        q_len = end - start
        slots = context_slots(meta.block_tables[i], seq_len, block_size)
        k = k_flat[slots].float().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v_flat[slots].float().repeat_interleave(group, dim=1)
        q = query[start:end].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        # Query j sits at position seq_len - q_len + j and sees positions <= its own.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     chunk: int = 256) -> torch.Tensor:
    """Plain causal self-attention over one sequence with no cache: [T, H, D] inputs, GQA allowed.

    `chunk` queries at a time (each against the keys up to its last one), so that memory stays
    O(chunk x T) whichever SDPA kernel runs: the engine's memory profile runs this over
    max_num_batched_tokens tokens, and a dense [H, T, T] score matrix there (8192 tokens: 16 GiB
    on Llama-3.1-8B, 32 GiB on 70B) was once counted as activations, starving the KV cache."""
    group = query.shape[1] // key.shape[1]
    q = query.transpose(0, 1)
    k = key.repeat_interleave(group, dim=1).transpose(0, 1)
    v = value.repeat_interleave(group, dim=1).transpose(0, 1)
    T = q.shape[1]
    out = torch.empty_like(q)
    # Last chunk first: its buffers (keys up to T) are the largest, and the earlier chunks' smaller ones
    # then fit in the blocks torch's CUDA allocator keeps for them, instead of each growing chunk taking
    # new ones that stay cached after the profile.
    for start in reversed(range(0, T, chunk)):
        end = min(start + chunk, T)
        rows = torch.arange(start, end, device=q.device)[:, None]
        mask = torch.arange(end, device=q.device)[None, :] <= rows  # key j visible to query i if j <= i
        out[:, start:end] = torch.nn.functional.scaled_dot_product_attention(
            q[:, start:end], k[:, :end], v[:, :end], attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
