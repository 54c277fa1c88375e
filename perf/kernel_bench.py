"""Decode-attention kernel benchmark: the Triton backend vs xformers vs SDPA on pre-gathered K/V.

    python perf/kernel_bench.py --out perf/kernel_bench.json
    python perf/kernel_bench.py --nano --out perf/nano_decode.json   # nano's decode steps, kernel variants

One decode step of one layer (every sequence has one query token and the same context length),
timed with `triton.testing.do_bench` (median; it flushes L2 before every run). Bandwidth counts
the bytes a decode step must move at least: the K and V of every context position, read once
(the query and output are negligible), against the 3.0 TB/s device copy measured on the lent
H100 (DESIGN.md).

- triton:   `ops.triton_attention` with block size 16, the engine's default, launched eagerly:
            for small steps this is bound by Triton's host-side launch cost (two launches).
- triton-graph: the same, replayed from a CUDA graph as the engine runs decode
            (`do_bench_cudagraph`, median). It does not flush L2, so each timed call walks
            through enough separate caches (>= 256 MB in all) that L2 cannot hold them.
- xformers: `ops.xformers_attention` with block size 64, where it runs xformers' paged split-K
            kernel (with smaller blocks it gathers K/V first; see its docstring). The time includes
            building xformers' mask from host lists, which that backend pays every call.
- sdpa:     `torch.nn.functional.scaled_dot_product_attention` on K/V already gathered into
            contiguous [batch, kv_heads, context, head_dim] tensors (gather not timed): a dense
            peer reading the same bytes, for a sanity check of the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, no install needed

from ops.attention import get_backend  # noqa: E402
from ops.forward_context import AttentionMetadata  # noqa: E402

COPY_BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy (read + write) measured on the lent H100
MODELS = {  # name: (query heads, kv heads, head_dim)
    "qwen3-0.6b": (16, 8, 128),
    "llama-3.1-8b": (32, 8, 128),
}
SHAPES = [(1, 512), (1, 4096), (1, 32768), (16, 4096), (64, 8192), (256, 512), (256, 2048), (256, 8192)]  # (batch, context)
BLOCK_SIZES = {"triton": 16, "triton-graph": 16, "xformers": 64, "sdpa": 16}
L2_DEFEAT_BYTES = 256 << 20
# --sweep: Triton decode settings (partition size, positions per loop step, warps, pipeline stages)
# tried on a long single sequence and a large batch of Llama-8B-like shapes.
SWEEP_SHAPES = [(1, 32768), (4, 8192), (16, 4096), (256, 2048)]
SWEEP = [(p, n, 4, 2) for p in (256, 512, 1024) for n in (32, 64, 128)] + [(512, 64, 8, 2)]


def decode_inputs(batch, context, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.bfloat16):
    """A decode step over a shuffled paged cache holding exactly the batch's contexts."""
    blocks_per_seq = triton.cdiv(context, block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device="cuda"),
        query_start_loc=query_start_loc.cuda(),
        seq_lens=seq_lens.cuda(),
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=context,
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    query = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=dtype)
    return query, k_cache, v_cache, meta


