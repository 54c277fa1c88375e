"""Per-step state the attention op reads: the KV cache and the batch's attention metadata.

The model's forward signature stays (input_ids, positions); the paged-attention op looks the KV
cache and the block tables up here instead of taking them as arguments, so torch.compile sees one
opaque op and never functionalizes (copies) the cache. This is vLLM's "forward context" pattern.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch sits in the paged KV cache.

    A batch is a list of sequences; sequence i contributes the query tokens
    ``query_start_loc[i]:query_start_loc[i+1]`` of the flattened [num_tokens] batch, which are the
    *last* tokens of its context of ``seq_lens[i]`` tokens (everything before them is already in the
    cache: earlier decode steps, earlier prefill chunks, or prefix-cache hits). Prefill, chunked
    prefill and decode are all the same shape; decode is just query length 1.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) per token; -1 = padding, write nothing
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new); 0 for padding rows
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32: physical block ids, by logical block
    max_query_len: int  # longest query in the batch (1 for a pure decode batch)
    max_seq_len: int  # longest context in the batch
    # Host copies, so that reference loops and xformers' bias builders need no device sync.
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass
class ForwardContext:
    """Everything the attention op needs for one forward pass."""

    attn_metadata: AttentionMetadata | None  # None: a plain causal forward with no cache (weight checks, profiling)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache): [num_blocks, block_size, num_kv_heads, head_dim]
    backend: str = "torch"  # "torch" | "triton" | "xformers"


_current: ForwardContext | None = None


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("paged attention called outside set_forward_context(...)")
    return _current
