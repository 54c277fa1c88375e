"""ModelRunner: owns the model and the KV cache tensors; turns a scheduled batch into one forward
pass and samples the next tokens.

Inputs are flattened: every scheduled sequence contributes its new tokens (a prompt chunk or one
decode token) to one [num_tokens] batch, and `AttentionMetadata` tells the attention op where each
token's K/V go and what each sequence attends over.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from engine import communication
from engine.config import EngineArgs, ModelConfig
from engine.device_io import HostCopy, host_to_device
from engine.outputs import Logprob, PositionLogprobs
from engine.sampler import SamplerOutput, SamplingBatch, sample
from engine.scheduler import ScheduledSequence
from engine.tensor_parallel import TensorParallelError, TensorParallelWorkers
from engine.weight_loader import load_model, weight_memory
from graphs.compile import compile_model, num_compiled_graphs
from graphs.cuda_graph import CudaGraphRunner, default_batch_sizes
from ops.attention import get_backend
from ops.forward_context import AttentionMetadata, ForwardContext, set_forward_context

logger = logging.getLogger("engine")

_DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


@dataclass
class ModelRunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq id -> next token
    logprobs: dict[int, PositionLogprobs] = field(default_factory=dict)  # seq id -> that token's logprobs
    prompt_logprobs: dict[int, list[PositionLogprobs]] = field(default_factory=dict)  # seq id -> this chunk's
    device_wait_s: float = 0.0  # how long the host waited for the sampled ids to arrive


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: list[int]  # flat index of the last token of each sequence that samples
    prompt_logprob_rows: list[tuple[int, list[int], list[int]]]  # (scheduled index, flat rows, target tokens)
    logits_rows: torch.Tensor | None  # sample_rows then every prompt-logprob row; None when no row needs logits
    pending_rows: list[tuple[int, int]]  # (flat row, seq id) of inputs the step in flight is sampling


class BlockTableRows:
    """The block tables of the sequences a step computes, as one [sequences, blocks] int32 array
    (zero past each table's end), from rows kept from step to step, as vLLM V1 keeps its block
    tables: a step copies in only the blocks added since the row was last read (a decode adds one
    every block_size steps). Building the array anew converted every entry of every table each
    step: ~0.18 ms of `_prepare`'s ~0.35 at nano's 256 sequences on the CPU.

    This relies on how the block manager changes a table: it only ever appends to a sequence's
    `block_table` list in place; any other change (admission, fork, copy-on-write, freeing) gives
    the sequence a new list. A row whose sequence holds another list than the one it was read
    from is read again whole."""

    def __init__(self, num_rows: int):
        self.array = np.zeros((num_rows, 8), dtype=np.int32)  # widened as tables grow
        self.row_of: dict[int, int] = {}  # seq id -> its row
        self.source: list[list[int] | None] = [None] * num_rows  # the list each row was read from
        self.length = [0] * num_rows  # how many of its entries are in the row
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def gather(self, seqs: list) -> np.ndarray:
        rows, max_blocks = [], 0
        for seq in seqs:
            table = seq.block_table
            row = self.row_of.get(seq.seq_id)
            if row is None:
                row = self._take_row(seq, seqs)
            if self.source[row] is not table:  # a new list: clear the row, read it whole
                self.array[row, : self.length[row]] = 0
                self.source[row], self.length[row] = table, 0
            done, n = self.length[row], len(table)
            if n != done:
                if n > self.array.shape[1]:
                    self._widen(n)
                self.array[row, done:n] = table[done:]
                self.length[row] = n
            rows.append(row)
            max_blocks = max(max_blocks, n)
        return self.array[rows, :max_blocks]  # a copy (fancy indexing)

    def _take_row(self, seq, seqs: list) -> int:
        if not self.free_rows:  # give back the rows of sequences not in this step (finished or waiting)
            current = {s.seq_id for s in seqs}
            for seq_id, row in list(self.row_of.items()):
                if seq_id not in current:
                    del self.row_of[seq_id]
                    self.source[row] = None
                    self.free_rows.append(row)
        row = self.free_rows.pop()
        self.row_of[seq.seq_id] = row
        return row

    def _widen(self, num_blocks: int) -> None:
        rows, width = self.array.shape
        wider = np.zeros((rows, max(num_blocks, 2 * width)), dtype=np.int32)
        wider[:, :width] = self.array
        self.array = wider


class ModelRunner:
    """One rank's model shard and KV cache. With tensor parallelism every rank has one; rank 0's also
    prepares each step, starts the other ranks (`TensorParallelWorkers`) and samples."""

    def __init__(self, args: EngineArgs, model_config: ModelConfig, device: torch.device, tp_rank: int = 0):
        self.args = args
        self.model_config = model_config
        self.device = device
        self.block_size = args.block_size
        self.tp_rank, self.tp_size = tp_rank, args.tensor_parallel_size
        hf = model_config.hf_config
        self.num_layers = hf.num_hidden_layers
        total_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.num_kv_heads = max(1, total_kv_heads // self.tp_size)  # this rank's: its share, or one replicated head
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.attention_backend = args.resolve_attention_backend(device)
        self.kv_cache_dtype = args.resolve_kv_cache_dtype(model_config.dtype)
        self._check_attention_backend()
        # Twice the most sequences a step holds: a step can always find a row for each of its own.
        self.block_table_rows = BlockTableRows(2 * args.max_num_seqs)
        self.workers: TensorParallelWorkers | None = None
        if self.tp_size > 1 and tp_rank == 0:
            self.workers = TensorParallelWorkers(args, model_config, device)
        with self.workers.lockstep() if self.workers is not None else contextlib.nullcontext():
            self._load_and_allocate()

    def _load_and_allocate(self) -> None:
        """Load this rank's weights, size and allocate the KV cache, compile and capture graphs."""
        args, model_config, device = self.args, self.model_config, self.device
        start = time.perf_counter()
        self.model = load_model(model_config.model, model_config.hf_config, model_config.dtype, device,
                                self.tp_rank, self.tp_size, model_config.quant_config, load_format=args.load_format)
        logger.info("loaded %s in %.1f s (%s, %s)", model_config.model, time.perf_counter() - start, model_config.dtype, device)
        if self.tp_size > 1:
            self._init_all_reduce()
        weights, dense = weight_memory(self.model, model_config.dtype)
        if model_config.quant_config is not None:
            # The KV cache is sized from what is left after the weights, so it gets what they free.
            logger.info("weights: %.2f GiB, %.2f GiB less than unquantized (%.2f GiB): that much more for the KV cache",
                        weights / 2**30, (dense - weights) / 2**30, dense / 2**30)
        else:
            logger.info("weights: %.2f GiB", weights / 2**30)
        self.num_blocks = self._num_kv_blocks()
        if self.tp_size > 1:  # every rank must hold every block the scheduler hands out
            fewest = torch.tensor([self.num_blocks], device=device)
            dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
            self.num_blocks = int(fewest.item())
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        max_blocks_per_seq = -(-model_config.max_model_len // self.block_size)
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%s); max concurrency at max_model_len %d: %.2fx",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size, str(self.kv_cache_dtype).removeprefix("torch."),
            model_config.max_model_len, self.num_blocks / max_blocks_per_seq,
        )
        self.forward = self.model
        self.graph_runner: CudaGraphRunner | None = None
        if device.type == "cuda" and not args.enforce_eager:
            self._compile_and_capture()
        if device.type == "cuda":
            self._warm_up_logits_and_sampling()

    def _init_all_reduce(self) -> None:
        """The layers' all-reduce: the custom one (see engine.communication) unless turned off; before
        compiling, which traces the choice into the graphs."""
        if self.args.disable_custom_all_reduce:
            logger.info("tensor-parallel all-reduce: NCCL / gloo (--disable-custom-all-reduce)")
            communication.shutdown_custom_all_reduce()
            return
        communication.init_custom_all_reduce(self.device, self.model_config.dtype, self.args.max_num_batched_tokens,
                                             self.model_config.hf_config.hidden_size)

    @torch.inference_mode()
    def _warm_up_logits_and_sampling(self) -> None:
        """Run the LM head and every sampler path once at start (they run outside the CUDA graphs),
        so the first request does not pay for them: CUDA loads a kernel's module on its first
        launch, cuBLAS picks its kernels on a shape's first call, and the fused sampler is compiled
        by Triton on its first (the 8B server's first request took 99-146 ms to its first token,
        the next ones ~12-18 ms, before this). Every rank runs the LM head (its all-gather is a
        collective); rank 0 samples."""
        from engine.sampling_params import SamplingParams

        start = time.perf_counter()
        hidden_size = self.model_config.hf_config.hidden_size
        variants = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
                    SamplingParams(temperature=1.0, top_p=0.9, logprobs=1)]
        for rows in sorted({1, 2, self.args.max_num_seqs}):  # 1 and 2: the LM head's GEMV variants
            hidden = torch.zeros(rows, hidden_size, dtype=self.model_config.dtype, device=self.device)
            logits = self.model.compute_logits(hidden, upcast=False)
            if self.tp_rank != 0:
                continue
            for params in variants:
                seeded = torch.Generator(self.device).manual_seed(0)
                batch = SamplingBatch(params=[params] * rows, generators=[seeded] + [None] * (rows - 1),
                                      token_ids=[[0]] * rows, num_prompt_tokens=[1] * rows, eos_token_ids=set())
                sample(logits, batch, self.args.max_logprobs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("warmed up the LM head and the sampler in %.1f s", time.perf_counter() - start)

    def _compile_and_capture(self) -> None:
        """torch.compile the forward, then capture decode CUDA graphs per batch-size bucket."""
        start = time.perf_counter()
        if self.args.compile_model:
            self.forward = compile_model(self.model)
        blocker = self._cuda_graph_blocker()
        if blocker is not None:
            logger.info("%s cannot run inside CUDA graphs: compiled, no graphs", blocker)
            return
        sizes = self.args.cuda_graph_sizes or default_batch_sizes(self.args.max_num_seqs)
        mixed = self.args.resolve_mixed_cuda_graph_sizes() or None
        self.graph_runner = CudaGraphRunner(
            self.forward, self.kv_caches, self.attention_backend, sizes,
            self.model_config.max_model_len, self.block_size, self.device,
            mixed_sizes=mixed, max_num_seqs=self.args.max_num_seqs,
        )
        self.graph_runner.capture()
        self.compiled_graphs_after_warmup = num_compiled_graphs()
        logger.info(
            "compiled the model and captured %d CUDA graphs (batch sizes %d..%d%s) in %.1f s; %d compiled graphs",
            len(sizes) + len(set(mixed or ())), min(sizes), max(sizes),
            f"; prefill / mixed steps in token buckets {', '.join(map(str, sorted(set(mixed))))}" if mixed else "",
            time.perf_counter() - start, self.compiled_graphs_after_warmup,
        )

    def _cuda_graph_blocker(self) -> str | None:
        """What in this model reads device values on the host (which graph capture forbids), if anything."""
        if not getattr(get_backend(self.attention_backend), "CUDA_GRAPH_SAFE", True):
            return f"attention backend {self.attention_backend}"
        for module in self.model.modules():
            method = getattr(module, "quant_method", None)
            if not getattr(method, "CUDA_GRAPH_SAFE", True):
                return f"quantization method {type(method).__name__}"
        return None

    def recompiles_since_warmup(self) -> int:
        """Graphs compiled since capture (which compiled every shape a step can have)."""
        if self.graph_runner is None:
            return 0
        return num_compiled_graphs() - self.compiled_graphs_after_warmup

    def _check_attention_backend(self) -> None:
        """Fail at start, not at the first request, when the backend cannot serve this model."""
        name = self.attention_backend
        if name != "torch" and self.device.type != "cuda":
            raise ValueError(f"attention backend {name!r} needs a CUDA device; use 'torch' (or 'auto') on {self.device.type}")
        backend = get_backend(name)
        if hasattr(backend, "check_supported"):
            backend.check_supported(self.block_size, self.head_dim, self.model_config.dtype)
        logger.info("attention backend: %s", name)

    # ---- KV cache --------------------------------------------------------------------------------

    @property
    def kv_bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def _num_kv_blocks(self) -> int:
        args = self.args
        if args.num_gpu_blocks_override is not None:
            return args.num_gpu_blocks_override
        if args.kv_cache_memory is not None:
            budget = args.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._profile_free_gpu_memory()
        else:
            budget = _DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = budget // self.kv_bytes_per_block
        # No more than every sequence could ever use at once.
        ceiling = args.max_num_seqs * -(-self.model_config.max_model_len // self.block_size)
        num_blocks = min(num_blocks, ceiling)
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache (budget {budget} bytes); lower max_num_batched_tokens or raise the memory budget")
        return int(num_blocks)

    def _profile_free_gpu_memory(self) -> int:
        """Run the largest step the scheduler can produce, then give the KV cache what is left of
        gpu_memory_utilization."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = self.args.max_num_batched_tokens
        num_rows = min(self.args.max_num_seqs, num_tokens)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode(), set_forward_context(ForwardContext(None, [], self.attention_backend)):
            positions = torch.arange(num_tokens, device=self.device) % self.model_config.max_model_len
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[:num_rows]).softmax(dim=-1)
        torch.cuda.synchronize()
        del hidden
        # The KV cache gets what the peak leaves, so blocks the profile left cached in torch's allocator
        # would come on top of gpu_memory_utilization: handed back now. Every Llama-3.1-8B start had
        # ~9.2 GiB cached at its first graph capture, with ~1.5 GiB of activations at the peak (perf/RESULTS.md,
        # session 19); the chunked attention's growing buffers here are the likely source (not yet seen).
        cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
        not_torch = total - free - torch.cuda.memory_reserved()
        logger.info("memory: %.2f GiB of %.2f GiB for this engine (gpu_memory_utilization %.2f); weights and "
                    "the largest step's activations take %.2f GiB at most, memory outside torch %.2f GiB; the "
                    "profile left %.2f GiB cached by torch (handed back)",
                    total * self.args.gpu_memory_utilization / 2**30, total / 2**30, self.args.gpu_memory_utilization,
                    peak / 2**30, not_torch / 2**30, cached / 2**30)
        return int(total * self.args.gpu_memory_utilization - peak - not_torch)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        dtype = self.kv_cache_dtype
        return [
            (torch.empty(shape, dtype=dtype, device=self.device), torch.empty(shape, dtype=dtype, device=self.device))
            for _ in range(self.num_layers)
        ]

    def check_health(self) -> None:
        """Raise TensorParallelError once a tensor-parallel worker has failed or exited (the monitor
        thread records it at once, even between steps): no step can run again."""
        if self.workers is not None and self.workers.failure is not None:
            raise TensorParallelError(self.workers.failure)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave the process group (nothing to do with one rank)."""
        if self.workers is not None:
            self.graph_runner = None  # the graphs hold collectives of the group about to go
            communication.shutdown_custom_all_reduce()
            self.workers.shutdown()

    # ---- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence], eos_token_ids: set[int],
                block_copies: list[tuple[int, int]] = ()) -> ModelRunnerOutput:
        batch = self._prepare(scheduled)
        inputs = (batch.input_ids, batch.positions, batch.metadata, batch.logits_rows, self._copies(block_copies))
        # With tensor parallelism the workers run the same step in lockstep; sampling is inside, as
        # its wait for the device is where a worker's failure in an asynchronous (NCCL) step shows.
        with self.workers.step(*inputs) if self.workers is not None else contextlib.nullcontext():
            logits = self.execute_model(*inputs)
            out = ModelRunnerOutput()
            if logits is not None:
                num_sampled = len(batch.sample_rows)
                self._sample(logits[:num_sampled], batch, scheduled, eos_token_ids, out)
                self._prompt_logprobs(logits[num_sampled:], batch, scheduled, out)
        return out

    @torch.inference_mode()
    def execute_model(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                      logits_rows: torch.Tensor | None, block_copies: torch.Tensor | None = None) -> torch.Tensor | None:
        """What every tensor-parallel rank runs in lockstep, the same way (its collectives inside):
        the copy-on-write block copies [K, 2] (src, dst), the forward, then the logits of
        `logits_rows` in the model's dtype (None: no row needs them; the sampler widens them to
        float32 where it needs to)."""
        if block_copies is not None:
            src, dst = block_copies[:, 0], block_copies[:, 1]
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst] = k_cache[src]  # (index_copy_ has no float8 kernel on the CPU)
                v_cache[dst] = v_cache[src]
        graphs = self.graph_runner
        if graphs is not None and meta.max_query_len == 1 and meta.num_seqs <= graphs.max_batch_size:
            hidden = graphs.run(input_ids, positions, meta)
        elif graphs is not None and meta.max_query_len > 1 and graphs.mixed_bucket_for(input_ids.shape[0], meta.num_seqs):
            hidden = graphs.run_mixed(input_ids, positions, meta)
        else:
            with set_forward_context(ForwardContext(meta, self.kv_caches, self.attention_backend)):
                hidden = self.forward(input_ids, positions)
        return None if logits_rows is None else self.model.compute_logits(hidden[logits_rows], upcast=False)

    def _prepare(self, scheduled: list[ScheduledSequence]) -> PreparedBatch:
        bs = self.block_size
        input_ids, positions, slots, seq_lens, query_lens = [], [], [], [], []
        sample_rows, prompt_rows, pending_rows = [], [], []
        num_tokens = 0
        last_row: dict[int, int] = {}  # seq id -> its last row this step (forks sample from it)
        computed = []  # the sequences with tokens in this step's forward (not forks)
        for i, s in enumerate(scheduled):
            seq = s.seq
            if s.sample_from is not None:
                sample_rows.append(last_row[s.sample_from.seq_id])
                continue
            computed.append(seq)
            num_new = s.num_new_tokens
            start = seq.num_computed_tokens
            end = start + num_new
            table = seq.block_table
            if num_new == 1:  # decode: plain Python beats numpy for one token
                if start < len(seq.token_ids):
                    input_ids.append(seq.token_ids[start])
                else:  # async scheduling: the token is still being sampled by the step in flight
                    input_ids.append(0)
                    pending_rows.append((num_tokens, seq.seq_id))
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                pos = np.arange(start, end)
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(pos.tolist())
                slots.extend((np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            seq_lens.append(end)
            query_lens.append(num_new)
            row = last_row[seq.seq_id] = num_tokens + num_new - 1
            if s.samples:
                sample_rows.append(row)
            if seq.request.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                last = min(end, seq.num_prompt_tokens - 1)  # position p predicts prompt token p + 1
                rows = list(range(num_tokens, num_tokens + last - start))
                prompt_rows.append((i, rows, seq.token_ids[start + 1 : last + 1]))
            num_tokens += num_new

        tables = self.block_table_rows.gather(computed)
        query_start = np.zeros(len(computed) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        query_start_cpu = torch.from_numpy(query_start)
        seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int32)
        dev = self.device
        metadata = AttentionMetadata(
            slot_mapping=host_to_device(slots, torch.long, dev),
            query_start_loc=host_to_device(query_start_cpu, torch.int32, dev),
            seq_lens=host_to_device(seq_lens_cpu, torch.int32, dev),
            block_tables=host_to_device(tables, torch.int32, dev),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )
        logits_rows = sample_rows + [row for _, rows, _ in prompt_rows for row in rows]
        return PreparedBatch(
            input_ids=host_to_device(input_ids, torch.long, dev),
            positions=host_to_device(positions, torch.long, dev),
            metadata=metadata,
            sample_rows=sample_rows,
            prompt_logprob_rows=prompt_rows,
            logits_rows=host_to_device(logits_rows, torch.long, dev) if logits_rows else None,
            pending_rows=pending_rows,
        )

    def _sample(self, logits, batch: PreparedBatch, scheduled, eos_token_ids, out: ModelRunnerOutput) -> None:
        sampled = self._launch_sampling(logits, batch, scheduled, eos_token_ids)
        if sampled is not None:
            _collect_sampling(sampled, out, self.workers)

    def _launch_sampling(self, logits, batch: PreparedBatch, scheduled, eos_token_ids) -> SampledRows | None:
        """Queue the sampler on the device; nothing is read back."""
        if not batch.sample_rows:
            return None
        seqs = [s.seq for s in scheduled if s.samples]
        sampling = SamplingBatch(
            params=[seq.params for seq in seqs],
            generators=[seq.generator for seq in seqs],
            token_ids=[seq.token_ids for seq in seqs],
            num_prompt_tokens=[seq.num_prompt_tokens for seq in seqs],
            eos_token_ids=eos_token_ids,
        )
        return SampledRows(seqs, sample(logits, sampling, self.args.max_logprobs))

    # ---- async scheduling: launch a step now, read its tokens back one step later ----------------

    def _copies(self, block_copies: list[tuple[int, int]]) -> torch.Tensor | None:
        return host_to_device(block_copies, torch.long, self.device) if block_copies else None

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledSequence], eos_token_ids: set[int],
               previous: SampledRows | list[SampledRows] | None,
               block_copies: list[tuple[int, int]] = ()) -> SampledRows | None:
        """Queue a step's forward and sampling without waiting for them. A decode whose input is a
        token that a step still in flight (`previous`, newest first) is sampling takes it from the device
        directly, from the newest step that samples for it.
        Requests that need prompt logprobs or the token history run synchronously instead.

        With tensor parallelism the workers get the step as in `execute` (the filled-in input ids
        travel in the broadcast, queued after the step that samples them) and run ahead too: no
        rank waits for its device until `collect`."""
        batch = self._prepare(scheduled)
        if batch.pending_rows:
            steps = [previous] if isinstance(previous, SampledRows) else list(previous or ())
            for step, rows, sources in _pending_sources(batch.pending_rows, steps):
                rows = host_to_device(rows, torch.long, self.device)
                sources = host_to_device(sources, torch.long, self.device)
                batch.input_ids[rows] = step.result.token_ids[sources]
        inputs = (batch.input_ids, batch.positions, batch.metadata, batch.logits_rows, self._copies(block_copies))
        with self.workers.step(*inputs) if self.workers is not None else contextlib.nullcontext():
            logits = self.execute_model(*inputs)
            if logits is None:
                return None
            return self._launch_sampling(logits[: len(batch.sample_rows)], batch, scheduled, eos_token_ids)

    def collect(self, sampled: SampledRows | None) -> ModelRunnerOutput:
        """Read a launched step's tokens back (waits for its device work). With tensor parallelism
        this wait is where a worker's failure in an asynchronous (NCCL) step shows."""
        out = ModelRunnerOutput()
        if sampled is None:
            return out
        with self.workers.lockstep() if self.workers is not None else contextlib.nullcontext():
            _collect_sampling(sampled, out, self.workers)
            if self.workers is not None and self.workers.failure is not None:
                raise TensorParallelError(self.workers.failure)
        return out

    def _prompt_logprobs(self, logits, batch: PreparedBatch, scheduled, out: ModelRunnerOutput) -> None:
        start = 0
        for index, rows, targets in batch.prompt_logprob_rows:
            seq = scheduled[index].seq
            k = min(seq.params.prompt_logprobs, self.args.max_logprobs)
            logprobs = torch.log_softmax(logits[start : start + len(rows)].float(), dim=-1)
            start += len(rows)
            target = host_to_device(targets, torch.long, self.device)[:, None]
            chosen = logprobs.gather(1, target)
            ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
            top_vals, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long())
            chosen, top_vals, top_ids = chosen.squeeze(1).tolist(), top_vals.tolist(), top_ids.tolist()
            out.prompt_logprobs[seq.seq_id] = [
                _position_logprobs(targets[j], chosen[j], ranks[j], top_vals[j], top_ids[j]) for j in range(len(rows))
            ]