def decode_step(impl, query, k_cache, v_cache, meta, scale):
    """A zero-argument callable that runs one decode step with `impl`."""
    out = torch.empty_like(query)
    if impl != "sdpa":
        backend = get_backend(impl)
        return lambda: backend.paged_attention(query, k_cache, v_cache, meta, scale, out)
    batch, context = meta.block_tables.shape[0], meta.max_seq_len
    slots = (meta.block_tables.long()[:, :, None] * k_cache.shape[1] + torch.arange(k_cache.shape[1], device="cuda")).flatten(1)
    k = k_cache.flatten(0, 1)[slots[:, :context]].transpose(1, 2).contiguous()  # [batch, kv_heads, context, head_dim]
    v = v_cache.flatten(0, 1)[slots[:, :context]].transpose(1, 2).contiguous()
    q = query[:, :, None, :]  # [batch, heads, 1, head_dim]
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def time_decode(impl, batch, context, num_heads, num_kv_heads, head_dim) -> dict:
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * 2  # K and V, bf16
    copies = -(-L2_DEFEAT_BYTES // kv_bytes) if impl == "triton-graph" else 1
    inputs = [decode_inputs(batch, context, num_heads, num_kv_heads, head_dim, BLOCK_SIZES[impl]) for _ in range(copies)]
    steps = [decode_step(impl.removesuffix("-graph"), *x, head_dim**-0.5) for x in inputs]
    steps[0]()  # compile
    if impl == "triton-graph":
        ms = triton.testing.do_bench_cudagraph(lambda: [step() for step in steps], return_mode="median") / copies
    else:
        ms = triton.testing.do_bench(steps[0], warmup=25, rep=100, return_mode="median")
    del inputs, steps
    torch.cuda.empty_cache()
    gbps = kv_bytes / (ms * 1e-3) / 1e9
    return dict(batch=batch, context=context, impl=impl, block_size=BLOCK_SIZES[impl], time_us=ms * 1e3,
                kv_bytes=kv_bytes, gb_per_s=gbps, fraction_of_copy_bandwidth=gbps * 1e9 / COPY_BANDWIDTH)


def sweep_triton_decode() -> list[dict]:
    from ops import triton_attention as ta

    defaults = (ta.PARTITION_SIZE, ta._DECODE_BLOCK_N, ta._DECODE_NUM_WARPS, ta._DECODE_NUM_STAGES)
    num_heads, num_kv_heads, head_dim = MODELS["llama-3.1-8b"]
    rows = []
    print("\nTriton decode sweep, CUDA-graph timing (llama-3.1-8b shapes): partition, block_n, warps, stages -> GB/s")
    for config in SWEEP:
        ta.PARTITION_SIZE, ta._DECODE_BLOCK_N, ta._DECODE_NUM_WARPS, ta._DECODE_NUM_STAGES = config
        try:
            results = [time_decode("triton-graph", b, c, num_heads, num_kv_heads, head_dim) for b, c in SWEEP_SHAPES]
        except Exception as exc:
            print(f"  {config}: FAILED: {type(exc).__name__}: {exc}"[:400])
            continue
        rows += [dict(r, partition=config[0], block_n=config[1], num_warps=config[2], num_stages=config[3]) for r in results]
        print(f"  {config}: " + "  ".join(f"{r['batch']}x{r['context']}: {r['gb_per_s']:.0f}" for r in results), flush=True)
    ta.PARTITION_SIZE, ta._DECODE_BLOCK_N, ta._DECODE_NUM_WARPS, ta._DECODE_NUM_STAGES = defaults
    return rows


# --nano: the decode steps of nano's run (perf/throughput.py's workload, Qwen3-0.6B's heads), as its CUDA graphs
# run them: each step's live sequences padded to the graph's batch bucket, contexts bounded by max_model_len 4,096
# (so 4 partitions of 1,024 positions a sequence). Variants set ops.triton_attention's module constants.
NANO_STEPS = (50, 500, 900)  # decode steps after the prefill: 256, 126 and 37 live sequences
NANO_MAX_MODEL_LEN = 4096
NANO_VARIANTS = {
    "as is": {},  # heads first (hf), the default since session 23; the partitions merged in the decode kernel (session 26)
    "reduce kernel": {"_DECODE_MERGE_IN_KERNEL": False},  # the partitions merged by a second kernel (before session 26)
    "seq-first": {"_DECODE_HEADS_FIRST": False},  # the grid before session 23 ("as is" in that session's table)
    "reduce-a-head": {"_REDUCE_ELEMENTS": 0},
    "hf p512": {"_DECODE_HEADS_FIRST": True, "PARTITION_SIZE": 512},
    "hf p2048": {"_DECODE_HEADS_FIRST": True, "PARTITION_SIZE": 2048},
    "hf p4096": {"_DECODE_HEADS_FIRST": True, "PARTITION_SIZE": 4096},
    "hf n32": {"_DECODE_HEADS_FIRST": True, "_DECODE_BLOCK_N": 32},
    "hf n128": {"_DECODE_HEADS_FIRST": True, "_DECODE_BLOCK_N": 128},
    "hf w8": {"_DECODE_HEADS_FIRST": True, "_DECODE_NUM_WARPS": 8},
    "hf s3": {"_DECODE_HEADS_FIRST": True, "_DECODE_NUM_STAGES": 3},
    "hf s4": {"_DECODE_HEADS_FIRST": True, "_DECODE_NUM_STAGES": 4},
    "hf v-early": {"_DECODE_HEADS_FIRST": True, "_DECODE_V_EARLY": True},  # session 24: V's tile loaded beside K's
    "hf evict-first": {"_DECODE_HEADS_FIRST": True, "_DECODE_EVICT_FIRST": True},  # K/V loads evict-first in L2
    "hf v-early evict-first": {"_DECODE_HEADS_FIRST": True, "_DECODE_V_EARLY": True, "_DECODE_EVICT_FIRST": True},
    # Double-buffered K/V (session 28). At 2-4 stages Triton 3.6's pipeliner gives the loop one K and one V buffer: the
    # next tile's cp.async is issued after this tile's last read of it and waited for at the top of the next
    # iteration, so a program never has a load in flight while it computes. From 5 stages it keeps two (the next
    # tile's loads fly during this tile's dots). Offline sm_90 compiles (registers, shared bytes; programs an SM):
    # as is 96 / 38,912 (5); s5 128 / 72,192 (3); w8 s5 80 / 72,192 (3); n32 s5 96 / 38,144 (5); n32 s7 (three
    # buffers) 112 / 54,656 (4); n16 s5 79 / 21,120 (6).
    # Over an fp8 cache 5 stages is the default since session 28 (_DECODE_NUM_STAGES_FP8); "fp8 s2" is the loop before.
    "hf s5": {"_DECODE_NUM_STAGES": 5},
    "hf w8 s5": {"_DECODE_NUM_WARPS": 8, "_DECODE_NUM_STAGES": 5, "_DECODE_NUM_STAGES_FP8": 5},
    "hf n32 s5": {"_DECODE_BLOCK_N": 32, "_DECODE_NUM_STAGES": 5, "_DECODE_NUM_STAGES_FP8": 5},
    "hf n32 s7": {"_DECODE_BLOCK_N": 32, "_DECODE_NUM_STAGES": 7, "_DECODE_NUM_STAGES_FP8": 7},
    "hf n16 s5": {"_DECODE_BLOCK_N": 16, "_DECODE_NUM_STAGES": 5, "_DECODE_NUM_STAGES_FP8": 5},
    "fp8 s2": {"_DECODE_NUM_STAGES_FP8": 2},
}
NANO_FP8_VARIANTS = ("as is", "seq-first", "hf p2048", "fp8 s2", "hf n32 s5", "hf n32 s7")
# The same kernel (as is) on the same contexts in another order: "longest-first" puts the batch's sequences in
# order of decreasing context (the grid launches a sequence's programs in batch order, so the longest start
# first and the short ones fill the tail: longest-processing-time-first scheduling). The engine keeps them in
# arrival order (session 24: an experiment, not in the engine).
# "hnd cache": the cache stored [blocks, kv heads, block size, head dim] (each block's positions of one head
# contiguous, 4 KB at nano's shapes, not 16 rows of 256 B 2 KB apart) and handed to the kernel as the usual
# [blocks, block size, kv heads, head dim] view: the kernels read the cache through its strides.
NANO_ORDERS = ("longest-first", "hnd cache")


def nano_decode_inputs(step: int, cache_dtype: torch.dtype, block_size: int = 16, longest_first: bool = False,
                       hnd: bool = False):
    """One layer's decode inputs at nano's decode step `step` (bucket-padded, as its graph replays them),
    its sequences in arrival order (as the engine runs them) or longest first; the cache laid out as the
    engine's (hnd False) or each block's heads apart (a strided view)."""
    from perf.throughput import nano_workload

    num_heads, num_kv_heads, head_dim = MODELS["qwen3-0.6b"]
    prompts, max_tokens = nano_workload()
    lens = [len(p) + step + 1 for p, m in zip(prompts, max_tokens) if m > step]
    if longest_first:
        lens.sort(reverse=True)
    batch = triton.next_power_of_2(len(lens)) if len(lens) <= 8 else -(-len(lens) // 8) * 8  # buckets 1, 2, 4, 8, 16, 24...
    lens += [0] * (batch - len(lens))
    blocks = [-(-n // block_size) for n in lens]
    shape = (sum(blocks), num_kv_heads, block_size, head_dim) if hnd else (sum(blocks), block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda").to(cache_dtype)
    v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(cache_dtype)
    if hnd:
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    order = torch.randperm(sum(blocks), dtype=torch.int32)
    block_tables = torch.zeros(batch, NANO_MAX_MODEL_LEN // block_size, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks):
        block_tables[i, :n] = order[start:start + n]
        start += n
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device="cuda"),
        query_start_loc=query_start_loc.cuda(), seq_lens=seq_lens.cuda(), block_tables=block_tables.cuda(),
        max_query_len=1, max_seq_len=NANO_MAX_MODEL_LEN, query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens,
    )
    query = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    kv_bytes = 2 * sum(lens) * num_kv_heads * head_dim * k_cache.element_size()
    return (query, k_cache, v_cache, meta), kv_bytes, sum(n > 0 for n in lens)


def nano_write_kv_step(query, k_cache, v_cache, meta, scale):
    """The decode step as the engine runs it (`write_kv_and_attend`: the kernel also stores each live sequence's new
    K/V at its last position, -1 slots for the padding rows) on nano_decode_inputs' inputs."""
    from ops import triton_attention as ta

    block_size = k_cache.shape[1]
    last = (meta.seq_lens.long() - 1).clamp(min=0)
    slots = meta.block_tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    meta = dataclasses.replace(meta, slot_mapping=torch.where(meta.seq_lens > 0, slots, -1))
    key = torch.randn(query.shape[0], k_cache.shape[2], query.shape[2], device="cuda", dtype=query.dtype)
    value = torch.randn_like(key)
    out = torch.empty_like(query)
    return lambda: ta.write_kv_and_attend(query, key, value, k_cache, v_cache, meta, scale, out)


# --nano-prefill: the prefill attention of nano's first step (its first prompts, whole, up to 8,192 tokens; the last one
# cut there, as the scheduler chunks it) and of a later one with a chunk's cached context. Variants set
# ops.triton_attention's _PREFILL constants; the names below say what each changes from the tiles before session 28
# (128 rows, 64 positions, 8 warps, 2 stages: "before"). Offline sm_90 compiles (registers, shared bytes): before
# 176 / 98,304 (one program an SM); s5 (three K/V buffers) 174 / 131,584; rows64 w4 188 / 81,920 (two an SM); n32
# 141 / 65,536.
_PREFILL_BEFORE = {"_PREFILL_MAX_ROWS": 128, "_PREFILL_BLOCK_N": 64, "_PREFILL_NUM_WARPS": 8, "_PREFILL_NUM_STAGES": 2}
NANO_PREFILL_VARIANTS = {
    "as is": {},  # "rows64 w4 n32", the default since session 28
    "before": _PREFILL_BEFORE,  # sessions 1-27
    "s3": {**_PREFILL_BEFORE, "_PREFILL_NUM_STAGES": 3},
    "s5": {**_PREFILL_BEFORE, "_PREFILL_NUM_STAGES": 5},
    "n32": {**_PREFILL_BEFORE, "_PREFILL_BLOCK_N": 32},
    "n32 s5": {**_PREFILL_BEFORE, "_PREFILL_BLOCK_N": 32, "_PREFILL_NUM_STAGES": 5},
    "rows64 w4": {**_PREFILL_BEFORE, "_PREFILL_MAX_ROWS": 64, "_PREFILL_NUM_WARPS": 4},
    "rows64 w4 s3": {**_PREFILL_BEFORE, "_PREFILL_MAX_ROWS": 64, "_PREFILL_NUM_WARPS": 4, "_PREFILL_NUM_STAGES": 3},
    "rows64 w4 n32": {**_PREFILL_BEFORE, "_PREFILL_MAX_ROWS": 64, "_PREFILL_NUM_WARPS": 4, "_PREFILL_BLOCK_N": 32},
    "rows64 w4 n32 s5": {**_PREFILL_BEFORE, "_PREFILL_MAX_ROWS": 64, "_PREFILL_NUM_WARPS": 4, "_PREFILL_BLOCK_N": 32,
                         "_PREFILL_NUM_STAGES": 5},
    "w4": {**_PREFILL_BEFORE, "_PREFILL_NUM_WARPS": 4},  # 128 rows on 4 warps: 255 registers and a 232-byte stack
}


def nano_prefill_inputs(first_prompt: int, budget: int = 8192, chunk_done: int = 0, block_size: int = 16,
                        model: str = "qwen3-0.6b", prompt_lens: list[int] | None = None):
    """One layer's prefill inputs: prompts (nano's, or of `prompt_lens`) from `first_prompt` on, the first of them
    `chunk_done` tokens in (cached), as many as fit `budget` tokens (the last one cut), `model`'s heads.
    Returns (inputs, FLOPs of the causal attention, number of sequences)."""
    from perf.throughput import nano_workload

    num_heads, num_kv_heads, head_dim = MODELS[model]
    prompt_lens = prompt_lens or [len(p) for p in nano_workload()[0]]
    if chunk_done >= prompt_lens[first_prompt]:
        raise ValueError(f"prompt {first_prompt} has {prompt_lens[first_prompt]} tokens, not more than {chunk_done}")
    q_lens, ctx_lens, left = [], [], budget
    for i, length in enumerate(prompt_lens[first_prompt:]):
        done = chunk_done if i == 0 else 0
        n = min(length - done, left)
        q_lens.append(n)
        ctx_lens.append(done)
        left -= n
        if left == 0:
            break
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    blocks = [-(-n // block_size) for n in seq_lens]
    k_cache = torch.randn(sum(blocks), block_size, num_kv_heads, head_dim, device="cuda").to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(sum(blocks), dtype=torch.int32)
    block_tables = torch.zeros(len(seq_lens), NANO_MAX_MODEL_LEN // block_size, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks):
        block_tables[i, :n] = order[start:start + n]
        start += n
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64, device="cuda"),
        query_start_loc=query_start_loc.cuda(), seq_lens=seq_lens_t.cuda(), block_tables=block_tables.cuda(),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens_t,
    )
    query = torch.randn(sum(q_lens), num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    flops = sum(4 * head_dim * num_heads * (q * c + q * (q + 1) // 2) for q, c in zip(q_lens, ctx_lens))
    return (query, k_cache, v_cache, meta), flops, len(q_lens)


def nano_prefill_sweep(only: list[str] | None = None) -> list[dict]:
    """Each prefill variant (or those in `only`) on nano's first prefill step and a later one, graph-timed."""
    from ops import triton_attention as ta

    head_dim = MODELS["qwen3-0.6b"][2]
    rows = []
    cases = (("nano step 1", dict(first_prompt=0)), ("nano, a later step", dict(first_prompt=119, chunk_done=300)),
             ("8B fixed (256-token prompts)", dict(first_prompt=0, model="llama-3.1-8b", prompt_lens=[256] * 64)))
    for label, case in cases:
        inputs, flops, seqs = nano_prefill_inputs(**case)
        line = f"prefill {label} ({seqs} sequences, {flops / 1e9:.1f} GFLOP):"
        for name in (n for n in NANO_PREFILL_VARIANTS if only is None or n in only):
            saved = {key: getattr(ta, key) for key in NANO_PREFILL_VARIANTS[name]}
            for key, value in NANO_PREFILL_VARIANTS[name].items():
                setattr(ta, key, value)
            try:
                step_fn = decode_step("triton", *inputs, head_dim**-0.5)
                step_fn()
                ms = triton.testing.do_bench_cudagraph(step_fn, return_mode="median")
            except Exception as exc:
                print(f"  {name}: FAILED {type(exc).__name__}: {exc}"[:300])
                continue
            finally:
                for key, value in saved.items():
                    setattr(ta, key, value)
            rows.append(dict(variant=name, step=label, sequences=seqs, flops=flops, time_us=ms * 1e3,
                             tflops=flops / (ms * 1e-3) / 1e12))
            line += f"  {name} {ms * 1e3:.1f} us {rows[-1]['tflops']:.0f} TFLOPS;"
        print(line, flush=True)
        del inputs
        torch.cuda.empty_cache()
    return rows


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Reads ITERS * BLOCK consecutive elements a program, writes their sum (so the loads are not dropped)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(ITERS, num_stages=3):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def read_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a plain streaming read of `nbytes` of bf16 (the ceiling a decode kernel could reach)."""
    x = torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16)
    block, iters = 4096, 16
    grid = triton.cdiv(x.numel(), block * iters)
    out = torch.empty(grid, device="cuda")
    ms = triton.testing.do_bench_cudagraph(lambda: _read_kernel[(grid,)](x, out, x.numel(), BLOCK=block, ITERS=iters),
                                           return_mode="median")
    return nbytes / (ms * 1e-3) / 1e9


def nano_sweep(only: list[str] | None = None, write_kv: bool = False) -> list[dict]:
    """Every variant (or those in `only`) at every step of NANO_STEPS (bf16 cache), some with an fp8 cache: decode +
    merge, graph-timed; with write_kv, as the engine launches it (nano_write_kv_step)."""
    from ops import triton_attention as ta

    head_dim = MODELS["qwen3-0.6b"][2]
    print(f"\nstreaming read: {read_bandwidth():.0f} GB/s")
    rows = []
    for cache_dtype, variants in ((torch.bfloat16, list(NANO_VARIANTS)), (torch.float8_e4m3fn, NANO_FP8_VARIANTS)):
        variants = [name for name in variants if only is None or name in only]
        for step in NANO_STEPS if cache_dtype == torch.bfloat16 else NANO_STEPS[:2]:
            inputs, kv_bytes, live = nano_decode_inputs(step, cache_dtype)
            line = f"{str(cache_dtype).removeprefix('torch.'):>14} step {step:>4} ({live:>3} live, {kv_bytes / 1e9:5.2f} GB):"
            for name in variants:
                saved = {key: getattr(ta, key) for key in NANO_VARIANTS[name]}
                for key, value in NANO_VARIANTS[name].items():
                    setattr(ta, key, value)
                try:
                    step_fn = (nano_write_kv_step if write_kv else functools.partial(decode_step, "triton"))(
                        *inputs, head_dim**-0.5)
                    step_fn()
                    ms = triton.testing.do_bench_cudagraph(step_fn, return_mode="median")
                except Exception as exc:  # one failing variant must not cost the others' numbers
                    print(f"  {name}: FAILED {type(exc).__name__}: {exc}"[:300])
                    continue
                finally:
                    for key, value in saved.items():
                        setattr(ta, key, value)
                rows.append(dict(variant=name, cache=str(cache_dtype), step=step, live=live, kv_bytes=kv_bytes,
                                 time_us=ms * 1e3, gb_per_s=kv_bytes / (ms * 1e-3) / 1e9, write_kv=write_kv))
                line += f"  {name} {ms * 1e3:.1f} us {rows[-1]['gb_per_s']:.0f} GB/s;"
            if cache_dtype == torch.bfloat16:
                for order in (o for o in NANO_ORDERS if only is None or o in only):
                    del inputs
                    inputs, kv_bytes, live = nano_decode_inputs(step, cache_dtype, longest_first=order == "longest-first",
                                                                hnd=order == "hnd cache")
                    step_fn = decode_step("triton", *inputs, head_dim**-0.5)
                    step_fn()
                    ms = triton.testing.do_bench_cudagraph(step_fn, return_mode="median")
                    rows.append(dict(variant=order, cache=str(cache_dtype), step=step, live=live, kv_bytes=kv_bytes,
                                     time_us=ms * 1e3, gb_per_s=kv_bytes / (ms * 1e-3) / 1e9))
                    line += f"  {order} {ms * 1e3:.1f} us {rows[-1]['gb_per_s']:.0f} GB/s;"
            print(line, flush=True)
            del inputs
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--impls", default="triton,triton-graph,xformers,sdpa", help="comma-separated subset of the default")
    parser.add_argument("--sweep", action="store_true", help="also time Triton decode settings (SWEEP)")
    parser.add_argument("--nano", action="store_true", help="only nano's decode steps, NANO_VARIANTS (see nano_sweep)")
    parser.add_argument("--variants", help="with --nano: a comma-separated subset of NANO_VARIANTS and NANO_ORDERS")
    parser.add_argument("--write-kv", action="store_true",
                        help="with --nano: time the engine's decode launch (the kernel also writes the step's K/V)")
    parser.add_argument("--nano-prefill", action="store_true", help="only nano's prefill attention, NANO_PREFILL_VARIANTS")
    args = parser.parse_args()
    if args.nano_prefill:
        only = args.variants.split(",") if args.variants else None
        rows = nano_prefill_sweep(only)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), nano_prefill=rows), indent=2))
        return
    if args.nano:
        only = args.variants.split(",") if args.variants else None
        unknown = set(only or ()) - set(NANO_VARIANTS) - set(NANO_ORDERS)
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}; known: {list(NANO_VARIANTS) + list(NANO_ORDERS)}")
        rows = nano_sweep(only, args.write_kv)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), nano=rows), indent=2))
        return
    impls = args.impls.split(",")
    if "xformers" in impls:
        try:
            import xformers  # noqa: F401
        except ImportError:
            print("xformers not importable: skipping it")
            impls.remove("xformers")

    results = []
    header = f"{'model':<14}{'batch':>6}{'context':>8}  {'impl':<9}{'time us':>10}{'GB/s':>8}{'% copy':>8}"
    print(header)
    print("-" * len(header))
    for model, (num_heads, num_kv_heads, head_dim) in MODELS.items():
        for batch, context in SHAPES:
            for impl in impls:
                try:
                    r = dict(model=model, **time_decode(impl, batch, context, num_heads, num_kv_heads, head_dim))
                except Exception as exc:  # one failing implementation must not cost the others' numbers
                    print(f"{model:<14}{batch:>6}{context:>8}  {impl:<9} FAILED: {type(exc).__name__}: {exc}"[:400])
                    results.append(dict(model=model, batch=batch, context=context, impl=impl, error=repr(exc)[:400]))
                    continue
                results.append(r)
                print(f"{model:<14}{batch:>6}{context:>8}  {impl:<9}{r['time_us']:>10.1f}{r['gb_per_s']:>8.0f}"
                      f"{100 * r['fraction_of_copy_bandwidth']:>7.0f}%", flush=True)
    sweep = sweep_triton_decode() if args.sweep else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        triton=triton.__version__, copy_bandwidth_bytes_per_s=COPY_BANDWIDTH,
                                        results=results, triton_decode_sweep=sweep), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
