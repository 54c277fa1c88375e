"""xformers PagedAttention: the fallback GPU backend (same two functions as `ops.torch_ref`).

- KV write: the Triton kernel of `ops.triton_attention` (xformers has none).
- Decode (every query length 1) with block_size a multiple of 64 and a power-of-two head_dim:
  xformers' paged split-K Triton kernel (`triton_splitKF`) through
  `PagedBlockDiagonalCausalWithOffsetPaddedKeysMask`, reading K/V through the block table.
- Everything else (prefill, chunked prefill, prefix-cache hits, mixed batches, and decode with
  blocks of 16 or 32): the live sequences' contexts are gathered from the cache into one packed
  K/V copy and attended with `BlockDiagonalCausalFromBottomRightMask` (PyTorch's flash or
  mem-efficient kernels, `fa2F-pt` / `cutlassF-pt`). We gather rather than refuse small blocks:
  xformers' paged kernel needs pages divisible by its BLOCK_N of 64, PyTorch's kernels take no
  block table at all, and a fallback that rejects the engine's default block size would not be a
  fallback. The price is one extra read and write of every context per layer, so decode with
  small blocks runs at about a third of the bandwidth-bound speed: use block_size 64 (or the
  Triton backend) where decode speed matters.

Not CUDA-graph safe: xformers builds its masks from host lists (it calls `.tolist()`), so this
backend reads `meta.seq_lens_cpu` / `meta.query_start_loc_cpu` (or syncs to get them) and must run
eagerly.

On a GPU where xformers' C++ extension fails to load (built for another torch/CUDA), xformers
refuses every CUDA op, even those that never touch the extension; `_xformers_fmha()` then sets
`xformers.ops.fmha.common._built_with_cuda = True` so that triton_splitKF, cutlassF-pt and
fa2F-pt can run, and logs that it did (logger "engine.ops").
"""

from __future__ import annotations

import functools
import logging

import torch

from ops.forward_context import AttentionMetadata
from ops.triton_attention import write_kv_cache

logger = logging.getLogger("engine.ops")

_SPLITK_PAGE_MULTIPLE = 64  # triton_splitKF's BLOCK_N: pages must be a multiple of it
_SPLITK_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)


# Its masks are built from host lists each call: decode steps cannot be captured in CUDA graphs.
CUDA_GRAPH_SAFE = False


def check_supported(block_size: int, head_dim: int, dtype: torch.dtype) -> None:
    """Raise ValueError saying why this backend cannot serve a model with these settings."""
    if dtype not in _DTYPES:
        raise ValueError(f"xformers backend: dtype {dtype} unsupported (its flash/split-K kernels take fp16, bf16)")
    if head_dim % 8 or head_dim > 256:
        raise ValueError(f"xformers backend: head_dim {head_dim} unsupported (needs a multiple of 8, at most 256)")
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"xformers backend: block_size {block_size} unsupported (needs a power of two >= 8)")
    if not torch.cuda.is_available():
        raise ValueError("xformers backend: needs a CUDA GPU")
    try:
        _xformers_fmha()
    except ImportError as exc:
        raise ValueError(f"xformers backend: xformers is not importable ({exc})") from exc
    if block_size % _SPLITK_PAGE_MULTIPLE or head_dim not in _SPLITK_HEAD_DIMS:
        logger.warning(
            "xformers backend: block_size %d / head_dim %d cannot use xformers' paged decode kernel "
            "(needs block_size %% %d == 0 and head_dim in %s); decode will gather K/V into a contiguous copy",
            block_size, head_dim, _SPLITK_PAGE_MULTIPLE, _SPLITK_HEAD_DIMS,
        )


