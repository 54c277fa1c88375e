"""The swap-AB Gluon W4A16 GEMM (ops.gluon_swapab): its repacked weight format and its kernel.

CPU: `repack_swapab` against the reference (ops.quant_ref): the nibbles as the kernel's threads read them
(`unpack_swapab`, the docstring's word/nibble -> (k, n) formulas) and, with GPTQ's zeros and scales applied per
output as the kernel applies them, the reference's dequantized weight bit for bit; the host wrapper's argument
checks; and, under Triton 3.6's Gluon (the local Triton if it is 3.6, else $GLUON_TRITON_SITE or /tmp/t36;
skipped without one), the offline sm_90 compile: HGMMA with A from registers, no shared-memory loads/stores in
the K loop, `wait_group 1` only, no write to an in-flight HGMMA's A registers, no spills, for each BLOCK_M
(64 / 128 / 256) with and without split-K, and the persistent stream-K kernel; the automatic row-tile / K-range /
stream-K choices; and a model of the stream-K kernel's schedule (every K-tile of every tile done once, each piece
of a tile written where the tile's reducer reads it).

GPU (`-m gpu`, Hopper): against dequantize-then-matmul (ops.quant_ref via random_layer) on the Llama-3.1-70B
shapes at rows 1, 77 and 256, bf16 and fp16, groups 32 / 64 (GPTQ v1 zeros) and 128 (v2 zeros, as AWQ repacked),
into NaN-filled outputs so an unwritten element shows; split-K (off, automatic, 2, 3) with each BLOCK_M at rows
1 / 77 / 128 / 200 / 256; the stream-K kernel on the same shapes and rows, with bias and on a shape whose ranges
cut tiles in three; and split-K and stream-K calls replayed twice in a CUDA graph (the per-tile counters reset).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ops.quant_ref import dequantize_gptq, unpack_int4
from tests.test_gluon_quant import ROOT, _needs_hopper, _triton36_env
from tests.test_triton_quant import LLAMA_70B_SHAPES, TOLERANCE, random_layer, random_words

gpu = pytest.mark.gpu


def _dequant_as_the_kernel(packed, qzeros, scales, group_size, zero_offset, dtype):
    """W [K, N] from the repacked words, each word's output's zero and scale applied as the kernel does: fp32
    (q - zero) * scale, rounded once to dtype."""
    from ops.gluon_swapab import unpack_swapab

    q = unpack_swapab(packed)
    K, N = q.shape
    zeros = unpack_int4(qzeros, dim=-1) + zero_offset  # [groups, N]
    groups = torch.arange(K) // group_size
    return ((q - zeros[groups]).float() * scales[groups].float()).to(dtype)


@pytest.mark.parametrize("K,N", [(128, 16), (1024, 384), (8192, 128)])
def test_repack_swapab_holds_the_gptq_nibbles_where_the_kernel_reads_them(K, N):
    from ops.gluon_swapab import repack_swapab, unpack_swapab

    torch.manual_seed(0)
    qweight = random_words((K // 8, N), "cpu")
    packed = repack_swapab(qweight)
    assert packed.dtype == torch.int32 and packed.shape == (K // 64, N * 8) and packed.is_contiguous()
    assert torch.equal(unpack_swapab(packed), unpack_int4(qweight, dim=0))


@pytest.mark.parametrize("group_size,zero_offset", [(32, 1), (64, 1), (128, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_repacked_weight_dequantizes_to_the_reference_bit_for_bit(group_size, zero_offset, dtype):
    from ops.gluon_swapab import repack_swapab

    torch.manual_seed(0)
    K, N = 512, 256
    qweight = random_words((K // 8, N), "cpu")
    qzeros = random_words((K // group_size, N // 8), "cpu")
    scales = (torch.rand(K // group_size, N) * 0.02 + 1e-3).half()
    g_idx = torch.arange(K, dtype=torch.int32) // group_size
    want = dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_minus_one=bool(zero_offset)).to(dtype)
    got = _dequant_as_the_kernel(repack_swapab(qweight), qzeros, scales, group_size, zero_offset, dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_repack_swapab_refuses_shapes_off_its_tiles():
    from ops.gluon_swapab import repack_swapab

    with pytest.raises(ValueError, match="K % 64"):
        repack_swapab(torch.zeros(4, 16, dtype=torch.int32))  # K = 32
    with pytest.raises(ValueError, match="N % 16"):
        repack_swapab(torch.zeros(8, 24, dtype=torch.int32))


def test_swapab_gptq_matmul_refuses_what_it_cannot_run():
    gs = pytest.importorskip("ops.gluon_swapab")
    if not gs.HAVE_GLUON:
        pytest.skip("no Gluon")
    K, N = 1024, 384
    packed = gs.repack_swapab(torch.zeros(K // 8, N, dtype=torch.int32))
    qzeros, scales = torch.zeros(K // 128, N // 8, dtype=torch.int32), torch.ones(K // 128, N, dtype=torch.float16)
    x = torch.zeros(4, K, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        gs.swapab_gptq_matmul(x.float(), packed, qzeros, scales, 128, 0)
    with pytest.raises(ValueError, match="repack_swapab"):  # GPTQ's qweight, not repacked
        gs.swapab_gptq_matmul(x, torch.zeros(K // 8, N, dtype=torch.int32), qzeros, scales, 128, 0)
    with pytest.raises(ValueError, match="unsupported shape"):  # N not a multiple of 128
        p2 = gs.repack_swapab(torch.zeros(K // 8, 192, dtype=torch.int32))
        gs.swapab_gptq_matmul(x, p2, qzeros[:, :24], scales[:, :192], 128, 0)
    with pytest.raises(ValueError, match="unsupported shape"):  # group 16
        gs.swapab_gptq_matmul(x, packed, torch.zeros(K // 16, N // 8, dtype=torch.int32),
                              torch.ones(K // 16, N, dtype=torch.float16), 16, 0)
    with pytest.raises(ValueError, match="unsupported shape"):  # K = 192: an odd number of 64-deep K-tiles
        x3 = torch.zeros(4, 192, dtype=torch.bfloat16)
        gs.swapab_gptq_matmul(x3, gs.repack_swapab(torch.zeros(24, N, dtype=torch.int32)),
                              torch.zeros(3, N // 8, dtype=torch.int32), torch.ones(3, N, dtype=torch.float16), 64, 0)
    with pytest.raises(ValueError, match="do not match"):  # scales of another group size
        gs.swapab_gptq_matmul(x, packed, qzeros, scales[:4], 128, 0)


def test_swapab_picks_row_tiles_and_k_ranges_that_fill_the_gpu():
    """block_m_for, split_k_for (the most K ranges that still make one wave of programs over 132 SMs x programs an
    SM) and k_ranges on the 70B shapes: up to 128 rows (two programs an SM) qkv 3 ranges, o / down 4; above (one
    program an SM) qkv none (80 tiles x 2 would be a second wave), o / down 2; gate_up (448 tiles) never; every
    range a multiple of two K-tiles and of a group's tiles, none empty, together exactly K."""
    gs = pytest.importorskip("ops.gluon_swapab")
    pytest.importorskip("triton")
    assert [gs.block_m_for(m) for m in (1, 64, 65, 128, 129, 256, 300)] == [64, 64, 128, 128, 256, 256, 256]
    for K, N in LLAMA_70B_SHAPES:
        for M in (1, 77, 128, 200, 256):
            want = {10240: 3, 8192: 4, 57344: 1}[N] if M <= 128 else {10240: 1, 8192: 2, 57344: 1}[N]
            assert gs.split_k_for(M, N, K, 128, 132) == want, (K, N, M)
    for num_k in (2, 4, 128, 130, 256, 448):
        for split_k in (1, 2, 3, 4, 5, 8, 1000):
            for per_group in (1, 2, 4, 8, num_k):
                if num_k % per_group:
                    continue
                tiles, split = gs.k_ranges(num_k, split_k, per_group)
                assert tiles % 2 == 0 and tiles % per_group == 0 and 1 <= split <= max(1, split_k)
                assert (split - 1) * tiles < num_k <= split * tiles  # no empty range
    assert gs.k_ranges(128, 3, 2) == (44, 3) and gs.k_ranges(448, 2, 2) == (224, 2)
    assert gs.k_ranges(128, 4, 128) == (128, 1)  # one group (group_size -1): no split


