"""A decode step as two half-batches on two CUDA streams, so that one half's attention reads the KV
cache while the other half's projections, norms and MLP run.

Why: at nano's full batch (Qwen3-0.6B, 256 sequences) a decode step is ~8.7 ms of GPU. The attention
kernel is ~6.7 ms of it and keeps the memory busy; the other ~2 ms are small kernels (GEMMs at
cuBLAS's ~5 µs floor, norms, rotation) that leave the memory idle and cost about the same at any batch
size (perf/RESULTS.md, session 23; perf/notes/nano_overlap.md). Run back to back they add up; here
they overlap.

How: the forward is cut at each attention op into pieces (`LlamaModel.start`, `.between`,
`.finish`), each compiled once. The batch's sequences are split into halves A and B. All attention
ops run on one low-priority stream, in the order A0 B0 A1 B1 ...; all pieces on one high-priority
stream, in the order A's start, B's start, A's piece after layer 0, B's, ... Events make each
attention wait for its half's previous piece and each piece for its half's attention. So while B's
layer-l attention runs, A's piece from layer l to l + 1 runs beside it, and the next attention (A's,
layer l + 1) is ready when B's ends: the attention stream never waits once the pipeline is full. The
pieces' stream has the higher priority so that its short kernels get SMs as the attention kernel's
programs retire, not after all of them (PyTorch instantiates graphs with per-node priorities).

Used by `CudaGraphRunner` for decode buckets of at least `min_batch` sequences: the halves' kernels
are latency-bound, so each half costs nearly a whole batch's small kernels, and below some size the
overlap does not pay for twice the launches. On the CPU (tests) the streams are ignored and the
pieces run in turn: the same arithmetic.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from ops.forward_context import AttentionMetadata, ForwardContext, get_forward_context, set_forward_context


def dual_batch_min() -> int:
    """ENGINE_DUAL_BATCH_MIN: the smallest decode bucket run as two half-batches (0, the default: none)."""
    raw = os.environ.get("ENGINE_DUAL_BATCH_MIN", "").strip() or "0"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"ENGINE_DUAL_BATCH_MIN={raw!r} is not a whole number of sequences") from None
    if value < 0 or 0 < value < 4:
        # (halves of one sequence would make the compiled pieces specialize on size 1 and compile again)
        raise ValueError(f"ENGINE_DUAL_BATCH_MIN={value}: 0 (off) or at least 4 sequences")
    return value


PRIORITIES = ("dense", "equal", "attention")


def dual_batch_priority() -> str:
    """ENGINE_DUAL_BATCH_PRIORITY, for A/B runs: which stream's kernels get SMs first, "dense" (the pieces',
    the default), "equal" or "attention"."""
    value = os.environ.get("ENGINE_DUAL_BATCH_PRIORITY", "").strip() or "dense"
    if value not in PRIORITIES:
        raise ValueError(f"ENGINE_DUAL_BATCH_PRIORITY={value!r}; choose one of {', '.join(PRIORITIES)}")
    return value


def supports_dual_batch(model: torch.nn.Module) -> bool:
    """The model can run in pieces (a decoder of `LlamaModel`'s shape, without tensor parallelism)."""
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("start", "between", "finish", "layers")) and not inner.reduce


def split_decode_metadata(meta: AttentionMetadata, split: int) -> tuple[AttentionMetadata, AttentionMetadata]:
    """A decode batch's metadata as two batches: sequences [0, split) and [split, n). Views of meta's
    tensors, so that graphs captured with them read the buffers meta reads."""
    if meta.max_query_len != 1:
        raise ValueError("only decode batches (one query token a sequence) are split into halves")
    n = meta.num_seqs
    if not 0 < split < n:
        raise ValueError(f"split {split} leaves a half of a {n}-sequence batch empty")

    def half(rows: slice, count: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=meta.slot_mapping[rows],
            query_start_loc=meta.query_start_loc[: count + 1],  # one token a sequence: 0, 1, ..., count
            seq_lens=meta.seq_lens[rows],
            block_tables=meta.block_tables[rows],
            max_query_len=1,
            max_seq_len=meta.max_seq_len,
            query_start_loc_cpu=None if meta.query_start_loc_cpu is None else meta.query_start_loc_cpu[: count + 1],
            seq_lens_cpu=None if meta.seq_lens_cpu is None else meta.seq_lens_cpu[rows],
        )

    return half(slice(0, split), split), half(slice(split, n), n - split)


