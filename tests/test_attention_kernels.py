"""The GPU PagedAttention backends (Triton, xformers) against the pure-torch reference.

GPU tests are marked `gpu` (run `pytest -m gpu` on the lent GPU). Every check draws fresh random
inputs, poisons the output with NaN first (so an unwritten element fails), and compares with
`ops.torch_ref` in float32: relative norm error < 1e-2 and |out - ref| <= 2e-2 + 1e-2 |ref|.
One CPU test runs the Triton kernels under the Triton interpreter on tiny cases.
"""

from __future__ import annotations

import pytest
import torch

from ops import torch_ref
from ops.attention import get_backend
from ops.forward_context import AttentionMetadata
from tests.interpreter import run_under_the_interpreter

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["triton", "xformers"]

# (query length, context length) per sequence: fresh prefills, a chunked prefill and prefix-cache
# hits (the query is the tail of a longer context), decodes, and a padding row (context 0).
MIXED_BATCH = [(37, 37), (300, 1000), (1, 700), (1, 0), (129, 129), (64, 1100), (1, 1), (1, 2049), (5, 5)]
# Contexts around block and partition boundaries, a padding row, and several partitions.
DECODE_CONTEXTS = [1, 2, 15, 16, 17, 511, 512, 513, 0, 1500, 3000]