def _stream_k_model(num_tiles, k_tiles, programs, dp_rounds, units):
    """`_swapab_streamk_kernel`'s schedule, step for step in Python: the whole tiles each program writes, the
    pieces it stores (workspace index -> (tile, first K-tile, K-tiles)) and the indices each tile's reducer reads."""
    direct, written, reads = [], {}, {}
    dp_tiles = dp_rounds * programs
    sk_tiles = num_tiles - dp_tiles
    for pid in range(programs):
        start = pid * units
        end = min(start + units, sk_tiles * k_tiles)
        j, it = 0, start
        while j < dp_rounds or it < end:
            if j < dp_rounds:
                tile, first, num_k = pid + j * programs, 0, k_tiles
                j += 1
            else:
                local = it // k_tiles
                tile, first = dp_tiles + local, it - local * k_tiles
                num_k = min(end, (local + 1) * k_tiles) - it
                it += num_k
            if num_k == k_tiles:
                direct.append(tile)
                continue
            u = (tile - dp_tiles) * k_tiles
            index = 2 * pid + (0 if start >= u else 1)
            assert index not in written
            written[index] = (tile, first, num_k)
            p0, p1 = u // units, (u + k_tiles - 1) // units
            reads[tile] = [2 * p0 + 2 * i + ((1 if p0 * units < u else 0) if i == 0 else 0) for i in range(p1 - p0 + 1)]
    return direct, written, reads


