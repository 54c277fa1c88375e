"""Triton PagedAttention: the primary GPU backend (same two functions as `ops.torch_ref`).

Three kernels share one inner loop, `_attend_kv_range`, which walks a range of context positions
of one sequence through its block table (K/V are read straight from the paged cache, never
gathered into a contiguous copy) and folds them into an fp32 online softmax:

- `_write_kv_kernel`: one program per token, stores its K/V row at `slot_mapping[t]`; slot -1
  (padding rows of a CUDA-graph batch) stores nothing.
- `_decode_kernel` + `_decode_reduce_kernel` (every query length is 1, i.e. `meta.max_query_len ==
  1`): flash-decoding. Grid (kv_head, seq, partition): each program takes ALL query heads of one
  KV head (the GQA group, padded to >= 16 rows for the tensor cores), so each KV block is read
  once per KV head, over one partition of `PARTITION_SIZE` context positions, and stores the
  partition's fp32 (max, sum, acc) triples; the last of a (sequence, KV head)'s programs to finish
  merges them (`_merge_partitions`; with ENGINE_DECODE_MERGE=reduce-kernel a second kernel, the
  reduce kernel, does). With a single partition, or for a sequence whose context fits in one, the
  program writes the output itself.
- `_prefill_kernel` (anything else: prefill, chunked prefill, prefix-cache hits, mixed
  prefill+decode batches): a tile packs BLOCK_Q query tokens x the GQA group's heads into the
  rows of one tl.dot, causal over the query tokens' positions at the tail of the context.
  Tiles are numbered over the whole flattened batch (a tile finds its sequence by binary search
  in query_start_loc), so the grid depends on host ints only.

Any head_dim is padded to a power of two with masks; any power-of-two block size >= 8 works. The
cache may be float8 e4m3 (kv_cache_dtype="fp8"): the write kernel saturates and rounds into it, the
attention kernels widen each K/V tile to the query's dtype as they load it (half the bytes read),
fp16 for a bf16 query (see `_q_fp16`).

CUDA graphs: no function here syncs with the host or reads a device value on the host; every
grid size and compile-time constant comes from tensor shapes and the host ints
`meta.max_query_len` / `meta.max_seq_len`. A graph is captured once per batch size and replayed
with other seq_lens, so at capture `meta.max_seq_len` must be an UPPER BOUND of every context the
graph will see (e.g. max_model_len): it fixes the number of decode partitions. At replay, a
partition that starts past its sequence's length does no work and writes nothing, and the merge
reads only the partitions that cover `seq_lens[i]` (computed on the device), so unused
partitions cost a program launch each and nothing else. Padding rows (seq_len 0) get zeros.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ops import pdl
from ops.forward_context import AttentionMetadata

PARTITION_SIZE = 1024  # context positions per decode program (flash-decoding split), at most...
# ...or this many from LARGE_GRID_PROGRAMS (sequence, KV head) programs on, where there are programs enough without
# splitting. 4,096 made nano's decode step at 256 sequences 2.4% faster and at 126 0.6% slower (perf/kernel_bench.py
# --nano, H100, session 23); not yet measured on a whole run, so it stays PARTITION_SIZE (gpu_check nano-large-parts).
LARGE_GRID_PROGRAMS = 2048
LARGE_GRID_PARTITION_SIZE = PARTITION_SIZE
MAX_DECODE_PARTITIONS = 16  # ...partitions beyond which they grow instead (see decode_partitions)
DECODE_GRID_PROGRAMS = 4096  # unless the decode grid stays under this many programs
MIN_PARTITION_SIZE = 64  # small batches halve the partitions down to this many positions (one inner step)...
SMALL_GRID_PROGRAMS = 512  # ...while the decode grid stays within this many programs (about 4 an H100 SM)
_DECODE_BLOCK_N = 64  # context positions per inner-loop step in decode
_DECODE_NUM_WARPS = 4
_DECODE_NUM_STAGES = 2
# Over an fp8 cache (each K/V element widened before its dot) the decode loop's K/V are double-buffered: from 5 stages
# Triton 3.6's pipeliner keeps two K and two V buffers, so the next tile's loads fly while this one's dots run (at 2-4
# it keeps one of each). nano's fp8 decode steps (perf/kernel_bench.py --nano, H100): 158.9 against 165.1 us a layer
# at 256 sequences, 127.4 against 142.4 at 126; with a bf16 cache the same loses 2-9% (perf/RESULTS.md, session 28).
# ENGINE_DECODE_FP8_STAGES sets it (2: as the bf16 cache). Head dims up to 128 only: at 256 the 5-stage loop spills
# (255 registers and a stack, offline sm_90 compile) where 2 stages take 214 and none.
_DECODE_NUM_STAGES_FP8 = int(os.environ.get("ENGINE_DECODE_FP8_STAGES", "5"))
# The prefill kernel's tiles where they were measured (head_dim <= 128, up to 4 query heads a KV head; the earlier ones
# elsewhere): at most 64 query rows (tokens x the group's heads) a program, 32 context positions a loop step, 4 warps,
# 2 pipeline stages (2-4 keep two K/V buffers here: its dots are wgmma). Two programs an SM (188 registers, 64 KB of
# shared memory) where 128 rows x 64 positions on 8 warps fitted one: one layer's prefill
# attention (perf/kernel_bench.py --nano-prefill, H100) 114.9 / 122.3 us against 140.6 / 143.1 on nano's first and a
# later 8,192-token step, 107.6 against 144.9 on 32 of the 8B's 256-token prompts (perf/RESULTS.md, session 28).
_PREFILL_MAX_ROWS = 64
_PREFILL_BLOCK_N = 32
_PREFILL_NUM_WARPS = 4
_PREFILL_NUM_STAGES = 2
# The decode grid in (kv_head, seq, partition) order, not (seq, kv_head, partition): the programs reading one sequence's
# KV heads launch side by side, and a cache block keeps a position's heads in one contiguous row. nano's decode steps
# (perf/kernel_bench.py --nano, H100): 225.9 against 230.3 us a layer at 256 sequences, 194.4 against 196.1 at 126,
# equal at 37; nano's profiled full-batch step 6.73 against 6.89 ms (perf/RESULTS.md, session 23).
_DECODE_HEADS_FIRST = True
# Decode inner-loop variants, off until perf/kernel_bench.py --nano times them (see _attend_kv_range): V's tile
# loaded beside K's, and K/V loads marked evict-first in L2.
_DECODE_V_EARLY = False
_DECODE_EVICT_FIRST = False
# The reduce kernel merges the partials of as many heads a program as fit this many fp32 elements (heads x partitions
# x head_dim): one program a sequence at nano's shapes instead of one a head, most of which exit at once (a context
# within one partition). 0: one a head. nano's decode steps (H100): decode + reduce 230.3 against 230.9 us at 256
# sequences, 196.1 against 197.6 at 126, 85.6 against 85.4 at 37 (perf/RESULTS.md, session 23): within 1%.
_REDUCE_ELEMENTS = 8192
# The partitions of a (sequence, KV head) merged by the decode kernel's last program to finish one (it counts them
# in a per-device int32 counter, `_merge_counters`, and resets it), not by the reduce kernel: 28 launches fewer a
# nano decode step (the reduce kernel's 0.106 ms a step). nano on an H100, alternating: 19,031 / 19,295 output tok/s
# against 18,748 / 18,999, a full-batch step 8.07 against 8.16 ms of GPU (perf/RESULTS.md, session 26).
# ENGINE_DECODE_MERGE=reduce-kernel keeps the separate kernel.
_DECODE_MERGE_IN_KERNEL = os.environ.get("ENGINE_DECODE_MERGE", "in-kernel") != "reduce-kernel"
_MASKED = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max, so empty rows never make NaN


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, H_PAD)[:, None]
    dims = tl.arange(0, D_PAD)[None, :]
    # (Scalar conditions enter masks through tl.where: the Triton interpreter mistypes `vector & scalar`.)
    mask = (heads < tl.where(slot >= 0, num_kv_heads, 0)) & (dims < head_dim)
    cache_off = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + heads * stride_ch + dims
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if FP8_MAX > 0:  # an 8-bit float cache: saturate (as ops.torch_ref.to_cache_dtype), round once from fp32
        k = tl.minimum(tl.maximum(k.to(tl.float32), -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -FP8_MAX), FP8_MAX)
    tl.store(k_cache_ptr + cache_off, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_off, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_kv(ptrs, mask, EVICT_FIRST: tl.constexpr):
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _attend_kv_range(
    acc, m_i, l_i, q, row_pos, kv_lo, kv_hi,
    k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
    stride_cb, stride_cs, stride_ch, head_dim, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, OFFSETS_64: tl.constexpr,
    IEEE: tl.constexpr, V_EARLY: tl.constexpr = False, EVICT_FIRST: tl.constexpr = False,
):
    """Fold context positions [kv_lo, kv_hi) into the online softmax of the rows of `q`.

    Row r may see positions <= row_pos[r] (causality). Scores are in log2 units (qk_scale
    includes log2(e)); m_i is the running max, l_i the running sum, acc the unnormalized output.
    IEEE (a float32 model): full float32 products, not tl.dot's default TF32 (10-bit mantissas),
    which gave TP=2 and TP=1 different greedy tokens on a float32 model (session 10, two H100s).
    V_EARLY loads a step's V tile beside its K tile, before the scores (more bytes in flight a program);
    EVICT_FIRST marks the K/V loads evict-first in L2 (each is read once a step): decode variants for
    perf/kernel_bench.py --nano, off by default until timed (_DECODE_V_EARLY, _DECODE_EVICT_FIRST).
    """
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < head_dim
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + offs_n
        in_range = pos < kv_hi
        block = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=in_range, other=0)
        # 32-bit offsets into the cache unless one layer's cache has 2^31 elements or more: the
        # [BLOCK_N, D_PAD] 64-bit addresses took most of the registers (sm_90, decode: 254 and spills
        # with them, 176 and none without).
        block = block.to(tl.int64) if OFFSETS_64 else block
        kv_off = (block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch)[:, None] + dims[None, :]
        kv_mask = in_range[:, None] & dim_mask[None, :]
        k = _load_kv(k_cache_ptr + kv_off, kv_mask, EVICT_FIRST).to(q.dtype)  # (an fp8 cache: widened here)
        if V_EARLY:
            v = _load_kv(v_cache_ptr + kv_off, kv_mask, EVICT_FIRST).to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale
        visible = (pos[None, :] <= row_pos[:, None]) & in_range[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if not V_EARLY:
            v = _load_kv(v_cache_ptr + kv_off, kv_mask, EVICT_FIRST).to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


# Integer arguments that change from step to step are not specialized on (Triton otherwise compiles a
# variant for each of "== 1", "divisible by 16" and neither): a variant first met in a timed run
# costs a compile there (~1 s with an empty cache). Only the block tables' width is such here.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, merge_count_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    key_ptr, value_ptr, slot_mapping_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    stride_kt, stride_kh, stride_vt, stride_vh,
    head_dim, qk_scale, partition_size,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_PARTITIONS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, Q_FP16: tl.constexpr = False,
    OFFSETS_64: tl.constexpr = True, WRITE_KV: tl.constexpr = False, FP8_MAX: tl.constexpr = 0.0,
    IEEE: tl.constexpr = False, HEADS_FIRST: tl.constexpr = False, V_EARLY: tl.constexpr = False,
    EVICT_FIRST: tl.constexpr = False, MERGE: tl.constexpr = False,
):
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        num_kv_heads = tl.num_programs(0)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(query_start_loc_ptr + seq)
    has_query = tl.load(query_start_loc_ptr + seq + 1) > token
    kv_lo = part * partition_size
    kv_hi = tl.minimum(seq_len, kv_lo + partition_size)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, D_PAD)
    row_mask = rows < tl.where(has_query, GROUP, 0)
    io_mask = row_mask[:, None] & (dims < head_dim)[None, :]
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)
    q = q.to(tl.float16) if Q_FP16 else q  # bf16 q over an fp8 cache: dots in fp16 (one conversion a K/V element)

    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], _MASKED, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    row_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + seq_len - 1
    if WRITE_KV:
        # This step's K/V (the query token's own, at position seq_len - 1) are not in the cache yet:
        # the partition holding that position stores them and folds them in from registers, so no
        # program reads a slot another one writes, and no separate KV-write kernel runs.
        slot = tl.load(slot_mapping_ptr + token, mask=has_query, other=-1).to(tl.int64)
        last = seq_len - 1
        writer = (slot >= 0) & (kv_lo <= last) & (last < kv_lo + partition_size)
        kv_hi = tl.where(writer, last, kv_hi)
    acc, m_i, l_i = _attend_kv_range(
        acc, m_i, l_i, q, row_pos, kv_lo, kv_hi, k_cache_ptr, v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head, stride_cb, stride_cs, stride_ch,
        head_dim, qk_scale, BLOCK_SIZE, BLOCK_N, D_PAD, OFFSETS_64, IEEE, V_EARLY, EVICT_FIRST,
    )
    if WRITE_KV:
        new_mask = dims < tl.where(writer, head_dim, 0)
        k_new = tl.load(key_ptr + token * stride_kt + kv_head * stride_kh + dims, mask=new_mask, other=0.0)
        v_new = tl.load(value_ptr + token * stride_vt + kv_head * stride_vh + dims, mask=new_mask, other=0.0)
        if FP8_MAX > 0:  # as _write_kv_kernel: saturate, round once from fp32
            k_new = tl.minimum(tl.maximum(k_new.to(tl.float32), -FP8_MAX), FP8_MAX)
            v_new = tl.minimum(tl.maximum(v_new.to(tl.float32), -FP8_MAX), FP8_MAX)
        k_new = k_new.to(k_cache_ptr.dtype.element_ty)
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)
        cache_off = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch + dims
        tl.store(k_cache_ptr + cache_off, k_new, mask=new_mask)
        tl.store(v_cache_ptr + cache_off, v_new, mask=new_mask)
        # The position as the cache would give it back (widened as _attend_kv_range widens), one
        # more step of the online softmax; rows of other programs: score -inf, no change.
        k_new = k_new.to(q.dtype).to(tl.float32)
        v_new = v_new.to(q.dtype).to(tl.float32)
        qk = tl.sum(q.to(tl.float32) * k_new[None, :], 1) * qk_scale
        qk = tl.where(writer, qk, float("-inf"))
        m_new = tl.maximum(m_i, qk)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new[None, :]
        m_i = m_new
    if NUM_PARTITIONS == 1 or seq_len <= partition_size:
        # One partition covers the context: its result is final (the reduce kernel skips this row).
        if part == 0:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 (padding row): zeros
            tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Partials are [num_seqs, num_heads, NUM_PARTITIONS, (D_PAD)], contiguous.
        part_idx = (seq * num_kv_heads * GROUP + heads).to(tl.int64) * NUM_PARTITIONS + part
        live = rows < tl.where(has_query & (kv_lo < seq_len), GROUP, 0)
        tl.store(part_max_ptr + part_idx, m_i, mask=live)
        tl.store(part_sum_ptr + part_idx, l_i, mask=live)
        tl.store(part_acc_ptr + part_idx[:, None] * D_PAD + dims[None, :], acc, mask=live[:, None])
        if MERGE and kv_lo < seq_len:
            # The last of the sequence's live partitions to get here merges them all (the threadfence-reduction
            # pattern): every thread's partials are stored before the count (barrier, then a release at GPU
            # scope); the last program's acquire makes the others' visible, read past L1 (".cg").
            tl.debug_barrier()
            counter = merge_count_ptr + seq * num_kv_heads + kv_head
            num_live = tl.minimum(tl.cdiv(seq_len, partition_size), NUM_PARTITIONS)
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_live - 1:
                tl.store(counter, 0)  # for the next layer's launch
                _merge_partitions(out_ptr + token * stride_ot, part_acc_ptr, part_max_ptr, part_sum_ptr,
                                  part_idx - part, heads, row_mask, io_mask, stride_oh, num_live, D_PAD)


@triton.jit
def _merge_partitions(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, first_idx, heads, row_mask, io_mask,
                      stride_oh, num_live, D_PAD: tl.constexpr):
    """Merge the fp32 (max, sum, acc) partials [first_idx, first_idx + num_live) of some heads into `out`."""
    dims = tl.arange(0, D_PAD)
    m = tl.full(first_idx.shape, _MASKED, dtype=tl.float32)
    total = tl.zeros(first_idx.shape, dtype=tl.float32)
    acc = tl.zeros([first_idx.shape[0], D_PAD], dtype=tl.float32)
    for p in range(0, num_live):
        idx = first_idx + p
        m_p = tl.load(part_max_ptr + idx, mask=row_mask, other=_MASKED, cache_modifier=".cg")
        s_p = tl.load(part_sum_ptr + idx, mask=row_mask, other=0.0, cache_modifier=".cg")
        acc_p = tl.load(part_acc_ptr + idx[:, None] * D_PAD + dims[None, :], mask=row_mask[:, None], other=0.0,
                        cache_modifier=".cg")
        m_new = tl.maximum(m, m_p)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_p - m_new)
        total = total * alpha + s_p * beta
        acc = acc * alpha[:, None] + acc_p * beta[:, None]
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + heads[:, None] * stride_oh + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, seq_lens_ptr, query_start_loc_ptr,
    stride_ot, stride_oh, head_dim, partition_size, num_heads,
    NUM_PARTITIONS: tl.constexpr, P_PAD: tl.constexpr, D_PAD: tl.constexpr, H_BLOCK: tl.constexpr = 1,
    PDL_SIGNAL: tl.constexpr = False,
):
    """Grid (seq, head block): merges H_BLOCK heads' partials of one sequence."""
    if PDL_SIGNAL:  # the next kernel (the output projection's GEMV) may start loading its weights (ops.pdl)
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0)
    heads = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    token = tl.load(query_start_loc_ptr + seq)
    has_query = tl.load(query_start_loc_ptr + seq + 1) > token
    seq_len = tl.load(seq_lens_ptr + seq)
    if seq_len <= partition_size:
        return  # one partition: the decode kernel wrote the output itself
    # Only partitions that cover the context were written (clamped so that a context longer than
    # the bound the grid was built for can never read out of bounds).
    num_live = tl.minimum(tl.cdiv(seq_len, partition_size), NUM_PARTITIONS)
    parts = tl.arange(0, P_PAD)
    dims = tl.arange(0, D_PAD)
    head_ok = heads < num_heads
    live = head_ok[:, None] & (parts < num_live)[None, :]  # [H_BLOCK, P_PAD]
    idx = (seq * num_heads + heads).to(tl.int64)[:, None] * NUM_PARTITIONS + parts[None, :]
    m = tl.load(part_max_ptr + idx, mask=live, other=_MASKED)
    s = tl.load(part_sum_ptr + idx, mask=live, other=0.0)
    acc = tl.load(part_acc_ptr + idx[:, :, None] * D_PAD + dims[None, None, :], mask=live[:, :, None], other=0.0)
    weight = tl.where(live, tl.exp2(m - tl.max(m, 1)[:, None]), 0.0)
    total = tl.sum(weight * s, 1)
    out = tl.sum(acc * weight[:, :, None], 1) / tl.where(total > 0, total, 1.0)[:, None]
    out_mask = head_ok[:, None] & (dims < tl.where(has_query, head_dim, 0))[None, :]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence of a global query tile: sequence i owns tiles [qsl[i] // BLOCK_Q + i, ...)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])  # they change from step to step (see _decode_kernel)
def _prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_seqs, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    head_dim, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, Q_FP16: tl.constexpr = False,
    OFFSETS_64: tl.constexpr = True, IEEE: tl.constexpr = False,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    q_tile = tile - (q_start // BLOCK_Q + seq)
    ctx_len = seq_len - q_len  # cached positions before this step's query tokens

    # Row r of the tile is query token q_tile * BLOCK_Q + r // GROUP_PAD of head r % GROUP_PAD
    # of this KV head's group: the whole group shares every K/V tile it loads.
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = q_tile * BLOCK_Q + rows // GROUP_PAD
    heads = kv_head * GROUP + rows % GROUP_PAD
    dims = tl.arange(0, D_PAD)
    row_mask = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    io_mask = row_mask[:, None] & (dims < head_dim)[None, :]
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=io_mask, other=0.0)
    q = q.to(tl.float16) if Q_FP16 else q  # (as in _decode_kernel)

    tile_live = q_tile * BLOCK_Q < q_len
    kv_hi = tl.where(tile_live, tl.minimum(seq_len, ctx_len + (q_tile + 1) * BLOCK_Q), 0)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], _MASKED, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc, m_i, l_i = _attend_kv_range(
        acc, m_i, l_i, q, ctx_len + tok, 0, kv_hi, k_cache_ptr, v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head, stride_cb, stride_cs, stride_ch,
        head_dim, qk_scale, BLOCK_SIZE, BLOCK_N, D_PAD, OFFSETS_64, IEEE,
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 (padding row): zeros
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Store each token's key and value in its cache slot; tokens with slot -1 are padding."""
    _check_cache(k_cache, v_cache)
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_SIZE=block_size, H_PAD=triton.next_power_of_2(num_kv_heads), D_PAD=triton.next_power_of_2(head_dim),
        FP8_MAX=torch.finfo(k_cache.dtype).max if k_cache.dtype.itemsize == 1 else 0.0,
    )


