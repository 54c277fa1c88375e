"""The PagedAttention custom op: registration, and the reference against plain causal attention."""

from __future__ import annotations

import torch

import ops.attention  # noqa: F401  (registers torch.ops.engine.paged_attention)
from ops import torch_ref
from ops.forward_context import AttentionMetadata, ForwardContext, set_forward_context


def _paged_batch(seq_lens: list[int], query_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, seed: int):
    """A random cache with shuffled blocks, holding every sequence's context."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(sum(blocks_per_seq) + 3, generator=gen)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[start : start + n]
        start += n
    shape = (len(perm), block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    slots = []
    for i, (n, q) in enumerate(zip(seq_lens, query_lens)):
        slots.append(torch_ref.context_slots(tables[i], n, block_size)[n - q :])
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
    )
    return k_cache, v_cache, meta


def test_opcheck_validates_the_registration():
    k_cache, v_cache, meta = _paged_batch([7, 12], [7, 1], block_size=4, num_kv_heads=2, head_dim=8, seed=0)
    q, k, v = torch.randn(8, 4, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    with set_forward_context(ForwardContext(meta, [(k_cache, v_cache)], "torch")):
        torch.library.opcheck(torch.ops.engine.paged_attention.default, (torch.cat([q, k], 1), v, torch.empty_like(q), 0, 0.35))


def test_paged_prefill_with_cached_context_equals_causal_attention_over_the_whole_sequence():
    """A query that is the tail of a longer context (chunked prefill / prefix hit) sees exactly what
    full causal attention over the whole sequence gives its rows; GQA 4:1, odd head_dim."""
    seq_len, q_len, bs, kv_heads, heads, dim = 23, 9, 4, 1, 4, 24
    k_cache, v_cache, meta = _paged_batch([seq_len], [q_len], bs, kv_heads, dim, seed=1)
    keys = k_cache.view(-1, kv_heads, dim)[torch_ref.context_slots(meta.block_tables[0], seq_len, bs)]
    values = v_cache.view(-1, kv_heads, dim)[torch_ref.context_slots(meta.block_tables[0], seq_len, bs)]
    q_full = torch.randn(seq_len, heads, dim)
    want = torch_ref.causal_attention(q_full, keys, values, scale=0.2)[-q_len:]
    out = torch.full((q_len, heads, dim), float("nan"))
    # Re-writing the tail's own K/V through the op must leave the cache as it was.
    with set_forward_context(ForwardContext(meta, [(k_cache, v_cache)], "torch")):
        torch.ops.engine.paged_attention(torch.cat([q_full[-q_len:], keys[-q_len:]], 1), values[-q_len:], out, 0, 0.2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_kv_write_skips_padding_slots():
    cache = torch.zeros(2, 4, 1, 2)
    other = torch.zeros_like(cache)
    key = torch.arange(6, dtype=torch.float32).view(3, 1, 2) + 1
    torch_ref.write_kv_cache(key, key, cache, other, torch.tensor([5, -1, 2]))
    flat = cache.view(-1, 2)
    assert flat[5].tolist() == [1.0, 2.0] and flat[2].tolist() == [5.0, 6.0]
    assert flat.abs().sum() == 1 + 2 + 5 + 6


def test_host_to_device_keeps_values_and_dtype():
    import numpy as np

    from engine.device_io import host_to_device

    for data, dtype in (([3, -1, 7], torch.long), (np.arange(6, dtype=np.int32).reshape(2, 3), torch.int32),
                        ([0.5, 1.0], torch.float32), ([True, False], torch.bool)):
        got = host_to_device(data, dtype, torch.device("cpu"))
        assert got.dtype == dtype
        assert got.tolist() == torch.as_tensor(np.asarray(data)).to(dtype).tolist()


def test_causal_attention_in_query_chunks_equals_one_dense_causal_attention():
    # The no-cache path (memory profile, weight checks) runs in chunks of queries to stay O(chunk x T).
    torch.manual_seed(0)
    q, k, v = torch.randn(300, 8, 32), torch.randn(300, 2, 32), torch.randn(300, 2, 32)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(4, dim=1).transpose(0, 1), v.repeat_interleave(4, dim=1).transpose(0, 1),
        is_causal=True, scale=0.2).transpose(0, 1)
    for chunk in (64, 300, 1000):
        torch.testing.assert_close(torch_ref.causal_attention(q, k, v, scale=0.2, chunk=chunk), dense)