def test_stream_k_schedule_does_every_k_tile_once_and_reduces_what_it_wrote():
    """stream_k_plan + the kernel's index arithmetic (modelled): every tile either written whole by one program
    or cut into pieces that cover its K-tiles exactly once, in the order the reducer reads them, each piece an
    even number of K-tiles starting on a group; no more programs than SMs; the 70B plans on 132 SMs."""
    gs = pytest.importorskip("ops.gluon_swapab")
    cases = [(448, 128, 2, 132), (80, 128, 2, 132), (160, 128, 2, 132), (60, 96, 2, 132), (6, 32, 2, 132),
             (896, 128, 2, 132), (264, 128, 2, 132), (7, 64, 4, 8), (13, 30, 1, 5), (80, 256, 1, 132), (5, 8, 8, 3)]
    for num_tiles, k_tiles, per_group, slots in cases:
        programs, dp_rounds, units = gs.stream_k_plan(num_tiles, k_tiles, per_group, slots)
        assert programs <= slots and units % max(2, per_group) == 0
        direct, written, reads = _stream_k_model(num_tiles, k_tiles, programs, dp_rounds, units)
        assert len(direct) == len(set(direct))
        cut = sorted(reads)
        assert sorted(direct + cut) == list(range(num_tiles)), (num_tiles, k_tiles, slots)
        for tile in cut:
            pieces = [written[i] for i in reads[tile]]
            assert all(t == tile for t, _, _ in pieces)
            assert [first for _, first, _ in pieces] == sorted(first for _, first, _ in pieces)
            covered = [k for _, first, num_k in pieces for k in range(first, first + num_k)]
            assert covered == list(range(k_tiles)), (num_tiles, k_tiles, slots, tile, pieces)
            assert all(num_k % 2 == 0 and first % per_group == 0 for _, first, num_k in pieces)
        assert sorted(i for r in reads.values() for i in r) == sorted(written)
    assert gs.stream_k_plan(448, 128, 2, 132) == (132, 3, 52)  # 70B gate_up at 129-256 rows
    assert gs.stream_k_plan(80, 128, 2, 132) == (132, 0, 78)  # qkv
    assert gs.stream_k_plan(4, 128, 128, 132)[1:] == (0, 128)  # one group: whole tiles only