def make_paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, max_seq_len=None):
    """Random query and paged K/V cache (blocks shuffled, spare table entries pointing at garbage)."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(-(-(max_seq_len or 0) // block_size), max(blocks_per_seq)) + 1
    num_blocks = sum(blocks_per_seq) + 4
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), width), dtype=torch.int32)
    owned = torch.randperm(num_blocks).to(torch.int32)
    first = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = owned[first : first + n]
        first += n
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(sum(q_lens), num_heads, head_dim, device=device).to(dtype)
    slots = []
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        if seq_len == 0:
            slots += [-1] * q_len
        else:
            slots += torch_ref.context_slots(block_tables[i], seq_len, block_size)[seq_len - q_len :].tolist()
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=seq_lens_t.to(device),
        block_tables=block_tables.to(device),
        max_query_len=max(q_lens),
        max_seq_len=max_seq_len or max(seq_lens),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens_t,
    )
    return query, k_cache, v_cache, meta


def reference(query, k_cache, v_cache, meta, scale):
    ref = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    torch_ref.paged_attention(query.float(), k_cache.float(), v_cache.float(), meta, scale, ref)
    return ref


def assert_matches_reference(out, ref):
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements unwritten (NaN)"
    diff = out.float() - ref
    rel = (diff.norm() / ref.norm()).item()
    worst = (diff.abs() - 1e-2 * ref.abs()).max().item()
    assert rel < 1e-2 and worst <= 2e-2, f"rel. norm error {rel:.2e}, max abs error {diff.abs().max().item():.2e}"


def run_backend(name, q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.bfloat16, max_seq_len=None):
    if name == "xformers":
        pytest.importorskip("xformers")
    backend = get_backend(name)
    if hasattr(backend, "check_supported"):
        backend.check_supported(block_size, head_dim, dtype)
    query, k_cache, v_cache, meta = make_paged_batch(
        q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, "cuda", max_seq_len
    )
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    backend.paged_attention(query, k_cache, v_cache, meta, scale, out)
    assert_matches_reference(out, reference(query, k_cache, v_cache, meta, scale))


@gpu
@needs_cuda
def test_float32_attention_is_computed_in_float32_not_tf32():
    """tl.dot rounds float32 inputs to TF32 (10-bit mantissas) unless told not to: errors ~1e-3, enough
    to flip near-tied greedy tokens between TP=2 and TP=1 on a float32 model. In float32 the kernels
    must agree with the reference to float32 rounding."""
    backend = get_backend("triton")
    for q_lens, seq_lens in [([1] * 4, [300, 5, 17, 64]), ([40, 1, 7], [40, 300, 100])]:
        query, k_cache, v_cache, meta = make_paged_batch(q_lens, seq_lens, 8, 2, 64, 16, torch.float32, "cuda")
        out = torch.full_like(query, float("nan"))
        backend.paged_attention(query, k_cache, v_cache, meta, 0.125, out)
        error = (out - reference(query, k_cache, v_cache, meta, 0.125)).abs().max().item()
        assert error < 2e-5, f"max abs error {error:.2e} (q_lens {q_lens}): TF32?"


def compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@gpu
@needs_cuda
def test_one_compiled_variant_serves_every_batch_size_and_block_table_width():
    """The sequences in a step and the block tables' width change from step to step; were the kernels
    specialized on them (Triton's "== 1" / "divisible by 16" variants), a variant first met mid-run
    would compile there (~1 s with an empty cache). Results are checked against the reference too."""
    import dataclasses

    from ops import triton_attention

    for kernel in (triton_attention._prefill_kernel, triton_attention._decode_kernel):
        kernel.device_caches.clear()  # what earlier tests compiled must not hide a new variant
    counts = []
    for num_seqs, max_seq_len in [(1, 40), (16, 15 * 16), (17, 16 * 16), (3, 31 * 16), (32, 17 * 16)]:
        run_backend("triton", [40] * num_seqs, [40] * num_seqs, 4, 2, 64, 16, max_seq_len=max_seq_len)
        counts.append(compiled_variants(triton_attention._prefill_kernel))
    assert counts[1:] == counts[:1] * (len(counts) - 1), f"prefill kernel variants after each call: {counts}"

    backend = get_backend("triton")
    query, k_cache, v_cache, meta = make_paged_batch([1] * 4, [300, 5, 17, 64], 4, 2, 64, 16, torch.bfloat16, "cuda")
    want = reference(query, k_cache, v_cache, meta, 0.125)
    counts = []
    width = meta.block_tables.shape[1]  # 20: 19 blocks for 300 tokens and a spare
    for extra in (0, 32 - width, 33 - width, 64 - width):  # widths 20, 32, 33, 64
        tables = torch.cat([meta.block_tables, meta.block_tables.new_zeros(4, extra)], dim=1)
        out = torch.full_like(query, float("nan"))
        backend.paged_attention(query, k_cache, v_cache, dataclasses.replace(meta, block_tables=tables), 0.125, out)
        assert_matches_reference(out, want)
        counts.append(compiled_variants(triton_attention._decode_kernel))
    assert counts[1:] == counts[:1] * (len(counts) - 1), f"decode kernel variants after each call: {counts}"


@gpu
@needs_cuda
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_matches_reference(backend, block_size, head_dim, group):
    n = len(DECODE_CONTEXTS)
    run_backend(backend, [1] * n, DECODE_CONTEXTS, 2 * group, 2, head_dim, block_size)


@gpu
@needs_cuda
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_with_the_kv_write_fused_in_matches_writing_first(block_size, head_dim, group, cache_dtype):
    check_fused_decode_write(DECODE_CONTEXTS, 2 * group, 2, head_dim, block_size, torch.bfloat16, "cuda", cache_dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size,head_dim,group", [(64, 64, 1), (64, 128, 8), (128, 128, 4)])
def test_xformers_paged_decode_matches_reference(block_size, head_dim, group):
    n = len(DECODE_CONTEXTS)
    run_backend("xformers", [1] * n, DECODE_CONTEXTS, 2 * group, 2, head_dim, block_size)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "block_size,head_dim,group",
    [(16, 64, 1), (16, 64, 2), (16, 128, 4), (16, 128, 8), (32, 128, 1), (32, 64, 4), (32, 128, 8), (32, 64, 2)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_prefill_and_decode_batch_matches_reference(backend, block_size, head_dim, group):
    q_lens, seq_lens = map(list, zip(*MIXED_BATCH))
    run_backend(backend, q_lens, seq_lens, 2 * group, 2, head_dim, block_size)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "q_lens,seq_lens",
    [
        pytest.param([1], [32768], id="decode-1x32k"),
        pytest.param([1] * 256, None, id="decode-256x2k"),
        pytest.param([4096, 1024, 1], [4096, 8192, 20000], id="prefill-4k-chunk-8k"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_contexts_and_large_batches_match_reference(backend, q_lens, seq_lens):
    if seq_lens is None:
        seq_lens = torch.randint(1, 2048, (len(q_lens),)).tolist()
        seq_lens[::17] = [0] * len(seq_lens[::17])  # padding rows of a CUDA-graph batch
    run_backend(backend, q_lens, seq_lens, 32, 8, 128, 16)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "block_size,head_dim,dtype,num_heads,num_kv_heads",
    [
        (8, 80, torch.float16, 12, 4),
        (32, 96, torch.bfloat16, 6, 2),  # GQA ratio 3
        (16, 256, torch.bfloat16, 8, 4),
        (64, 128, torch.float32, 8, 2),
        (128, 64, torch.bfloat16, 16, 16),
    ],
)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_triton_other_shapes(decode, block_size, head_dim, dtype, num_heads, num_kv_heads):
    batch = [(1, n) for n in DECODE_CONTEXTS] if decode else MIXED_BATCH
    q_lens, seq_lens = map(list, zip(*batch))
    run_backend("triton", q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("bound, batch", [(4096, 8), (40960, 64)], ids=["4k", "40k-grown-partitions"])
def test_triton_decode_replays_in_cuda_graph_with_new_seq_lens(bound, batch):
    from ops import triton_attention

    block_size = 16
    query, k_cache, v_cache, meta = make_paged_batch(
        [1] * batch, [bound] * batch, 16, 8, 128, block_size, torch.bfloat16, "cuda", max_seq_len=bound
    )
    scale = 128**-0.5
    out = torch.empty_like(query)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        triton_attention.paged_attention(query, k_cache, v_cache, meta, scale, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_attention.paged_attention(query, k_cache, v_cache, meta, scale, out)

    edges = [1, 0, 17, 512, 513, bound, 2000, 3]
    for seq_lens in ((edges * batch)[:batch], torch.randint(0, bound + 1, (batch,)).tolist()):
        meta.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        meta.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int32)
        query.copy_(torch.randn_like(query))
        out.fill_(float("nan"))
        graph.replay()
        assert_matches_reference(out, reference(query, k_cache, v_cache, meta, scale))


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_cache_stores_tokens_and_skips_padding_slots(backend):
    if backend == "xformers":
        pytest.importorskip("xformers")
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 64, 16, 8, 128, 300
    qkv = torch.randn(num_tokens, (16 + 2 * num_kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    # Strided views into one fused projection, as the models produce them.
    key = qkv[:, 16 * head_dim : (16 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (16 + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slot_mapping = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slot_mapping[::3] = -1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    torch_ref.write_kv_cache(key, value, k_expected, v_expected, slot_mapping)
    get_backend(backend).write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_triton_64_bit_cache_offsets_match_reference(decode, monkeypatch):
    """Caches of 2^31 elements or more address K/V with 64-bit offsets (32-bit below): that path too."""
    from ops import triton_attention

    monkeypatch.setattr(triton_attention, "OFFSETS_64_ALWAYS", True)
    q_lens, seq_lens = ([1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS) if decode else zip(*MIXED_BATCH)
    run_backend("triton", list(q_lens), list(seq_lens), 32, 8, 128, 16)


@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_triton_reads_an_fp8_cache(decode, fp8):
    """kv_cache_dtype="fp8" / "fp8_e5m2": the same kernels over a float8 cache, against the reference reading it."""
    q_lens, seq_lens = ([1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS) if decode else zip(*MIXED_BATCH)
    query, k_cache, v_cache, meta = make_paged_batch(list(q_lens), list(seq_lens), 32, 8, 128, 16, torch.bfloat16, "cuda")
    k_cache = torch_ref.to_cache_dtype(k_cache * 4, fp8)
    v_cache = torch_ref.to_cache_dtype(v_cache, fp8)
    out = torch.full_like(query, float("nan"))
    get_backend("triton").paged_attention(query, k_cache, v_cache, meta, 128**-0.5, out)
    assert_matches_reference(out, reference(query, k_cache, v_cache, meta, 128**-0.5))


@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_triton_writes_an_fp8_cache_as_the_reference_does(fp8):
    """Rounding (to nearest even, once) and saturation at the format's largest value, bit for bit with ops.torch_ref."""
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 64, 16, 8, 128, 300
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) * 100
    value = torch.randn_like(key) * 3e4
    slot_mapping = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slot_mapping[::3] = -1
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=fp8)
    v_cache = torch.zeros_like(k_cache)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    torch_ref.write_kv_cache(key, value, k_expected, v_expected, slot_mapping)
    get_backend("triton").write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache.view(torch.uint8), k_expected.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_expected.view(torch.uint8))
    assert v_expected.float().abs().max() == torch.finfo(fp8).max