@dataclass
class SampledRows:
    """The sequences a step sampled for, in row order, the sampler's device tensors, and their
    copies to the host, queued as soon as the sampler is (read them with `_collect_sampling`)."""

    seqs: list
    result: SamplerOutput
    row_of: dict[int, int] = field(init=False)  # seq id -> row
    host: HostCopy = field(init=False)

    def __post_init__(self) -> None:
        self.row_of = {seq.seq_id: i for i, seq in enumerate(self.seqs)}
        r = self.result
        logprobs = [] if r.sampled_logprobs is None else [r.sampled_logprobs, r.sampled_ranks, r.top_logprobs, r.top_token_ids]
        self.host = HostCopy([r.token_ids] + logprobs)


def _pending_sources(pending_rows: list[tuple[int, int]], steps: list[SampledRows]):
    """(step, input rows, its sampled rows) for each in-flight step (newest first) that samples the input
    token of some of `pending_rows` ((row, seq id) pairs): a sequence's newest pending token is its input.
    One step in flight (the default): one group."""
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for row, seq_id in pending_rows:
        for i, step in enumerate(steps):
            source = step.row_of.get(seq_id)
            if source is not None:
                rows, sources = groups.setdefault(i, ([], []))
                rows.append(row)
                sources.append(source)
                break
        else:
            raise RuntimeError(f"sequence {seq_id} awaits a token that no step in flight samples")
    return [(steps[i], rows, sources) for i, (rows, sources) in groups.items()]