def test_swapab_uses_stream_k_where_whole_tiles_leave_the_last_wave_short():
    """use_stream_k on the 70B shapes, 132 SMs: only at BLOCK_M 256, for gate_up (448 tiles) and qkv (80 tiles);
    o / down split in two instead; gate_up at 512 rows (896 tiles, 6.8 waves) stays data-parallel."""
    gs = pytest.importorskip("ops.gluon_swapab")
    pytest.importorskip("triton")
    for K, N in LLAMA_70B_SHAPES:
        for M in (1, 77, 128, 129, 200, 256, 512):
            want = M > 128 and (N == 10240 or (N == 57344 and M <= 256))
            assert gs.use_stream_k(M, N, K, 128, 132) == want, (K, N, M)
    assert not gs.use_stream_k(200, 57344, 8192, 128, 132, block_m=128)


@pytest.mark.parametrize("dtype,group,block_m,split_k,stream_k", [
    ("bf16", 128, 256, False, False), ("fp16", 32, 256, False, False), ("bf16", 64, 256, False, False),
    ("bf16", 128, 256, True, False), ("bf16", 128, 128, False, False), ("bf16", 128, 128, True, False),
    ("bf16", 128, 64, False, False), ("bf16", 128, 64, True, False), ("fp16", 32, 64, True, False),
    ("fp16", 64, 128, True, False), ("bf16", 128, 256, False, True), ("fp16", 32, 256, False, True),
    ("bf16", 128, 64, False, True)])
def test_swapab_kernel_compiles_for_sm90_with_w_in_registers(dtype, group, block_m, split_k, stream_k):
    env = _triton36_env()
    if env is None:
        pytest.skip("needs Triton 3.6's Gluon (local triton, $GLUON_TRITON_SITE or /tmp/t36)")
    code = ("import json, sys; sys.path.insert(0, '.'); from perf.gluon_swapab_sass import analyze; "
            f"info = analyze({dtype!r}, {group}, block_m={block_m}, split_k={split_k}, stream_k={stream_k}); "
            "info.pop('_body'); print(json.dumps(info))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["triton"].startswith("3.6.")
    assert info["hgmma_a_from_registers"], info["hgmma_forms"]  # HGMMA R.., R.., gdesc[..]
    assert info["loop_hgmma"] == info["loop_k_tiles"] * info["block_k"] // 16
    assert info["loop_shared_ld_st"] == 0  # W never in shared memory; x by TMA
    assert info["loop_tma"] == info["loop_k_tiles"] and info["loop_fences"] == 0
    assert set(info["loop_wgmma_waits"]) == {"WARPGROUP.DEPBAR.LE gsb0, 0x1"}, info["loop_wgmma_waits"]
    assert info["loop_a_register_hazards"] == [], info["loop_a_register_hazards"]
    assert info["ttgir_local_ops"] == {"local_alloc": 2}  # x's ring and the mbarriers
    assert info["spill_bytes"] == 0 and info["local"] == 0 and info["stack"] == 0, info
    assert not [w for w in info["ptxas_warnings"] if "C75" in w], info["ptxas_warnings"]
    assert info["shared_bytes"] <= 227 * 1024
    assert f"HGMMA.64x{block_m}x16" in info["hgmma_forms"][0], info["hgmma_forms"]
    if block_m <= 128 and (dtype, group) == ("bf16", 128) and not stream_k:  # PROGRAMS_PER_SM's 2
        assert info["registers"] <= 128 and info["programs_per_sm"] >= 2, info


def _check(layer, weight, x, bias=None, **kwargs):
    from ops.gluon_swapab import repack_swapab, swapab_gptq_matmul

    K, N = weight.shape
    out = torch.full((*x.shape[:-1], N), float("nan"), dtype=x.dtype, device=x.device)
    packed = layer.get("packed")
    if packed is None:
        packed = layer["packed"] = repack_swapab(layer["qweight"])
    got = swapab_gptq_matmul(x, packed, layer["qzeros"], layer["scales"], layer["group_size"],
                             zero_offset=int(layer["zeros_minus_one"]), bias=bias, out=out, **kwargs)
    assert got is out
    want = x.float() @ weight
    if bias is not None:
        want += bias.float()
    assert not got.isnan().any(), f"unwritten (NaN) outputs, M={x.shape[0]}"
    error = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= TOLERANCE[x.dtype] * scale, f"M={x.shape[0]} {x.dtype} {kwargs}: {error} vs {scale}"


@gpu
@pytest.mark.parametrize("shape", LLAMA_70B_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["gptq-v1-g32", "gptq-v1-g64", "gptq-v2-g128"])
def test_swapab_gptq_matmul_matches_the_reference_on_70b_shapes(variant, shape):
    _needs_hopper()
    torch.manual_seed(0)
    K, N = shape
    for dtype in (torch.bfloat16, torch.float16):
        layer, weight = random_layer(variant, K, N, dtype, "cuda")
        for M in (1, 77, 256):
            _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype))
        del layer, weight
        torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_swapab_gptq_matmul_small_shapes_any_rows_and_bias(dtype):
    _needs_hopper()
    torch.manual_seed(0)
    K, N = 1024, 384
    for variant in ("gptq-v1-g32", "gptq-v1-g64", "gptq-v2-g128"):
        layer, weight = random_layer(variant, K, N, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        for M in (1, 7, 64, 255, 257, 512, 513):
            _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype))
            _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype), bias=bias)
        _check(layer, weight, torch.randn(3, 50, K, device="cuda").to(dtype))  # [..., K]
        _check(layer, weight, torch.randn(100, K + 4, device="cuda").to(dtype)[:, :K])  # row stride not 16 bytes