@gpu
@needs_cuda
def test_xformers_check_supported_rejects_what_it_cannot_run():
    pytest.importorskip("xformers")
    from ops import xformers_attention

    xformers_attention.check_supported(64, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        xformers_attention.check_supported(16, 128, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        xformers_attention.check_supported(16, 320, torch.bfloat16)
    with pytest.raises(ValueError, match="block_size"):
        xformers_attention.check_supported(24, 128, torch.bfloat16)


# Tiny cases for the Triton interpreter (fp32 and fp16: the interpreter's tl.dot mis-handles bf16).
# The partition size is shrunk so that the split-and-reduce decode path runs on short contexts.
_INTERPRETER_SCRIPT = """
import torch
from ops import triton_attention
from ops import torch_ref
from tests.test_attention_kernels import make_paged_batch, reference, assert_matches_reference
triton_attention.PARTITION_SIZE = 128
# (MAX_DECODE_PARTITIONS, DECODE_GRID_PROGRAMS, MIN_PARTITION_SIZE): as shipped (no shrinking at these
# sizes); partitions grown; partitions shrunk to 64 positions
grow = [(16, 4096, 128), (2, 0, 128), (16, 4096, 64)]  # (64: the default since session 19)
offsets_64 = [False, True, False]  # the 64-bit cache offsets (for caches of 2^31 elements or more) in one round
heads_first = [False, True, True]  # the decode grid's order (_DECODE_HEADS_FIRST)
loop_variants = [(False, False), (True, True), (False, False)]  # (_DECODE_V_EARLY, _DECODE_EVICT_FIRST)
reduce_elements = [8192, 8192, 0]  # the reduce kernel: several heads a program (6 heads: 2 masked), one a head
merge_in_kernel = [True, False, False]  # partitions merged by the decode kernel's last program, or the reduce kernel
cases = [  # q_lens, seq_lens, heads, kv heads, head_dim, block size, dtype
    ([1] * 5, [1, 129, 300, 0, 64], 8, 2, 32, 16, torch.float32),
    ([1] * 2, [520, 7], 6, 2, 24, 8, torch.float16),
    ([40, 1, 7, 1, 70], [40, 300, 100, 0, 75], 8, 1, 32, 16, torch.float32),
    ([33, 2], [50, 9], 6, 2, 80, 32, torch.float16),
]
for (max_parts, grid, min_size), wide, first, elements, merge, loop, (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype) in [
        (g, w, f, e, m, v, c)
        for g, w, f, e, m, v in zip(grow, offsets_64, heads_first, reduce_elements, merge_in_kernel, loop_variants)
        for c in cases]:
    triton_attention._DECODE_MERGE_IN_KERNEL = merge
    triton_attention._DECODE_V_EARLY, triton_attention._DECODE_EVICT_FIRST = loop
    triton_attention.MAX_DECODE_PARTITIONS, triton_attention.DECODE_GRID_PROGRAMS = max_parts, grid
    triton_attention.MIN_PARTITION_SIZE, triton_attention.OFFSETS_64_ALWAYS = min_size, wide
    triton_attention._DECODE_HEADS_FIRST, triton_attention._REDUCE_ELEMENTS = first, elements
    query, k_cache, v_cache, meta = make_paged_batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, "cpu")
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, k_cache, v_cache, meta, head_dim ** -0.5, out)
    assert_matches_reference(out, reference(query, k_cache, v_cache, meta, head_dim ** -0.5))
    k_new, v_new = torch.randn(2, query.shape[0], kv_heads, head_dim).to(dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    torch_ref.write_kv_cache(k_new, v_new, k_expected, v_expected, meta.slot_mapping)
    triton_attention.write_kv_cache(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
# An fp8 cache (kv_cache_dtype="fp8"): the kernels widen it as they read. Written values are ones fp8 holds
# exactly, and some past its range (saturated): the interpreter's own float-to-fp8 rounding is wrong where
# rounding carries into the exponent (31.7 -> 16), so rounding itself is checked on the GPU only.
triton_attention.OFFSETS_64_ALWAYS = False
triton_attention._DECODE_V_EARLY = triton_attention._DECODE_EVICT_FIRST = False
for fp8, (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype) in [
        (torch.float8_e4m3fn, cases[0]), (torch.float8_e5m2, cases[1]), (torch.float8_e4m3fn, cases[2])]:
    query, k_cache, v_cache, meta = make_paged_batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, "cpu")
    k_cache, v_cache = torch_ref.to_cache_dtype(k_cache * 8, fp8), torch_ref.to_cache_dtype(v_cache, fp8)
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, k_cache, v_cache, meta, head_dim ** -0.5, out)
    assert_matches_reference(out, reference(query, k_cache, v_cache, meta, head_dim ** -0.5))
    k_new, v_new = torch_ref.to_cache_dtype(torch.randn(2, query.shape[0], kv_heads, head_dim) * 30, fp8).to(dtype)
    k_new[:, ::3] = 6e4  # past both formats' range (e4m3 448, e5m2 57,344)
    v_new[:, ::5] = -6e4
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    torch_ref.write_kv_cache(k_new, v_new, k_expected, v_expected, meta.slot_mapping)
    triton_attention.write_kv_cache(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache.view(torch.uint8), k_expected.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_expected.view(torch.uint8))
    fmax = torch.finfo(fp8).max
    assert k_expected.float().abs().max() == fmax and v_expected.float().abs().max() == fmax
# Decode with the K/V write inside the decode kernel (write_kv_and_attend): the output and the cache
# of writing first, then attending; over partitions of every size above, a bf16-like and an fp8 cache.
from tests.test_attention_kernels import check_fused_decode_write
for (max_parts, grid, min_size), first, merge, case in [
        (g, f, m, c) for g, f, m in zip(grow, heads_first, merge_in_kernel) for c in cases[:2]]:
    triton_attention._DECODE_MERGE_IN_KERNEL = merge
    triton_attention.MAX_DECODE_PARTITIONS, triton_attention.DECODE_GRID_PROGRAMS = max_parts, grid
    triton_attention.MIN_PARTITION_SIZE, triton_attention._DECODE_HEADS_FIRST = min_size, first
    check_fused_decode_write(*case[1:], "cpu", cache_dtype=None)
    check_fused_decode_write(*case[1:], "cpu", cache_dtype=torch.float8_e4m3fn)
assert int(triton_attention._COUNTERS[torch.device("cpu")].count_nonzero()) == 0  # each merge reset its count
print("ok")
"""


def check_fused_decode_write(seq_lens, heads, kv_heads, head_dim, block_size, dtype, device, cache_dtype=None):
    """triton_attention.write_kv_and_attend on a decode batch against torch_ref's write, then the
    reference attention: the same output, and bit-equal caches. A last row of padding (slot -1)."""
    from ops import triton_attention

    query, k_cache, v_cache, meta = make_paged_batch([1] * len(seq_lens), seq_lens, heads, kv_heads, head_dim,
                                                     block_size, dtype, device)
    k_new, v_new = torch.randn(2, query.shape[0], kv_heads, head_dim, device=device).to(dtype)
    if cache_dtype is not None:  # values an fp8 cache holds exactly, some saturating (as the write test above)
        k_cache = torch_ref.to_cache_dtype(k_cache * 8, cache_dtype)
        v_cache = torch_ref.to_cache_dtype(v_cache, cache_dtype)
        k_new = torch_ref.to_cache_dtype(k_new * 30, cache_dtype).to(dtype)
        v_new = torch_ref.to_cache_dtype(v_new, cache_dtype).to(dtype)
        k_new[::3, 0] = 6e4
    meta.slot_mapping[-1] = -1
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    torch_ref.write_kv_cache(k_new, v_new, k_expected, v_expected, meta.slot_mapping)
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    triton_attention.write_kv_and_attend(query, k_new, v_new, k_cache, v_cache, meta, scale, out)
    assert torch.equal(k_cache.view(torch.uint8), k_expected.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_expected.view(torch.uint8))
    assert_matches_reference(out, reference(query, k_expected, v_expected, meta, scale))


def test_triton_kernels_match_reference_under_interpreter():
    run_under_the_interpreter(_INTERPRETER_SCRIPT, timeout=120)


def test_decode_partitions_grow_instead_of_multiplying_past_the_cap():
    pytest.importorskip("triton")
    from ops.triton_attention import PARTITION_SIZE, decode_partitions

    assert PARTITION_SIZE == 1024
    assert decode_partitions(4096, 256 * 8) == (4, 1024)  # max_model_len <= 8192: PARTITION_SIZE
    assert decode_partitions(32768, 1 * 8) == (64, 512)  # small batch: split for parallelism
    parts, size = decode_partitions(40960, 256 * 8)
    assert parts <= 16 and parts * size >= 40960 and size % 64 == 0 and size > PARTITION_SIZE
    parts, size = decode_partitions(131072, 64 * 8)
    assert parts <= 16 and parts * size >= 131072
    assert decode_partitions(1, 5) == (1, 64) and decode_partitions(700, 256 * 8) == (1, 1024)
    # A few sequences: smaller partitions while the grid stays within SMALL_GRID_PROGRAMS.
    assert decode_partitions(4096, 1 * 8) == (64, 64)
    assert decode_partitions(4096, 4 * 8) == (16, 256)
    assert decode_partitions(4096, 8 * 8) == (8, 512)
    assert decode_partitions(4096, 16 * 8) == (4, 1024)  # 512 positions would make 1,024 programs
    assert decode_partitions(300, 1 * 8) == (5, 64)
    assert decode_partitions(4096, 2 * 8) == (32, 128)  # 64 positions would make 1,024 programs


def test_large_grids_take_larger_partitions_when_asked(monkeypatch):
    pytest.importorskip("triton")
    from ops import triton_attention

    assert triton_attention.decode_partitions(4096, 256 * 8) == (4, 1024)  # LARGE_GRID_PARTITION_SIZE as shipped
    monkeypatch.setattr(triton_attention, "LARGE_GRID_PARTITION_SIZE", 4096)
    assert triton_attention.decode_partitions(4096, 256 * 8) == (1, 4096)  # one partition: no reduce kernel
    assert triton_attention.decode_partitions(4096, 128 * 8) == (4, 1024)  # below LARGE_GRID_PROGRAMS: as before
    assert triton_attention.decode_partitions(700, 256 * 8) == (1, 1024)  # a short bound still narrows
    parts, size = triton_attention.decode_partitions(40960, 256 * 8)
    assert (parts, size) == (10, 4096)
