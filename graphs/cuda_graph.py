"""CUDA graphs for decode steps, one per batch-size bucket.

A decode batch of n sequences is padded up to the nearest captured bucket and replayed. All inputs
live in static buffers the graphs were captured with; padding rows get slot -1 (the KV write skips
them) and context length 0, and their outputs are dropped. Graphs share one memory pool and are
captured largest first, so the pool is sized by the largest. The LM head and sampling run outside
the graph, on the real rows only.

The attention op reads its metadata from the forward context at capture time, so the graph's
kernels keep pointing at these buffers. `max_seq_len` is fixed at max_model_len when capturing: the
decode kernel sizes its grid from it (an upper bound), and the real lengths come from `seq_lens`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from ops.forward_context import AttentionMetadata, ForwardContext, set_forward_context

logger = logging.getLogger("engine")


def default_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16 up to 512 — capped at max_num_seqs."""
    sizes = [1, 2, 4, 8] + list(range(16, 257, 8)) + list(range(272, 513, 16))
    capped = [s for s in sizes if s < max_num_seqs]
    return capped + [max_num_seqs] if max_num_seqs <= 512 else sizes


class CudaGraphRunner:
    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: str,
        batch_sizes: list[int],
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ):
        self.forward = forward
        self.kv_caches = kv_caches
        self.backend = backend
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_model_len = max_model_len
        max_bs = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        # Inference tensors, like every input the engine passes (a different dispatch key set would
        # fail dynamo's guards and recompile). The model's inputs get their own tensor per bucket,
        # not views of one buffer: dynamo guards on a view's base size, which would recompile too.
        with torch.inference_mode():
            self.input_ids = {bs: torch.zeros(bs, dtype=torch.long, device=device) for bs in self.batch_sizes}
            self.positions = {bs: torch.zeros(bs, dtype=torch.long, device=device) for bs in self.batch_sizes}
            self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
            self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
            self.block_tables = torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=device)
            self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> float:
        start = time.perf_counter()
        pool = None
        for bs in tqdm(sorted(self.batch_sizes, reverse=True), desc="Capturing CUDA graphs", leave=False):
            with set_forward_context(ForwardContext(self._metadata(bs), self.kv_caches, self.backend)):
                self.forward(self.input_ids[bs], self.positions[bs])  # warm-up: compile, autotune
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.forward(self.input_ids[bs], self.positions[bs])
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def bucket_for(self, num_seqs: int) -> int | None:
        for bs in self.batch_sizes:
            if bs >= num_seqs:
                return bs
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph of the smallest bucket that fits this decode batch."""
        n = meta.num_seqs
        bs = self.bucket_for(n)
        self.input_ids[bs][:n].copy_(input_ids)
        self.positions[bs][:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:bs].fill_(0)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