@functools.cache
def _xformers_fmha():
    import xformers.ops.fmha as fmha
    from xformers import _cpp_lib
    from xformers.ops.fmha import common

    load_error = _cpp_lib._cpp_library_load_exception
    if load_error is not None and torch.version.cuda is not None and torch.cuda.is_available() and not common._built_with_cuda:
        common._built_with_cuda = True
        logger.warning(
            "xformers' C++ extension did not load (%s); set xformers.ops.fmha.common._built_with_cuda = True "
            "to use its extension-free CUDA ops (triton_splitKF, cutlassF-pt, fa2F-pt)",
            str(load_error).splitlines()[0] if str(load_error) else type(load_error).__name__,
        )
    return fmha


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
) -> None:
    """Causal attention of each sequence's query tokens over its cached context (see module doc)."""
    block_size, _, head_dim = k_cache.shape[1:]
    paged_decode_ok = (
        meta.max_query_len == 1
        and query.shape[0] == meta.num_seqs  # one query token per sequence, token i of sequence i
        and block_size % _SPLITK_PAGE_MULTIPLE == 0
        and head_dim in _SPLITK_HEAD_DIMS
    )
    if paged_decode_ok:
        _paged_decode(query, k_cache, v_cache, meta, scale, out)
    else:
        _gathered_attention(query, k_cache, v_cache, meta, scale, out)


def _paged_decode(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
    fmha = _xformers_fmha()
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    num_seqs, num_heads = query.shape[0], query.shape[1]
    group = num_heads // num_kv_heads
    seq_lens = _host_list(meta.seq_lens_cpu, meta.seq_lens)
    # Padding rows (seq_len 0) attend to one arbitrary slot here and are zeroed below: an empty
    # key range is not something the split-K kernel promises to handle.
    bias = fmha.attn_bias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[1] * num_seqs,
        kv_seqlen=[max(n, 1) for n in seq_lens],
        block_tables=meta.block_tables,
        page_size=block_size,
        device=query.device,
    )
    q = query.reshape(1, num_seqs, num_kv_heads, group, head_dim)
    k = k_cache.view(1, num_blocks * block_size, num_kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
    v = v_cache.view(1, num_blocks * block_size, num_kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
    o = fmha.memory_efficient_attention_forward(q, k, v, attn_bias=bias, scale=scale, op=fmha.triton_splitk.FwOp)
    o = o.view(num_seqs, num_heads, head_dim)
    out.copy_(torch.where((meta.seq_lens == 0)[:, None, None], 0, o))


def _gathered_attention(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
    fmha = _xformers_fmha()
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    device = query.device
    starts = _host_list(meta.query_start_loc_cpu, meta.query_start_loc)
    seq_lens = _host_list(meta.seq_lens_cpu, meta.seq_lens)
    live = [i for i, n in enumerate(seq_lens) if n > 0 and starts[i + 1] > starts[i]]
    if len(live) < len(seq_lens):  # padding rows get zeros
        out[: starts[-1]].zero_()
    if not live:
        return
    q_lens = [starts[i + 1] - starts[i] for i in live]
    kv_lens = [seq_lens[i] for i in live]

    # Cache slot of every context position of every live sequence, packed sequence after sequence.
    kv_lens_t = torch.tensor(kv_lens, device=device)
    total_kv = sum(kv_lens)
    seq_of = torch.repeat_interleave(torch.arange(len(live), device=device), kv_lens_t, output_size=total_kv)
    pos = torch.arange(total_kv, device=device) - (torch.cumsum(kv_lens_t, 0) - kv_lens_t)[seq_of]
    tables = meta.block_tables[torch.tensor(live, device=device)]
    slots = tables[seq_of, pos // block_size].long() * block_size + pos % block_size
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots]

    if len(live) == len(seq_lens):
        rows = slice(starts[0], starts[-1])
    else:
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in live]).to(device)
    q = query[rows]
    total_q = q.shape[0]
    bias = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_lens, kv_lens, device=device)
    o = fmha.memory_efficient_attention_forward(
        q.reshape(1, total_q, num_kv_heads, group, head_dim),
        k.view(1, total_kv, num_kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1),
        v.view(1, total_kv, num_kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1),
        attn_bias=bias,
        scale=scale,
    )
    out[rows] = o.view(total_q, num_heads, head_dim)


def _host_list(host: torch.Tensor | None, device_tensor: torch.Tensor) -> list[int]:
    return (host if host is not None else device_tensor).tolist()


__all__ = ["check_supported", "paged_attention", "write_kv_cache"]
