"""CUDA graphs for decode steps, one per batch-size bucket, and for prefill and mixed steps of up to
8,192 tokens (by default), one per token-count bucket.

A decode batch of n sequences is padded up to the nearest captured bucket and replayed. All inputs
live in static buffers the graphs were captured with; padding rows get slot -1 (the KV write skips
them) and context length 0, and their outputs are dropped. Graphs share one memory pool and are
captured largest first, so the pool is sized by the largest. The LM head and sampling run outside
the graph, on the real rows only.

The attention op reads its metadata from the forward context at capture time, so the graph's
kernels keep pointing at these buffers. `max_seq_len` is fixed at max_model_len when capturing: the
decode kernel sizes its grid from it (an upper bound), and the real lengths come from `seq_lens`.

Prefill and mixed steps (some query longer than one token) without graphs run the compiled model,
and with dynamic shapes its Python launches cost more than the GPU work of a short step (Qwen3-0.6B,
a 1,024-token prefill: ~15 ms of host time for 3.8 ms of device time, H100; with graphs a 16-token
Llama-3.1-8B prefill went from 19.3 to 8.4 ms and the median TTFT at concurrency 1 from 17.9 to
12.4 ms, throughput unchanged). Up to 8,192 tokens since nano's full 8,192-token prefill steps, run
without a graph, left the H100 idle ~43 of every ~67 ms (profiled; 23.7 ms a step with graphs,
perf/RESULTS.md, session 25). `mixed_sizes` captures
graphs for steps of up to that many tokens (`MixedStepInputs`): the tokens are padded to the bucket,
the sequences to max_num_seqs + 1 (the last one holds the padding tokens, with context length 0:
the attention kernels write it zeros, the KV write skips its slots), and the prefill kernel's grid
is sized for the bucket's token count and every sequence slot, so any step that fits replays.
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


class MixedStepInputs:
    """The static inputs of the prefill / mixed-step graphs, and how a step is padded into them."""

    def __init__(self, token_sizes: list[int], max_seqs: int, max_blocks: int, device: torch.device):
        self.token_sizes = sorted(set(token_sizes))
        self.max_seqs = max_seqs
        with torch.inference_mode():  # (as CudaGraphRunner's buffers)
            self.input_ids = {t: torch.zeros(t, dtype=torch.long, device=device) for t in self.token_sizes}
            self.positions = {t: torch.zeros(t, dtype=torch.long, device=device) for t in self.token_sizes}
            self.slot_mapping = torch.full((self.token_sizes[-1],), -1, dtype=torch.long, device=device)
            # max_seqs sequence slots, then the padding sequence: max_seqs + 2 boundaries.
            self.query_start_loc = torch.zeros(max_seqs + 2, dtype=torch.int32, device=device)
            self.seq_lens = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
            self.block_tables = torch.zeros((max_seqs + 1, max_blocks), dtype=torch.int32, device=device)

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        if num_seqs > self.max_seqs:
            return None
        return next((t for t in self.token_sizes if t >= num_tokens), None)

    def metadata(self, t: int, max_model_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:t],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=t,  # an upper bound: the prefill kernel's tiles and grid come from it
            max_seq_len=max_model_len,
        )

    def load_empty(self, t: int) -> None:
        """Bucket t holding padding only (for capture)."""
        self.slot_mapping[:t].fill_(-1)
        self.query_start_loc[:-1].fill_(0)
        self.query_start_loc[-1].fill_(t)
        self.seq_lens.fill_(0)

    def load(self, t: int, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Pad a step of n tokens from s sequences into bucket t (n <= t, s <= max_seqs)."""
        n, s = input_ids.shape[0], meta.num_seqs
        self.input_ids[t][:n].copy_(input_ids)  # the padding rows keep earlier (valid) ids and positions
        self.positions[t][:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:t].fill_(-1)
        self.query_start_loc[: s + 1].copy_(meta.query_start_loc)
        self.query_start_loc[s + 1 : -1].fill_(n)  # empty sequence slots
        self.query_start_loc[-1].fill_(t)  # the padding sequence: tokens n..t-1
        self.seq_lens[:s].copy_(meta.seq_lens)
        self.seq_lens[s:].fill_(0)
        self.block_tables[:s, : meta.block_tables.shape[1]].copy_(meta.block_tables)


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
        mixed_sizes: list[int] | None = None,
        max_num_seqs: int = 0,
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
        self.mixed = MixedStepInputs(mixed_sizes, max_num_seqs, max_blocks, device) if mixed_sizes else None
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed_outputs: dict[int, torch.Tensor] = {}

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
        self._reserved_at_start = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()  # the first warm-up's peak, logged before the first capture
        # Largest first (by tokens), so that the shared pool is sized by the largest graph.
        todo = [(bs, False) for bs in self.batch_sizes] + [(t, True) for t in (self.mixed.token_sizes if self.mixed else [])]
        for size, mixed in tqdm(sorted(todo, reverse=True), desc="Capturing CUDA graphs", leave=False):
            if mixed:
                self.mixed.load_empty(size)
                meta = self.mixed.metadata(size, self.max_model_len)
                ids, positions = self.mixed.input_ids[size], self.mixed.positions[size]
            else:
                meta, ids, positions = self._metadata(size), self.input_ids[size], self.positions[size]
            with set_forward_context(ForwardContext(meta, self.kv_caches, self.backend)):
                self.forward(ids, positions)  # warm-up: compile, autotune
                torch.cuda.synchronize()
                if pool is None:
                    self._before_first_capture()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        (self.mixed_outputs if mixed else self.outputs)[size] = self.forward(ids, positions)
                except (torch.OutOfMemoryError, torch.AcceleratorError) as exc:
                    # (an error ending the capture may hide the out-of-memory that broke it: its context)
                    if "out of memory" not in f"{exc} {exc.__context__}":
                        raise
                    free, total = torch.cuda.mem_get_info()
                    raise RuntimeError(
                        f"capturing the CUDA graph for {size} {'tokens' if mixed else 'sequences'} ran out of GPU "
                        f"memory ({free / 2**30:.2f} of {total / 2**30:.2f} GiB free): lower --gpu-memory-utilization "
                        f"(or --kv-cache-memory), fewer --cuda-graph-sizes / --mixed-cuda-graph-sizes, or "
                        f"--enforce-eager") from exc
            pool = graph.pool()
            (self.mixed_graphs if mixed else self.graphs)[size] = graph
        logger.info("CUDA graphs: torch holds %.2f GiB more than just before the first capture (the graphs' shared pool)",
                    (torch.cuda.memory_reserved() - self._reserved_after_empty) / 2**30)
        # Launch every graph once more, on its padding inputs (no KV written): CUDA uploads an instantiated
        # graph to the device on its first launch, which would otherwise fall on the first request to use
        # it (the 8B server's first request waited 93-143 ms for its first token, the next ones ~13 ms;
        # perf/RESULTS.md, session 9; that this is the cause is not yet measured).
        for size, graph in self.mixed_graphs.items():
            self.mixed.load_empty(size)
            graph.replay()
        for graph in self.graphs.values():
            graph.replay()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def _before_first_capture(self) -> None:
        """Hand the caching allocator's free blocks back to the driver before the first capture, and
        log where the memory is. Llama-3.1-8B AWQ at gpu_memory_utilization 0.9 ran out of device
        memory right here (creating the capture stream) on an H100, with ~8 GiB left after the KV cache
        when it was sized (perf/RESULTS.md, session 18). In session 19 every Llama-3.1-8B start (bf16, AWQ,
        GPTQ, int8) had ~9.2 GiB cached and unused by torch here, ~0.9 GiB left to the driver; handed back,
        AWQ captures at 0.9. Whether the first warm-up's peak (logged) or earlier work cached it: not yet seen."""
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        self._reserved_after_empty = torch.cuda.memory_reserved()
        logger.info("GPU memory before the first CUDA-graph capture: %.2f of %.2f GiB free after returning %.2f GiB "
                    "cached by torch (torch: %.2f GiB allocated; outside torch %.2f GiB); torch held %.2f GiB before "
                    "the first warm-up, which peaked at %.2f GiB allocated", free / 2**30, total / 2**30,
                    (reserved - self._reserved_after_empty) / 2**30, allocated / 2**30,
                    (total - free - self._reserved_after_empty) / 2**30, self._reserved_at_start / 2**30,
                    torch.cuda.max_memory_allocated() / 2**30)

    def mixed_bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        return self.mixed.bucket_for(num_tokens, num_seqs) if self.mixed is not None else None

    def run_mixed(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph of the smallest token bucket that fits this prefill / mixed step."""
        t = self.mixed.bucket_for(input_ids.shape[0], meta.num_seqs)
        self.mixed.load(t, input_ids, positions, meta)
        self.mixed_graphs[t].replay()
        return self.mixed_outputs[t][: input_ids.shape[0]]

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