@gpu
@pytest.mark.parametrize("shape", LLAMA_70B_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["gptq-v1-g32", "gptq-v2-g128"])
def test_swapab_split_k_and_each_row_tile_match_the_reference_on_70b_shapes(variant, shape):
    """Every BLOCK_M (64 / 128 / 256, where it holds the rows or more), with split-K off, automatic and forced
    (2 and 3 ranges; on gate_up too), at rows 1, 77, 128, 200 and 256; bf16, fp16 for the v1 zeros."""
    for dtype, layer, weight in _layers_on(variant, shape):
        for M in (1, 77, 128, 200, 256):
            x = torch.randn(M, shape[0], device="cuda").to(dtype)
            for block_m in (64, 128, 256):
                if block_m < M and block_m != 64:  # 64 covers the several-row-tiles case
                    continue
                for split_k in (1, None, 2, 3):
                    _check(layer, weight, x, block_m=block_m, split_k=split_k)


def _layers_on(variant, shape):
    """(dtype, layer, weight) on a Hopper GPU for each dtype a variant is checked in (fp16 too for the v1 zeros),
    the memory handed back after each."""
    _needs_hopper()
    torch.manual_seed(0)
    K, N = shape
    for dtype in (torch.bfloat16, torch.float16) if variant == "gptq-v1-g32" else (torch.bfloat16, ):
        layer, weight = random_layer(variant, K, N, dtype, "cuda")
        yield dtype, layer, weight
        del layer, weight
        torch.cuda.empty_cache()


@gpu
def test_swapab_split_k_with_bias_and_odd_shapes():
    _needs_hopper()
    torch.manual_seed(0)
    K, N = 2048, 384  # 32 K-tiles: split 3 gives ranges 12 / 12 / 8
    for variant, dtype in (("gptq-v1-g32", torch.float16), ("gptq-v2-g128", torch.bfloat16)):
        layer, weight = random_layer(variant, K, N, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        for M in (1, 63, 65, 129, 257):
            for split_k in (2, 3, 16):
                _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype), bias=bias, split_k=split_k)