def write_kv_and_attend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """`write_kv_cache` then `paged_attention`, as one kernel for a decode step (FUSE_DECODE_KV_WRITE):
    the decode kernel stores each sequence's new K/V itself and attends to them from registers."""
    if not (FUSE_DECODE_KV_WRITE and meta.max_query_len == 1 and meta.num_seqs > 0):
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        paged_attention(query, k_cache, v_cache, meta, scale, out)
        return
    _check_cache(k_cache, v_cache)
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension")
    _decode(_last_dim_contiguous(query), k_cache, v_cache, meta, scale, out,
            _last_dim_contiguous(key), _last_dim_contiguous(value))


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
) -> None:
    """Causal attention of each sequence's query tokens over its cached context (see module doc)."""
    _check_cache(k_cache, v_cache)
    query = _last_dim_contiguous(query)
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension")
    if meta.num_seqs == 0:
        return
    if meta.max_query_len == 1:
        _decode(query, k_cache, v_cache, meta, scale, out)
    else:
        _prefill(query, k_cache, v_cache, meta, scale, out)


def _decode(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, out, key=None, value=None) -> None:
    """Flash-decoding; with key / value, this step's K/V are written by the kernel too."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_seqs, num_heads = meta.num_seqs, query.shape[1]
    group = num_heads // num_kv_heads
    d_pad = max(16, triton.next_power_of_2(head_dim))
    num_partitions, partition_size = decode_partitions(meta.max_seq_len, num_seqs * num_kv_heads)
    if num_partitions == 1:
        part_acc = part_max = part_sum = out  # unused: the kernel writes `out` directly
    else:
        part_max = torch.empty((num_seqs, num_heads, num_partitions), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((num_seqs, num_heads, num_partitions, d_pad), dtype=torch.float32, device=query.device)
    merge = _DECODE_MERGE_IN_KERNEL and num_partitions > 1
    counters = _merge_counters(query.device, num_seqs * num_kv_heads) if merge else part_max
    write = key is not None
    key, value = (key, value) if write else (query, query)  # (unread without WRITE_KV)
    heads_first = _DECODE_HEADS_FIRST and num_seqs <= 65535  # (a grid's second dimension holds 65,535 at most)
    grid = (num_kv_heads, num_seqs, num_partitions) if heads_first else (num_seqs, num_kv_heads, num_partitions)
    _decode_kernel[grid](
        out, part_acc, part_max, part_sum, counters,
        query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        key, value, meta.slot_mapping,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        head_dim, scale * _LOG2E, partition_size,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), NUM_PARTITIONS=num_partitions,
        BLOCK_SIZE=block_size, BLOCK_N=_DECODE_BLOCK_N, D_PAD=d_pad, Q_FP16=_q_fp16(query, k_cache),
        OFFSETS_64=_offsets_64(k_cache), WRITE_KV=write,
        FP8_MAX=torch.finfo(k_cache.dtype).max if write and k_cache.dtype.itemsize == 1 else 0.0,
        IEEE=query.dtype == torch.float32, HEADS_FIRST=heads_first, V_EARLY=_DECODE_V_EARLY,
        EVICT_FIRST=_DECODE_EVICT_FIRST, MERGE=merge, num_warps=_DECODE_NUM_WARPS,
        num_stages=_DECODE_NUM_STAGES_FP8 if k_cache.dtype.itemsize == 1 and d_pad <= 128 else _DECODE_NUM_STAGES,
    )
    if num_partitions > 1 and not merge:
        p_pad = triton.next_power_of_2(num_partitions)
        h_block = min(triton.next_power_of_2(num_heads), max(1, _REDUCE_ELEMENTS // (p_pad * d_pad)))
        _decode_reduce_kernel[(num_seqs, triton.cdiv(num_heads, h_block))](
            out, part_acc, part_max, part_sum, meta.seq_lens, meta.query_start_loc,
            out.stride(0), out.stride(1), head_dim, partition_size, num_heads,
            NUM_PARTITIONS=num_partitions, P_PAD=p_pad, D_PAD=d_pad, H_BLOCK=h_block,
            PDL_SIGNAL=pdl.enabled(out.device), num_warps=4,
        )


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _merge_counters(device: torch.device, n: int) -> torch.Tensor:
    """The decode kernel's per-(sequence, KV head) partition counts: zeros between launches (each
    merging program resets its own), one buffer a device, shared by every layer and CUDA graph."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        counters = _COUNTERS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return counters