class DualBatchForward:
    """forward(input_ids, positions) of a decode batch run as two halves (see the module doc). Reads
    the batch's metadata from the forward context, as the attention op does, and sets each half's
    around its attention calls."""

    def __init__(self, model: torch.nn.Module, compile: bool, device: torch.device):
        inner = model.model
        self.layers = list(inner.layers)
        if compile:
            self.start = torch.compile(inner.start, fullgraph=True, dynamic=True)
            self.between = torch.compile(inner.between, fullgraph=True, dynamic=True)
            self.finish = torch.compile(inner.finish, fullgraph=True, dynamic=True)
        else:
            self.start, self.between, self.finish = inner.start, inner.between, inner.finish
        self.cuda = device.type == "cuda"
        if self.cuda:
            # Lower numbers are higher priorities; torch clamps to the device's range.
            attention, dense = {"dense": (0, -1), "equal": (0, 0), "attention": (-1, 0)}[dual_batch_priority()]
            self.attention_stream = torch.cuda.Stream(device, priority=attention)
            self.dense_stream = torch.cuda.Stream(device, priority=dense)

    def _on(self, stream_name: str) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(getattr(self, stream_name)) if self.cuda else contextlib.nullcontext()

    def _mark(self, stream_name: str) -> torch.cuda.Event | None:
        """An event at this point of the stream's work (None on the CPU, where all runs in order)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(getattr(self, stream_name))
        return event

    def _wait(self, stream_name: str, event: torch.cuda.Event | None) -> None:
        if event is not None:
            getattr(self, stream_name).wait_event(event)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        n = input_ids.shape[0]
        split = n // 2
        metas = split_decode_metadata(ctx.attn_metadata, split)
        rows = (slice(0, split), slice(split, n))
        contexts = [ForwardContext(meta, ctx.kv_caches, ctx.backend) for meta in metas]
        # Every tensor made here stays referenced until both streams have joined the caller's: no memory
        # block is handed to one stream while the other may still read it.
        keep: list[torch.Tensor] = []
        if self.cuda:
            caller = torch.cuda.current_stream()
            self.dense_stream.wait_stream(caller)
            self.attention_stream.wait_stream(caller)
        state, ready = [], []
        with self._on("dense_stream"):
            for r in rows:
                qk, v, residual, cos, sin = self.start(input_ids[r], positions[r])
                keep += [qk, v, residual, cos, sin]
                state.append([qk, v, residual, cos, sin])
                ready.append(self._mark("dense_stream"))
        outputs: list[torch.Tensor] = [None, None]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            for h in (0, 1):
                qk, v, residual, cos, sin = state[h]
                self._wait("attention_stream", ready[h])
                with self._on("attention_stream"), set_forward_context(contexts[h]):
                    attn_out = layer.self_attn.attn(qk, v)
                keep.append(attn_out)
                attended = self._mark("attention_stream")
                self._wait("dense_stream", attended)
                with self._on("dense_stream"):
                    if i < last:
                        qk, v, residual = self.between(layer, self.layers[i + 1], attn_out, residual, cos, sin)
                        keep += [qk, v, residual]
                        state[h] = [qk, v, residual, cos, sin]
                    else:
                        outputs[h] = self.finish(layer, attn_out, residual)
                        keep.append(outputs[h])
                ready[h] = self._mark("dense_stream")
        if self.cuda:
            caller.wait_stream(self.dense_stream)
            caller.wait_stream(self.attention_stream)
        hidden = torch.cat(outputs)
        del keep
        return hidden


def make_dual_forward(model: torch.nn.Module, compile: bool, device: torch.device) -> Callable | None:
    """A DualBatchForward for this model when ENGINE_DUAL_BATCH_MIN asks for one and the model allows."""
    if dual_batch_min() == 0 or not supports_dual_batch(model):
        return None
    return DualBatchForward(model, compile, device)
