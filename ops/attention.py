"""The PagedAttention custom op: one opaque op that writes this step's K/V into the paged cache
and attends over it, for prefill, chunked prefill and decode alike.

`torch.ops.engine.paged_attention(qk, v, out, layer_idx, scale)` mutates `out` and returns
nothing. `qk` holds the query heads, then the key heads, of each token: one tensor, so that a compiled
model computes its rotation (and Qwen3's per-head norms) into one buffer, one kernel a layer. Given q and
k apart, even as views of one rotated tensor, inductor realized each into a buffer of its own: two
kernels a layer (GPU profile, perf/RESULTS.md, session 20). The cache and the batch metadata come from
`ops.forward_context` (see there why). The implementation is chosen per forward by
`ForwardContext.backend`:

- "torch":    `ops.torch_ref`, the reference (CPU, and the oracle for the GPU kernels)
- "triton":   `ops.triton_attention` (GPU)
- "xformers": `ops.xformers_attention` (GPU)
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from ops import torch_ref
from ops.forward_context import AttentionMetadata, get_forward_context

# name -> module path; each module exposes write_kv_cache(...) and paged_attention(...) with the
# signatures of ops.torch_ref.
BACKEND_MODULES = {
    "torch": "ops.torch_ref",
    "triton": "ops.triton_attention",
    "xformers": "ops.xformers_attention",
}


def get_backend(name: str):
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


@torch.library.custom_op("engine::paged_attention", mutates_args=("out",))
def paged_attention(
    query_key: torch.Tensor,  # [num_tokens, num_heads + num_kv_heads, head_dim]: the query heads, then the key heads
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    layer_idx: int,
    scale: float,
) -> None:
    query, key = query_key.split([out.shape[1], value.shape[1]], dim=1)  # views: the kernels take strides
    ctx = get_forward_context()
    meta = ctx.attn_metadata
    if meta is None:  # no cache: the whole input is one causal sequence
        out.copy_(torch_ref.causal_attention(query, key, value, scale))
        return
    backend = get_backend(ctx.backend)
    k_cache, v_cache = ctx.kv_caches[layer_idx]
    if hasattr(backend, "write_kv_and_attend"):  # one kernel where the backend can (triton: decode)
        backend.write_kv_and_attend(query, key, value, k_cache, v_cache, meta, scale, out)
        return
    backend.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    backend.paged_attention(query, k_cache, v_cache, meta, scale, out)


@paged_attention.register_fake
def _(query_key, value, out, layer_idx, scale) -> None:
    if query_key.shape[1] != out.shape[1] + value.shape[1]:
        raise ValueError(f"query_key has {query_key.shape[1]} heads; expected out's {out.shape[1]} query heads "
                         f"plus value's {value.shape[1]} key heads")
    return None


__all__ = ["AttentionMetadata", "BACKEND_MODULES", "get_backend", "paged_attention"]