def decode_partitions(max_seq_len: int, num_programs: int) -> tuple[int, int]:
    """(number of partitions, context positions per partition) for a decode grid of `num_programs`
    (sequence, KV head) pairs whose contexts are at most `max_seq_len`.

    Partitions of PARTITION_SIZE, so that a long context is read by many programs at once. 1,024
    positions rather than 512: fewer partials to write and merge, and under CUDA graphs half the
    programs that start past a shorter context's end; `nano` on the H100, alternating runs of one
    call: 21,016 / 21,254 output tok/s against 19,741 / 19,549 with an fp8 cache, 17,393 / 17,300
    against 16,986 / 16,808 with bf16 (perf/RESULTS.md, session 20). But
    under CUDA graphs max_seq_len is max_model_len, and with a long one (Qwen3: 40,960; Llama 3.1:
    131,072) most partitions of a batch's shorter contexts start past their end and only cost a
    launch each: 164k such programs a layer at batch 256 and 40,960 positions, where a decode step
    at context 1,024 took 23 ms of forward on the H100 for ≈ 10 ms of KV reads (before this cap;
    not yet re-measured with it). So the count is capped at MAX_DECODE_PARTITIONS, or more while
    the grid stays under DECODE_GRID_PROGRAMS (small batches, where splitting is what keeps the
    GPU busy), and the partitions grow instead. A max_model_len up to 16,384 is not affected.

    The other way, a batch of a few sequences (batch-1 decode: 8 KV heads, 4 partitions of a 4,096
    bound) has fewer programs than SMs, each walking 1,024 positions in 16 dependent steps: partitions
    halve (down to MIN_PARTITION_SIZE) while the grid stays within SMALL_GRID_PROGRAMS, so that the
    same context is read by more programs in fewer steps each. Down to 64 positions (one inner step a
    program) rather than 128: Llama-3.1-8B batch 1 on the H100, the decode kernel 7.0 -> 5.4 us a call,
    output 165.0 / 165.4 -> 166.9 / 167.0 tok/s (perf/RESULTS.md, session 19)."""
    size = PARTITION_SIZE if num_programs < LARGE_GRID_PROGRAMS else max(PARTITION_SIZE, LARGE_GRID_PARTITION_SIZE)
    while size // 2 >= max(max_seq_len, MIN_PARTITION_SIZE):  # a short context: one partition, just bounded closer
        size //= 2
    while (size // 2 >= MIN_PARTITION_SIZE and max_seq_len > size // 2
           and num_programs * triton.cdiv(max_seq_len, size // 2) <= SMALL_GRID_PROGRAMS):
        size //= 2
    num_partitions = max(1, triton.cdiv(max_seq_len, size))
    cap = max(MAX_DECODE_PARTITIONS, DECODE_GRID_PROGRAMS // max(1, num_programs))
    if num_partitions <= cap:
        return num_partitions, size
    size = triton.cdiv(triton.cdiv(max_seq_len, cap), _DECODE_BLOCK_N) * _DECODE_BLOCK_N
    return triton.cdiv(max_seq_len, size), size


def _prefill(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_tokens, num_heads = query.shape[0], query.shape[1]
    num_seqs = meta.num_seqs
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    # Rows per tile: enough for the longest query (short queries waste fewer rows), at least 16
    # for tl.dot, at most what the registers hold for this head_dim; the _PREFILL tiles where they were
    # measured (head_dim <= 128, groups of up to 4 query heads a KV head), the earlier ones elsewhere.
    measured = d_pad <= 128 and group_pad <= 4
    max_rows = _PREFILL_MAX_ROWS if measured else 64 if d_pad > 128 else 128
    rows = min(max_rows, max(16, triton.next_power_of_2(meta.max_query_len * group_pad)))
    rows = max(rows, group_pad)
    block_q = rows // group_pad
    block_n = _PREFILL_BLOCK_N if measured else 32 if d_pad > 128 else 64
    num_warps = _PREFILL_NUM_WARPS if measured else 8 if rows >= 64 else 4
    num_tiles = num_tokens // block_q + num_seqs  # upper bound of sum(cdiv(q_len, block_q))
    _prefill_kernel[(num_tiles, num_kv_heads)](
        out, query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        num_seqs, query.stride(0), query.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        head_dim, scale * _LOG2E,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, D_PAD=d_pad, Q_FP16=_q_fp16(query, k_cache),
        OFFSETS_64=_offsets_64(k_cache), IEEE=query.dtype == torch.float32,
        num_warps=num_warps, num_stages=_PREFILL_NUM_STAGES,
    )


_LOG2E = 1.4426950408889634


def _q_fp16(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Attend in fp16 (bf16 q over an fp8 cache): fp8 widens to fp16 in one conversion (to bf16 it takes
    two), and fp16 holds every fp8 value exactly; q and the probabilities lose nothing that matters
    there (|q| stays far below fp16's 65,504 in practice; probabilities in [0, 1] get 3 more mantissa bits than bf16)."""
    return query.dtype == torch.bfloat16 and k_cache.dtype.itemsize == 1


def _offsets_64(k_cache: torch.Tensor) -> bool:
    """Whether element offsets into one layer's cache need 64 bits (see `_attend_kv_range`)."""
    return k_cache.numel() >= 2**31 or OFFSETS_64_ALWAYS


OFFSETS_64_ALWAYS = False  # tests: the 64-bit path on small caches
# Decode steps: the decode kernel writes the step's K/V itself (write_kv_and_attend), one launch a
# layer fewer. False: the separate _write_kv_kernel first, as prefill steps always do.
FUSE_DECODE_KV_WRITE = True


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have one shape and layout, contiguous in head_dim")
    block_size = k_cache.shape[1]
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