def _collect_sampling(sampled: SampledRows, out: ModelRunnerOutput, workers: TensorParallelWorkers | None) -> None:
    """Wait for a step's sampled tokens (and logprobs) to reach the host; book them in `out`. With
    tensor parallelism the wait gives up once a worker has failed."""
    start = time.perf_counter()
    host_tensors = sampled.host.wait(workers.failed if workers is not None else None)
    out.device_wait_s += time.perf_counter() - start
    token_ids, *logprobs = (t.tolist() for t in host_tensors)
    for seq, token in zip(sampled.seqs, token_ids):
        out.sampled[seq.seq_id] = token
    if not logprobs:
        return
    chosen, ranks, top_vals, top_ids = logprobs
    for i, seq in enumerate(sampled.seqs):
        k = seq.params.logprobs
        if k is not None:
            out.logprobs[seq.seq_id] = _position_logprobs(token_ids[i], chosen[i], ranks[i], top_vals[i][:k], top_ids[i][:k])


def _position_logprobs(token: int, logprob: float, rank: int, top_vals: list[float], top_ids: list[int]) -> PositionLogprobs:
    entry = {tid: Logprob(val, rank=r + 1) for r, (tid, val) in enumerate(zip(top_ids, top_vals))}
    entry[token] = Logprob(logprob, rank=rank)
    return entry