@gpu
def test_swapab_replays_in_a_cuda_graph_with_split_k():
    """Two CUDA-graph replays of split-K calls (o at 256 rows: 2 ranges; at 64 rows: BLOCK_M 64, 4 ranges), new
    x each time, NaN-filled outputs: the per-tile counters are left zeroed by every launch."""
    _needs_hopper()
    torch.manual_seed(0)
    K, N = 8192, 8192
    layer, weight = random_layer("gptq-v2-g128", K, N, torch.bfloat16, "cuda")
    from ops.gluon_swapab import k_ranges, repack_swapab, split_k_for, swapab_gptq_matmul
    from ops.triton_quant import _num_sms

    packed = repack_swapab(layer["qweight"])
    xs = [torch.randn(m, K, device="cuda", dtype=torch.bfloat16) for m in (256, 64)]
    for x in xs:
        assert k_ranges(K // 64, split_k_for(x.shape[0], N, K, 128, _num_sms(None)), 2)[1] > 1
    calls = [lambda x=x: swapab_gptq_matmul(x, packed, layer["qzeros"], layer["scales"], 128, 0) for x in xs]
    for call in calls:
        call()  # compiles (and makes the counters) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    for _ in range(2):
        for x, out in zip(xs, outs):
            x.copy_(torch.randn_like(x))
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for x, out in zip(xs, outs):
            want = x.float() @ weight
            assert not out.isnan().any()
            assert (out.float() - want).abs().max() <= TOLERANCE[torch.bfloat16] * want.abs().max()


@gpu
@pytest.mark.parametrize("shape", LLAMA_70B_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["gptq-v1-g32", "gptq-v2-g128"])
def test_swapab_stream_k_matches_the_reference_on_70b_shapes(variant, shape):
    """The persistent stream-K kernel, forced, at rows 1 / 77 / 128 / 200 / 256 with BLOCK_M 256 (and 64: several
    row tiles an output tile), and automatic at 200 / 256 rows (stream-K on gate_up and qkv)."""
    for dtype, layer, weight in _layers_on(variant, shape):
        for M in (1, 77, 128, 200, 256):
            x = torch.randn(M, shape[0], device="cuda").to(dtype)
            for block_m in (256, 64):
                _check(layer, weight, x, block_m=block_m, stream_k=True)
            if M >= 200:
                _check(layer, weight, x)


@gpu
def test_swapab_stream_k_with_bias_and_tiles_cut_in_three():
    """K 6144 (96 K-tiles), N 3840, 300 rows: 60 tiles, ranges of 44 K-tiles, so a tile is cut in two or three
    pieces and some start mid-range; with bias, group 32 fp16 (v1 zeros) and group 128 bf16."""
    _needs_hopper()
    torch.manual_seed(0)
    from ops.gluon_swapab import stream_k_plan

    K, N = 6144, 3840
    if torch.cuda.get_device_properties(0).multi_processor_count == 132:  # the H100
        assert stream_k_plan(60, 96, 2, 132) == (131, 0, 44)
    for variant, dtype in (("gptq-v1-g32", torch.float16), ("gptq-v2-g128", torch.bfloat16)):
        layer, weight = random_layer(variant, K, N, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        for M in (1, 257, 300):
            _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype), bias=bias, stream_k=True)


@gpu
def test_swapab_replays_in_a_cuda_graph_with_stream_k():
    """70B qkv at 256 rows (stream-K by default: 80 tiles, each in 2-3 pieces) and gate_up's shape cut to 12,288
    outputs at 200 rows (96 tiles), two calls in one CUDA graph replayed twice with new x into NaN-filled outputs."""
    _needs_hopper()
    torch.manual_seed(0)
    from ops.gluon_swapab import repack_swapab, swapab_gptq_matmul, use_stream_k
    from ops.triton_quant import _num_sms

    cases = []
    for (K, N), M in (((8192, 10240), 256), ((8192, 12288), 200)):
        layer, weight = random_layer("gptq-v2-g128", K, N, torch.bfloat16, "cuda")
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        cases.append((x, repack_swapab(layer["qweight"]), layer, weight))
    assert use_stream_k(256, 10240, 8192, 128, _num_sms(None))
    calls = [lambda c=c: swapab_gptq_matmul(c[0], c[1], c[2]["qzeros"], c[2]["scales"], 128, 0, stream_k=True)
             for c in cases]
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    for _ in range(2):
        for (x, *_), out in zip(cases, outs):
            x.copy_(torch.randn_like(x))
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for (x, _, _, weight), out in zip(cases, outs):
            want = x.float() @ weight
            assert not out.isnan().any()
            assert (out.float() - want).abs().max() <= TOLERANCE[torch.bfloat16] * want.abs().max()
