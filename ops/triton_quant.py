"""Triton weight-only quantized matmuls: y = x @ W for 4-bit AWQ / GPTQ weights and int8 weights,
dequantized INSIDE the kernel, one K-tile at a time in registers (no full-size float weight is ever
made). The layouts are those of `ops.quant_ref`, the pure-torch oracle these kernels are tested against.

One kernel, `_quant_matmul_kernel`, serves the three formats (a constexpr `FORMAT` picks how a
[BLOCK_K, BLOCK_N] tile of W is loaded and unpacked) and every batch size. Each program owns a
BLOCK_M x BLOCK_N output tile and a range of K, and streams W's packed tiles through a software
pipeline (`tl.range(..., num_stages)`: cp.async copies run num_stages - 1 K-tiles ahead). Per K-tile:

- BLOCK_M >= 16: `tl.dot` as (W^T x^T)^T, so that W's tile is wgmma's M operand (M >= 64 on Hopper;
  x's few rows could not be). With fewer rows than BLOCK_K, the dot takes (q - zero), exact in x's
  dtype, and its [BLOCK_M, BLOCK_N] result is scaled; otherwise the tile is scaled first (the smaller
  of the two gets the multiplies).
- BLOCK_M = 1: a GEMV. x's K-tile times W's, summed over K with FMAs, no tensor cores. Only the "gemv"
  candidate table uses it: compiled for sm_90, the tl.dot path takes fewer instructions per weight even
  for one row (its 15 padding rows cost only the otherwise idle tensor cores; the GEMV's sums over K
  cost shuffles and adds), so the default sends every decode batch through tl.dot.

A second kernel, `_planar_kernel`, takes 1 or 2 rows of GPTQ's layout (no act-order; the engine repacks
AWQ checkpoints into it at load, `ops.quant_ref.awq_to_gptq`): there nibble p of a word is input
8r + p, so each nibble plane meets x's inputs 8r + p directly (x read with a stride of 8) and nothing
is interleaved or transposed; see its docstring. Its WIDE forms give each thread 8 columns, so every
x value it loads serves 8 weights: on the H100 (perf/RESULTS.md, 2026-11-26, session 6) the four layers
of a Llama-3.1-8B decoder layer took 68 us at one row and 87 us at two with WIDE, against bf16 cuBLAS's
162 us and 225 / 204 us for the one-column-a-thread form ("planar-narrow"); Llama-3.1-8B AWQ batch 1
went from 124 to 236 tok/s. WIDE2 (the default since session 7, one warp a program) keeps WIDE's
per-weight instructions and trims those around them (sm_90 SASS of the K loop: 3.85 / 5.09
instructions a weight at 1 / 2 rows against 4.45 / 5.76; `_planar_wide2_tile`): 65 / 76 us.
`perf/quant_bench.py --tiles default session6 planar-narrow dot` compares them.

When the output tiles alone are too few to occupy the GPU (small M), K is cut into `split` ranges, one
program per (tile, range) ("split-K"). Each program writes its fp32 partial tile to a workspace, and
the last of a tile's programs to finish (an atomic counter per tile says which) sums the partials in a
fixed order and writes the output: one launch, deterministic, and the counters reset themselves for
the next call. No function here syncs with the host, so the kernels can be captured in CUDA graphs.

Packed words are loaded along their contiguous axis, one int32 per thread (a warp reads whole
128-byte rows; a thread then owns 8 outputs of many rows, and the per-output work, zeros and scales,
is shared by all those rows) and unpacked in registers into 8 "planes", one per nibble position,
interleaved back into order:

- AWQ: qweight int32 [K, N/8]: output n is nibble ``(n % 8) // 2 + 4 * (n % 2)`` of word n // 8
  (AutoAWQ's interleave 0,2,4,6,1,3,5,7); qzeros [K/group, N/8] the same; scales [K/group, N].
- GPTQ: qweight int32 [K/8, N]: input k is nibble k % 8 of word k // 8; qzeros [groups, N/8] with
  output n in nibble n % 8; scales [groups, N]; the v1 format stores zero - 1 (ZERO_OFFSET = 1).
- int8: weight [N, K] with one scale per output, applied to the fp32 accumulator after the K loop.

GPTQ's layout without act-order and 16-bit x can take a second unpacking (`Tiles.packed`,
`_gptq_tile_16bit`): two weights at a time in x's own 16-bit type. A nibble OR-ed into the low
mantissa bits of 128.0 (bf16) or 1024.0 (fp16) is 128 + q (1024 + q) exactly, so per word (8 weights)
one shift, then per pair of nibbles one PRMT, one LOP3, one packed add of -(128 + zero) (exact) and
the scale: one packed multiply (fp16), or for bf16 x a multiply by s_lo and an FMA with s_hi, the fp16
scale split into two bf16 (s = s_hi + s_lo exactly): 17 / 21 instructions a word against the fp32
form's 28 and its conversions to x's type, rounded once as the fp32 form is (bit for bit the same
tile). With `Tiles.w_as_b` the dequantized tile is wgmma's B operand, stored to shared memory once
(STS.128, one barrier) and read there by the tensor cores, x being the A operand (from 64 rows);
without it W's tile is the A operand through registers, which Triton 3.9 moves through shared memory
in 16-column rounds (eight barriers a 64-deep K-tile).

Nibbles are never converted int-to-float (a quarter-rate instruction): each is masked in place and
OR-ed with the exponent bits of 2^23, which makes the float 2^23 + q * 16^pos (pos: its place in a
16-bit half); scaled by 16^-pos and less 2^(23 - 4 pos) + zero, that is q - zero exactly. The result
matches the reference's ``float32(q - zero) * float32(scale)`` up to where the scale is applied (before
or after the sum over the K-tile) and fp32 rounding.

For 4-bit formats the K-tile never spans two groups (BLOCK_K <= group size, which is a power of two),
so one row of zeros and scales serves the whole tile. GPTQ act-order is the exception: every input row
has its own group (`g_idx`), and zeros and scales are gathered per row and applied to the tile.

One exception, off by default (`DEQUANT_GEMM_ROWS`, `ENGINE_DEQUANT_GEMM_ROWS`): from that many rows, a 16-bit
GPTQ-layout matmul dequantizes its layer's weight into a transient [K, N] scratch (`_dequant_gptq_kernel`, one
layer at a time) and multiplies with cuBLAS, as vLLM's AWQ layers do from 256 tokens: for prefill-sized steps,
where the tiles' dequantizing cannot overlap their tensor cores (perf/notes/gemm256_sass.md). `dequantize_swapab` does the
same for weights in `ops.gluon_swapab`'s order (ENGINE_SWAPAB_GEMM=1). Another, also off
(`GLUON_GEMM_ROWS`, `ENGINE_GLUON_GEMM_ROWS`): from that many rows, the Gluon GEMM of `ops.gluon_quant`, whose
dequant runs under the tensor cores (perf/notes/gluon_gemm256.md), where it supports the call.

Tile sizes are fixed per batch-size class in `TILES` (no autotuning: deterministic, and no benchmarking
at start-up); `CANDIDATE_TILES` holds the alternatives `perf/quant_bench.py --tiles` compares.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

AWQ: tl.constexpr = tl.constexpr(0)
GPTQ: tl.constexpr = tl.constexpr(1)
INT8: tl.constexpr = tl.constexpr(2)

FLOAT_2_23_BITS = 0x4B000000  # 2^23 as fp32: below its exponent bits, 23 bits of mantissa
_FLOAT_2_23: tl.constexpr = tl.constexpr(8388608.0)


@dataclass(frozen=True)
class Tiles:
    """One batch-size class's launch configuration."""

    block_m: int  # output rows per program: 1 is the GEMV, >= 16 tl.dot
    block_n: int  # output columns per program
    block_k: int  # inputs per K-tile (4-bit formats: at most the group size)
    num_warps: int
    num_stages: int  # K-tiles in the software pipeline
    programs_per_sm: int  # split K up to about this many programs per SM (and at most max_split ranges)
    planar: bool = False  # GPTQ's layout without act-order only: `_planar_kernel` (block_m rows at most)
    wide: bool = False  # planar only: its WIDE form (8 columns a thread, x read unscaled; see `_planar_wide_tile`)
    wide2: bool = False  # wide only: its WIDE2 form (fewer instructions around the same; `_planar_wide2_tile`)
    packed: bool = False  # tl.dot tiles of GPTQ's layout (no act-order), 16-bit x: `_gptq_tile_16bit`; others skip it
    w_as_b: bool = False  # packed only, block_m >= 64: W's tile is the dot's B operand (x the A operand)
    # > 0, packed only: ptxas's register cap (maxnreg), so that programs_per_sm programs fit an SM with
    # split-K's epilogue or column masks too (they spill there, outside the K loop: sm_90, 128 x 128 x 64 w8: 128
    # registers unmasked, 174 with split-K uncapped)
    max_registers: int = 0
    max_split: int = 16  # K ranges per output tile at most: the last program of a tile sums this many partials


# (largest batch, tiles): a batch takes the first entry it fits that applies to its format (planar and
# packed entries apply to GPTQ's layout only, see `tiles_for`), so the entries each format can take come in
# increasing order, the last of them unbounded (1 << 62). programs_per_sm is
# how many of the tile's programs an SM holds at once (registers and shared memory, as compiled for sm_90
# by Triton 3.9), so that split-K fills the GPU in about one wave.
TileTable = tuple[tuple[int, Tiles], ...]
_PREFILL_TILES = (
    (64, Tiles(64, 128, 64, 4, 3, 2)),
    (128, Tiles(128, 128, 128, 8, 3, 1)),
    (1 << 62, Tiles(256, 128, 64, 8, 3, 1)),  # each weight tile dequantized once per 256 rows
)
# 1 and 2 rows of GPTQ's layout (and AWQ's, which the engine repacks into it) through the planar
# kernel; other formats skip these entries. WIDE2 form, 64 columns, 1 warp, 12 programs an SM: 64.8 / 75.8
# us over an 8B layer's four matmuls at 1 / 2 rows on the H100, against 68.2 / 86.3 for session 6's
# WIDE form at 2 warps (quant_bench --tiles, 2026-11-26, session 7). One row: 8 programs an SM (longer
# K ranges a program): 62.4 us against 64.6 at 12, the fastest of 14 tables (quant_bench --planar-sweep,
# session 11: 12 programs an SM split qkv's and o's K loops into 16 ranges of two K-tiles each).
_PLANAR_TILES = (
    (1, Tiles(1, 64, 128, 1, 3, 8, planar=True, wide=True, wide2=True)),
    (2, Tiles(2, 64, 128, 1, 3, 12, planar=True, wide=True, wide2=True)),
)
# tl.dot tiles of GPTQ's layout with 16-bit x (`packed`: other formats and fp32 x skip these entries and
# take the plain ones after them): weights dequantized two at a time in bf16x2/f16x2 and, from 64 rows,
# W's tile as wgmma's B operand, x read by the tensor cores from shared memory. sm_90 SASS of the K loop
# (Triton 3.9), bf16 x: 128 x 128 x 64, 8 warps: 239 instructions a warp a K-tile (7.5 a weight) against
# the plain 256-row tile's 324 (10.1), whose dequantized tile goes through shared memory in four rounds
# with eight barriers; 128 registers, two programs an SM. 64 rows: 4 warps, 168 registers, three an SM.
# Above 128 rows one 256-row tile of 16 warps (118 registers), 4 stages. H100, an 8B layer's four
# matmuls (quant_bench, session 7): 233 / 353 / 380 us at 128 / 160 / 256 rows against 379 / 410 / 436
# with the plain tiles (bf16 cuBLAS: 178 / 186 / 205).
_PACKED_TILES = (
    (16, Tiles(16, 128, 128, 4, 3, 3, packed=True)),
    (64, Tiles(64, 128, 64, 4, 4, 3, packed=True, w_as_b=True, max_registers=168)),
    (128, Tiles(128, 128, 64, 8, 4, 2, packed=True, w_as_b=True, max_registers=128)),
    (1 << 62, Tiles(256, 128, 64, 16, 4, 1, packed=True, w_as_b=True)),
)
# Session 6's planar entries (WIDE form, 2 warps).
_PLANAR_WIDE_TILES = (
    (1, Tiles(1, 64, 128, 2, 3, 6, planar=True, wide=True)),
    (2, Tiles(2, 64, 128, 2, 3, 6, planar=True, wide=True)),
)
CANDIDATE_TILES: dict[str, TileTable] = {
    # Decode: 1..2 rows planar (GPTQ layout); GPTQ's layout with 16-bit x through the packed tiles; every
    # other format up to 16 rows through tl.dot with split-K, then the GEMM tiles above.
    "default": (*_PLANAR_TILES, *_PACKED_TILES, (16, Tiles(16, 128, 128, 4, 3, 3)), *_PREFILL_TILES),
    # Session 6's default: WIDE planar entries, no packed tiles.
    "session6": (*_PLANAR_WIDE_TILES, (16, Tiles(16, 128, 128, 4, 3, 3)), *_PREFILL_TILES),
    # The planar kernel's first form: one column a thread (the default until session 6; 3x slower).
    "planar-narrow": ((1, Tiles(1, 64, 128, 2, 3, 8, planar=True)), (2, Tiles(2, 64, 128, 2, 3, 8, planar=True)),
                      (16, Tiles(16, 128, 128, 4, 3, 3)), *_PREFILL_TILES),
    # The same without the planar kernel (every format through tl.dot from 1 row).
    "dot": ((16, Tiles(16, 128, 128, 4, 3, 3)), *_PREFILL_TILES),
    # One row through the GEMV (no tensor cores); 2..16 rows as "default".
    "gemv": ((1, Tiles(1, 128, 128, 4, 4, 3)), (16, Tiles(16, 128, 128, 4, 3, 3)), *_PREFILL_TILES),
    # Half-depth K-tiles (fewer registers and less shared memory: more programs per SM), 128-row GEMM tiles.
    "small": (
        (16, Tiles(16, 128, 64, 4, 4, 3)),
        (64, Tiles(64, 64, 64, 4, 3, 3)),
        (1 << 62, Tiles(128, 128, 64, 8, 3, 1)),
    ),
}
# ENGINE_QUANT_TILES=NAME runs the engine on another candidate table (benchmarks: the same model with another tile set).
_TABLE_NAME = os.environ.get("ENGINE_QUANT_TILES", "default")
if _TABLE_NAME not in CANDIDATE_TILES:
    raise ValueError(f"ENGINE_QUANT_TILES={_TABLE_NAME!r} is not a tile table; tables: {', '.join(CANDIDATE_TILES)}")
TILES: TileTable = CANDIDATE_TILES[_TABLE_NAME]
# From this many rows, a 16-bit GPTQ-layout matmul without act-order (AWQ checkpoints run as one) dequantizes
# its weight into a [K, N] scratch in x's dtype (`_dequant_gptq_kernel`) and multiplies it with cuBLAS instead of
# running the 4-bit tiles: prefill-sized steps. The 4-bit tiles cannot overlap their dequantizing with the
# tensor cores (perf/notes/gemm256_sass.md): a 70B layer's four matmuls take 1.82x bf16 cuBLAS's time at 256
# rows, while the dequantize pass costs about one read of the packed weight and one write of the 16-bit one
# (~0.7 ms a 70B layer; 8,192 rows of its matmuls take ~20 ms). 0 (the default until timed on a GPU): never.
# ENGINE_DEQUANT_GEMM_ROWS in the environment sets it.
DEQUANT_GEMM_ROWS = int(os.environ.get("ENGINE_DEQUANT_GEMM_ROWS", "0"))
# From this many rows (and below DEQUANT_GEMM_ROWS, where that is set), the same matmuls go through the Gluon GEMM
# (`ops.gluon_quant`: the next K-tile's dequant under the current wgmma) where it `supports` the call. 0 (the
# default until it has run on a GPU): never. ENGINE_GLUON_GEMM_ROWS in the environment sets it.
GLUON_GEMM_ROWS = int(os.environ.get("ENGINE_GLUON_GEMM_ROWS", "0"))

_MAX_SPLIT_K_TILES = 1 << 16  # output tiles one split-K launch may have (one int32 counter each)
_INTERPRETER_SMS = 2  # CPU (Triton interpreter): few enough "SMs" that test shapes stay small, yet split K


@triton.jit
def _below(offsets, bound, ALWAYS: tl.constexpr):
    """offsets < bound; a constant true when the caller knows it always is (the mask then folds away)."""
    if ALWAYS:
        return tl.full(offsets.shape, 1, tl.int1)
    return offsets < bound


@triton.jit
def _nibble(words, POS: tl.constexpr, exponent_bits):
    """2^(23 - 4 POS) + q as fp32, q being nibble POS (< 4) of each word. Masked in place and OR-ed with
    the exponent bits of 2^23 (one LOP3), the nibble makes the float 2^23 + q * 16^POS; the product by
    16^-POS is exact. `exponent_bits` is a kernel argument, not a constant, so that it sits in a register
    and the mask is LOP3's one immediate (ptxas otherwise re-materializes a constant next to every nibble)."""
    return ((words & (0xF << (4 * POS))) | exponent_bits).to(tl.float32, bitcast=True) * (1.0 / (1 << (4 * POS)))


@triton.jit
def _interleave8(p0, p1, p2, p3, p4, p5, p6, p7):
    """[..., C] x 8 -> [..., 8C] with element 8c + j from p_j[..., c]."""
    return tl.interleave(tl.interleave(tl.interleave(p0, p4), tl.interleave(p2, p6)),
                         tl.interleave(tl.interleave(p1, p5), tl.interleave(p3, p7)))


@triton.jit
def _awq_tile(w_ptr, zeros_ptr, scales_ptr, rk, k_mask, n0, N, stride_w, group, exponent_bits,
              EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """AWQ's tile of inputs rk (one group), outputs n0..: (q - zero [BLOCK_K, BLOCK_N], scales [BLOCK_N])."""
    rc = tl.max_contiguous(n0 // 8 + tl.arange(0, BLOCK_N // 8), 1)  # packed columns, one word per thread
    c_mask = _below(rc, N // 8, EVEN_N)
    words = tl.load(w_ptr + rk[:, None] * stride_w + rc[None, :], mask=k_mask[:, None] & c_mask[None, :], other=0)
    zero_words = tl.load(zeros_ptr + group * stride_w + rc, mask=c_mask, other=0)[None, :]
    # Output j of a word is nibble j // 2 of its low half (j even) or of its high half (j odd); the zeros
    # unpack the same way, so each difference is exactly q - zero.
    low, high, zero_low, zero_high = words, words >> 16, zero_words, zero_words >> 16
    q_minus_zero = _interleave8(
        _nibble(low, 0, exponent_bits) - _nibble(zero_low, 0, exponent_bits),
        _nibble(high, 0, exponent_bits) - _nibble(zero_high, 0, exponent_bits),
        _nibble(low, 1, exponent_bits) - _nibble(zero_low, 1, exponent_bits),
        _nibble(high, 1, exponent_bits) - _nibble(zero_high, 1, exponent_bits),
        _nibble(low, 2, exponent_bits) - _nibble(zero_low, 2, exponent_bits),
        _nibble(high, 2, exponent_bits) - _nibble(zero_high, 2, exponent_bits),
        _nibble(low, 3, exponent_bits) - _nibble(zero_low, 3, exponent_bits),
        _nibble(high, 3, exponent_bits) - _nibble(zero_high, 3, exponent_bits))
    rn = n0 + tl.arange(0, BLOCK_N)
    scales = tl.load(scales_ptr + group * N + rn, mask=_below(rn, N, EVEN_N), other=0.0).to(tl.float32)
    return q_minus_zero, scales


@triton.jit
def _gptq_zeros_and_scales(zeros_ptr, scales_ptr, groups, rn, n_mask, N, ZERO_OFFSET: tl.constexpr):
    """fp32 zeros and scales of outputs rn in `groups`: [BLOCK_N] for one group (a scalar), [R, BLOCK_N]
    for one group per row ([R, 1])."""
    words = tl.load(zeros_ptr + groups * (N // 8) + rn // 8, mask=n_mask, other=0)
    zeros = (((words >> ((rn % 8) * 4)) & 0xF) + ZERO_OFFSET).to(tl.float32)
    scales = tl.load(scales_ptr + groups * N + rn, mask=n_mask, other=0.0).to(tl.float32)
    return zeros, scales


@triton.jit
def _gptq_plane(words, zeros, POS: tl.constexpr, exponent_bits):
    """q - zero of nibble POS of each word (zeros [BLOCK_N] or [R, BLOCK_N])."""
    return _nibble(words, POS, exponent_bits) - (zeros + _FLOAT_2_23 / (1 << (4 * POS)))


@triton.jit
def _act_order_plane(words, P: tl.constexpr, g_idx_ptrs, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N,
                     exponent_bits, ZERO_OFFSET: tl.constexpr):
    """Act-order: (q - zero) * scale of plane P (g_idx_ptrs + P: the groups of its inputs, one per row)."""
    groups = tl.load(g_idx_ptrs + P, mask=r_mask, other=0)[:, None]
    zeros, scales = _gptq_zeros_and_scales(zeros_ptr, scales_ptr, groups, rn, n_mask, N, ZERO_OFFSET)
    return _gptq_plane(words, zeros, P % 4, exponent_bits) * scales


@triton.jit
def _gptq_tile(w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, k0, n0, N, K, stride_w, group, exponent_bits,
               ZERO_OFFSET: tl.constexpr, ACT_ORDER: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """GPTQ's tile of inputs k0.. (one group), outputs n0..: (q - zero [BLOCK_K, BLOCK_N], scales [BLOCK_N]);
    with act-order ((q - zero) * scale, ones). Word row r holds inputs 8r..8r+7 (input 8r + p in nibble
    p): the 8 nibble planes [BLOCK_K / 8, BLOCK_N] are unpacked apart and interleaved along K."""
    rr = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    rn = tl.max_contiguous(n0 + tl.arange(0, BLOCK_N), 1)  # one column per thread, as AWQ's words
    r_mask = _below(rr, K // 8, EVEN_K)
    n_mask = _below(rn, N, EVEN_N)
    words = tl.load(w_ptr + rr[:, None] * stride_w + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
    low, high = words, words >> 16
    if ACT_ORDER:
        g = g_idx_ptr + rr * 8
        planes_t = _interleave8(  # transposed [BLOCK_N, BLOCK_K / 8] planes interleave along K
            _act_order_plane(low, 0, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T,
            _act_order_plane(low, 1, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T,
            _act_order_plane(low, 2, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T,
            _act_order_plane(low, 3, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T,
            _act_order_plane(high, 4, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T,
            _act_order_plane(high, 5, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T,
            _act_order_plane(high, 6, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T,
            _act_order_plane(high, 7, g, r_mask, zeros_ptr, scales_ptr, rn, n_mask, N, exponent_bits, ZERO_OFFSET).T)
        return planes_t.T, tl.full((BLOCK_N,), 1.0, tl.float32)
    zeros, scales = _gptq_zeros_and_scales(zeros_ptr, scales_ptr, group, rn, n_mask, N, ZERO_OFFSET)
    planes_t = _interleave8(
        _gptq_plane(low, zeros, 0, exponent_bits).T, _gptq_plane(low, zeros, 1, exponent_bits).T,
        _gptq_plane(low, zeros, 2, exponent_bits).T, _gptq_plane(low, zeros, 3, exponent_bits).T,
        _gptq_plane(high, zeros, 0, exponent_bits).T, _gptq_plane(high, zeros, 1, exponent_bits).T,
        _gptq_plane(high, zeros, 2, exponent_bits).T, _gptq_plane(high, zeros, 3, exponent_bits).T)
    return planes_t.T, scales


# Inline assembly does not run under the Triton interpreter: `_nibble_pairs` computes the same bits there.
_INTERPRETING: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_NIBBLE_PAIRS_ASM = """{{
    .reg .b32 u, t0, t1, t2, t3;
    shr.u32 u, $8, 4;
    prmt.b32 t0, $8, u, 0x4400;
    prmt.b32 t1, $8, u, 0x5511;
    prmt.b32 t2, $8, u, 0x6622;
    prmt.b32 t3, $8, u, 0x7733;
    lop3.b32 t0, t0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 t1, t1, 0x000F000F, {magic}, 0xEA;
    lop3.b32 t2, t2, 0x000F000F, {magic}, 0xEA;
    lop3.b32 t3, t3, 0x000F000F, {magic}, 0xEA;
    add.rn.{type} t0, t0, $9;
    add.rn.{type} t1, t1, $9;
    add.rn.{type} t2, t2, $9;
    add.rn.{type} t3, t3, $9;
{mul}    mov.b32 {{$0, $1}}, t0;
    mov.b32 {{$2, $3}}, t1;
    mov.b32 {{$4, $5}}, t2;
    mov.b32 {{$6, $7}}, t3;
}}"""
_SCALE_F16_ASM = "".join(f"    mul.rn.f16x2 t{i}, t{i}, $10;\n" for i in range(4))
# bf16: the fp16 scale s is s_hi + s_lo in bf16 ($10, $11; s_lo has at most 3 significant bits, so d * s_lo is
# exact for |d| <= 16), and fma(d, s_hi, d * s_lo) rounds d * s once, as the reference's fp32 product does.
_SCALE_BF16_ASM = "".join(f"    mul.rn.bf16x2 u, t{i}, $11;\n    fma.rn.bf16x2 t{i}, t{i}, $10, u;\n" for i in range(4))


def _nibble_pairs_asm(magic: int, type_: str, scale: str) -> tl.constexpr:
    return tl.constexpr(_NIBBLE_PAIRS_ASM.format(magic=f"0x{magic * 0x10001:08X}", type=type_, mul=scale))


_NIBBLE_PAIRS_BF16: tl.constexpr = _nibble_pairs_asm(0x4300, "bf16x2", _SCALE_BF16_ASM)
_NIBBLE_PAIRS_F16: tl.constexpr = _nibble_pairs_asm(0x6400, "f16x2", _SCALE_F16_ASM)
_NIBBLE_DIFFS_BF16: tl.constexpr = _nibble_pairs_asm(0x4300, "bf16x2", "")  # q - zero: scales unread
_NIBBLE_DIFFS_F16: tl.constexpr = _nibble_pairs_asm(0x6400, "f16x2", "")


@triton.jit
def _nibble_pairs(words, zeros, scales, DTYPE: tl.constexpr, SCALED: tl.constexpr):
    """(q_p - zero) * scale (SCALED) or q_p - zero, in DTYPE (bf16 or fp16), for the 8 nibbles q_p of each word,
    as 8 tensors of words' shape; zeros int32 (0..16) and fp32 scales (exact fp16 values; unread unless
    SCALED) broadcast against words. Rounded once, as `ops.quant_ref`'s fp32 product rounded to DTYPE.

    PTX per word: u = word >> 4; per byte j, PRMT puts byte j of the word and of u at bytes 0 and 2 (nibbles
    2j and 2j + 1 at bits 0..3 and 16..19); LOP3 keeps those bits and ORs MAGIC's (128.0 in bf16, 1024.0 in
    fp16: an ulp of 1), two MAGIC + q exactly; a packed add of -(MAGIC + zero) leaves q - zero exactly; then
    fp16 one packed multiply by the scale, bf16 a multiply by s_lo and an FMA with s_hi (see _SCALE_BF16_ASM).
    17 (fp16), 21 (bf16) or 13 (unscaled) instructions for 8 weights."""
    BF16: tl.constexpr = DTYPE == tl.bfloat16
    MAGIC: tl.constexpr = 0x4300 if BF16 else 0x6400
    if _INTERPRETING:  # the reference's formula, which the assembly matches bit for bit
        if not SCALED:
            scales = 1.0
        p0 = ((((words >> 0) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        p1 = ((((words >> 4) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        p2 = ((((words >> 8) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        p3 = ((((words >> 12) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        p4 = ((((words >> 16) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        p5 = ((((words >> 20) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        p6 = ((((words >> 24) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        p7 = ((((words >> 28) & 0xF) - zeros).to(tl.float32) * scales).to(DTYPE)
        return p0, p1, p2, p3, p4, p5, p6, p7
    neg_zero_pairs = (zeros + (MAGIC | 0x8000)) * 0x10001  # -(MAGIC + zero) in both halves
    if SCALED:
        s_hi = scales.to(DTYPE)
        hi_pairs = (s_hi.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
        if BF16:
            s_lo = (scales - s_hi.to(tl.float32)).to(tl.bfloat16)  # exact
            lo_pairs = (s_lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
            return tl.inline_asm_elementwise(_NIBBLE_PAIRS_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r",
                                             [words, neg_zero_pairs, hi_pairs, lo_pairs], (tl.bfloat16,) * 8, True, 1)
        else:
            return tl.inline_asm_elementwise(_NIBBLE_PAIRS_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
                                             [words, neg_zero_pairs, hi_pairs], (tl.float16,) * 8, True, 1)
    elif BF16:
        return tl.inline_asm_elementwise(_NIBBLE_DIFFS_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r",
                                         [words, neg_zero_pairs], (tl.bfloat16,) * 8, True, 1)
    else:
        return tl.inline_asm_elementwise(_NIBBLE_DIFFS_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r",
                                         [words, neg_zero_pairs], (tl.float16,) * 8, True, 1)


@triton.jit
def _gptq_tile_16bit(w_ptr, zeros_ptr, scales_ptr, k0, n0, N, K, stride_w, group, ZERO_OFFSET: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     DTYPE: tl.constexpr, SCALED: tl.constexpr, AS_B: tl.constexpr):
    """GPTQ's tile of inputs k0.. (one group, no act-order), outputs n0.., in x's 16-bit DTYPE: (tile, scales).
    The tile is W [BLOCK_K, BLOCK_N] (AS_B) or W^T [BLOCK_N, BLOCK_K], (q - zero) * scale (SCALED; scales is
    then 1) or q - zero (exact; scales [BLOCK_N] fp32 for the dot's result). Each word's 8 inputs end
    consecutive in one thread (W^T's rows, or W's columns: K-major shared memory for the B operand, one 16-byte
    store a word)."""
    rr = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    if AS_B:  # several columns a thread (16-byte loads): Triton then picks K-major shared memory for the tile
        rn = n0 + tl.arange(0, BLOCK_N)
    else:  # one column a thread: its zero and scale serve all its words
        rn = tl.max_contiguous(n0 + tl.arange(0, BLOCK_N), 1)
    r_mask = _below(rr, K // 8, EVEN_K)
    n_mask = _below(rn, N, EVEN_N)
    words = tl.load(w_ptr + rr[:, None] * stride_w + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
    zero_words = tl.load(zeros_ptr + group * (N // 8) + rn // 8, mask=n_mask, other=0)
    zeros = ((zero_words >> ((rn % 8) * 4)) & 0xF) + ZERO_OFFSET  # 0..16
    scales = tl.load(scales_ptr + group * N + rn, mask=n_mask, other=0.0).to(tl.float32)
    p0, p1, p2, p3, p4, p5, p6, p7 = _nibble_pairs(words, zeros[None, :], scales[None, :], DTYPE, SCALED)
    if SCALED:
        scales = 1.0
    wt = _interleave8(p0.T, p1.T, p2.T, p3.T, p4.T, p5.T, p6.T, p7.T)  # W^T [BLOCK_N, BLOCK_K]
    if AS_B:
        wt = wt.T
    if not _INTERPRETING:
        # An opaque copy (ptxas drops it): without it Triton 3.9's OptimizeDotOperands moves the dot operand's
        # shared-memory store above the interleave and fails ("Illegal shared layout").
        wt = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [wt], wt.dtype, True, 2)
    return wt, scales


@triton.jit
def _int8_tile(w_ptr, rk, k_mask, n0, N, stride_w, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """W's int8 tile [BLOCK_K, BLOCK_N] (from weight [N, K]) as fp32, and 1 (its scales apply after the
    K loop). A plain conversion: at a byte per weight the loads bound int8 before the conversions do."""
    rn = n0 + tl.arange(0, BLOCK_N)
    n_mask = _below(rn, N, EVEN_N)
    w = tl.load(w_ptr + rn[None, :] * stride_w + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
    return w.to(tl.float32), 1.0


@triton.jit(do_not_specialize=["M"])  # the rows change from step to step: one compile per tile, not three
def _quant_matmul_kernel(
    x_ptr, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_w, group_size, k_per_split, split, exponent_bits,
    FORMAT: tl.constexpr, ZERO_OFFSET: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PACKED: tl.constexpr = False, W_AS_B: tl.constexpr = False,
):
    # Grouped order: programs that run together share W tiles (GROUP_M row tiles per W column tile).
    GROUP_M: tl.constexpr = 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows
    n0 = pid_n * BLOCK_N
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = _below(rn, N, EVEN_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    inv_group = 1.0 / group_size.to(tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = _below(rk, k_end, EVEN_K)
        # k0 // group_size, the whole tile's group (not read with act-order). In fp32, a few instructions against
        # the integer division's ~25: k0 + 0.5 keeps half an input from either group boundary, more than the
        # reciprocal's and the product's rounding (a few ulps of k0 / group_size) for K < 2^21.
        group = ((k0 + 0.5) * inv_group).to(tl.int32)
        # w: q - zero (exact small integers; int8: the weight), with its columns' scales, or 1 where
        # they are applied elsewhere (act-order: in w; int8: after the loop).
        if FORMAT == AWQ:
            w, scales = _awq_tile(w_ptr, zeros_ptr, scales_ptr, rk, k_mask, n0, N, stride_w, group, exponent_bits,
                                  EVEN_N, BLOCK_N)
        elif FORMAT == GPTQ and PACKED:  # no act-order, 16-bit x: w in x's dtype (W^T unless W_AS_B)
            w, scales = _gptq_tile_16bit(w_ptr, zeros_ptr, scales_ptr, k0, n0, N, K, stride_w, group, ZERO_OFFSET,
                                         EVEN_K, EVEN_N, BLOCK_K, BLOCK_N, x_ptr.dtype.element_ty,
                                         W_AS_B or BLOCK_M >= BLOCK_K, W_AS_B)
        elif FORMAT == GPTQ:
            w, scales = _gptq_tile(w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, k0, n0, N, K, stride_w, group,
                                   exponent_bits, ZERO_OFFSET, ACT_ORDER, EVEN_K, EVEN_N, BLOCK_K, BLOCK_N)
        else:
            w, scales = _int8_tile(w_ptr, rk, k_mask, n0, N, stride_w, EVEN_N, BLOCK_N)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + pid_m * stride_xm + rk, mask=k_mask, other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None] * w, axis=0)[None, :] * scales
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            if PACKED and W_AS_B:  # x the A operand (from shared memory), W's scaled tile the B operand
                acc = tl.dot(x, w, acc)
            elif PACKED and BLOCK_M < BLOCK_K:  # w: (q - zero)^T
                acc += tl.dot(w, x.T).T * scales
            elif PACKED:  # w: ((q - zero) * scale)^T
                acc = tl.dot(w, x.T, acc.T).T
            elif BLOCK_M < BLOCK_K:  # scale the smaller [BLOCK_M, BLOCK_N] product; q - zero is exact in x's dtype
                acc += tl.dot(w.to(x.dtype).T, x.T).T * scales
            else:
                acc = tl.dot((w * scales).to(x.dtype).T, x.T, acc.T).T

    _finish(acc, rm, rn, m_mask, n_mask, pid_k, pid_m * num_n + pid_n, M, N, split, partial_ptr, counter_ptr,
            scales_ptr, bias_ptr, out_ptr, FORMAT, HAS_BIAS, SPLIT_K)


@triton.jit
def _planar_kernel(
    x_ptr, w_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_w, group_size, k_per_split, split, exponent_bits,
    ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, WIDE: tl.constexpr = False, TILE_GROUPS: tl.constexpr = False,
    WIDE2: tl.constexpr = False, PIECE_R: tl.constexpr = 8,
):
    """One or two rows (M <= BLOCK_M <= 2) times a GPTQ-layout weight (no act-order), on the FMA units.

    Nibble p of word row r is input 8r + p, so the 8 nibble planes of a [BLOCK_K / 8, BLOCK_N] tile of
    words are multiplied by x's inputs 8r + p (x is read strided, 8 small loads a tile) and never
    interleaved: per weight one LOP3 (the nibble in place, OR-ed with 2^23's exponent bits), one
    subtraction ((q - zero) * 16^pos exactly: the zero comes as 2^23 + zero * 16^pos) and one FMA per
    row with x * 16^-pos. Each row keeps its own 2-D sum [BLOCK_K / 8, BLOCK_N] through the K loop
    (each K-tile's times its group's scales), reduced over the word rows once, at the end: a 3-D
    [rows, BLOCK_K / 8, BLOCK_N] sum measured twice as slow at 2 rows (2026-11-26, H100).

    Compiled for sm_90 with 64 columns and 2 warps, each thread owns one column of 16 word rows, so each
    x value it loads (a 2-byte load), converts and scales serves one weight: 8.2 instructions per weight
    in the K loop at one row, 16.6 at two (255 registers and spills): that form is the "planar-narrow"
    table now. WIDE (tiles.wide, the "session6" table) takes `_planar_wide_tile` instead: 4.4 and 5.8;
    WIDE2 (tiles.wide2, the default) `_planar_wide2_tile`: 4.2 and 5.4 at 2 warps, its sums [PIECE_R,
    BLOCK_N]; TILE_GROUPS: the K-tile is one whole group (no integer division for its index)."""
    BLOCK_R: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    if WIDE:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # contiguous: several columns a thread (see _planar_wide_tile)
    else:
        rn = tl.max_contiguous(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), 1)  # one column per thread
    n_mask = _below(rn, N, EVEN_N)
    ACC_R: tl.constexpr = PIECE_R if WIDE2 else BLOCK_R
    acc0 = tl.zeros((ACC_R, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((ACC_R, BLOCK_N), dtype=tl.float32)  # row 1 (BLOCK_M = 2)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if WIDE2:
            tile0, tile1, scales = _planar_wide2_tile(
                x_ptr, w_ptr, zeros_ptr, scales_ptr, k0, k_end, rn, n_mask, M, N, stride_xm, stride_w, group_size,
                exponent_bits, ZERO_OFFSET, EVEN_K, TILE_GROUPS, BLOCK_M, BLOCK_R, PIECE_R)
        elif WIDE:
            tile0, tile1, scales = _planar_wide_tile(
                x_ptr, w_ptr, zeros_ptr, scales_ptr, k0, k_end, rn, n_mask, M, N, stride_xm, stride_w, group_size,
                exponent_bits, ZERO_OFFSET, EVEN_K, TILE_GROUPS, BLOCK_M, BLOCK_R)
        else:
            tile0, tile1, scales = _planar_tile(
                x_ptr, w_ptr, zeros_ptr, scales_ptr, k0, k_end, rn, n_mask, M, N, stride_xm, stride_w, group_size,
                exponent_bits, ZERO_OFFSET, EVEN_K, BLOCK_M, BLOCK_R)
        acc0 += tile0 * scales
        if BLOCK_M > 1:
            acc1 += tile1 * scales
    if BLOCK_M > 1:
        sums = tl.trans(tl.join(tl.sum(acc0, axis=0), tl.sum(acc1, axis=0)))  # [2, BLOCK_N]
    else:
        sums = tl.sum(acc0, axis=0)[None, :]
    _finish(sums, rm, rn, rm < M, n_mask, pid_k, pid_n, M, N, split, partial_ptr, counter_ptr,
            scales_ptr, bias_ptr, out_ptr, GPTQ, HAS_BIAS, SPLIT_K)


@triton.jit
def _planar_tile(x_ptr, w_ptr, zeros_ptr, scales_ptr, k0, k_end, rn, n_mask, M, N, stride_xm, stride_w, group_size,
                 exponent_bits, ZERO_OFFSET: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """`_planar_kernel`'s K-tile: (row 0's, row 1's unscaled [BLOCK_R, BLOCK_N] sums, scales)."""
    rr = k0 // 8 + tl.arange(0, BLOCK_R)
    r_mask = _below(rr, k_end // 8, EVEN_K)
    words = tl.load(w_ptr + rr[:, None] * stride_w + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
    zeros, scales = _gptq_zeros_and_scales(zeros_ptr, scales_ptr, k0 // group_size, rn, n_mask, N, ZERO_OFFSET)
    x0 = x_ptr + rr * 8  # input 8r of row 0; + p for plane p
    x1_mask = r_mask & (tl.full((BLOCK_R,), 1, tl.int32) < M)  # a second row, if there is one
    high = words >> 16
    tile0 = tl.zeros(words.shape, dtype=tl.float32)
    tile1 = tl.zeros(words.shape, dtype=tl.float32)
    for p in tl.static_range(8):
        half = words if p < 4 else high
        shifted_zero = zeros * (1 << (4 * (p % 4))) + _FLOAT_2_23  # 2^23 + zero * 16^pos
        plane = ((half & (0xF << (4 * (p % 4)))) | exponent_bits).to(tl.float32, bitcast=True) - shifted_zero[None, :]
        unshift = 1.0 / (1 << (4 * (p % 4)))
        tile0 += (tl.load(x0 + p, mask=r_mask, other=0.0).to(tl.float32) * unshift)[:, None] * plane
        if BLOCK_M > 1:
            x1 = tl.load(x0 + stride_xm + p, mask=x1_mask, other=0.0).to(tl.float32)
            tile1 += (x1 * unshift)[:, None] * plane
    return tile0, tile1, scales[None, :]


@triton.jit
def _planar_wide_tile(x_ptr, w_ptr, zeros_ptr, scales_ptr, k0, k_end, rn, n_mask, M, N, stride_xm, stride_w,
                      group_size, exponent_bits, ZERO_OFFSET: tl.constexpr, EVEN_K: tl.constexpr,
                      TILE_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """`_planar_kernel`'s K-tile with WIDE: (row 0's, row 1's unscaled [BLOCK_R, BLOCK_N] sums, scales).

    The same planes as `_planar_tile`, fewer instructions per weight (sm_90 SASS of the K loop, 64 x 128
    tiles, 2 warps: 4.4 / 5.8 per weight at 1 / 2 rows against 8.2 / 16.6):
    - 8 consecutive columns a thread (words layout sizePerThread [1, 8], threadsPerWarp [4, 8]: 2 word
      rows each), not 1, so each x value a thread loads and converts serves 8 weights, not 1. Triton
      vectorizes as the widest load of the tile's shape allows: the scales, read here as [BLOCK_R,
      BLOCK_N] (16 bytes a thread; every row the same), set 8 columns (4 byte words alone would set 4).
    - x is not scaled by 16^-pos: a nibble at bits s..s+3 (s <= 19, `high` holds nibbles 5..7 at bits
      8..19), masked in place and OR-ed with the exponent bits of 2^(23 - s), is the float
      2^(23 - s) + q exactly; the zero, placed the same way, 2^(23 - s) + zero; their difference q - zero
      (exact, as the default form's). Per weight: one LOP3, one FADD, one FFMA per row.
    - 16-bit x is read 4 inputs (8 bytes) at a time (`_x_plane`), which Triton pipelines with cp.async.
    - Row 1 of a one-row call reads row 0 again (its sums are never stored): no masks on x.
    Left over: the 5 zero vectors (one per s) reach the words' layout through shared memory, 5 layout
    conversions (10 barriers) a K-tile, and the scales are converted to fp32 once per word, not per column."""
    rr = k0 // 8 + tl.arange(0, BLOCK_R)
    r_mask = _below(rr, k_end // 8, EVEN_K)
    words = tl.load(w_ptr + rr[:, None] * stride_w + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
    if TILE_GROUPS:  # group_size is BLOCK_K: no integer division
        group = k0 // (BLOCK_R * 8)
    else:
        group = k0 // group_size
    zero_words = tl.load(zeros_ptr + group * (N // 8) + rn // 8, mask=n_mask, other=0)
    zeros = (((zero_words >> ((rn % 8) * 4)) & 0xF) + ZERO_OFFSET)[None, :]
    # The scales as [BLOCK_R, BLOCK_N] (every row the same), in the words' layout: 16 bytes (8 columns) a thread
    rn2 = rn[None, :] + 0 * rr[:, None]
    scales = tl.load(scales_ptr + group * N + rn2, mask=n_mask[None, :], other=0.0).to(tl.float32)
    # Row 1 is row 0 again when M = 1 (its sums are not stored): no masks
    x1_ptr = x_ptr + tl.minimum(M - 1, 1) * stride_xm
    high = words >> 12  # nibbles 5..7 to bits 8..19 (nibbles 0..4 are read in place, bits 0..19)
    tile0 = tl.zeros(words.shape, dtype=tl.float32)
    tile1 = tl.zeros(words.shape, dtype=tl.float32)
    for p in tl.static_range(8):
        half = words if p < 5 else high
        shift = 4 * p - 12 * (p // 5)  # the nibble's bits in `half`: shift..shift + 3 (<= 19)
        # 2^(23 - shift): exponent bits 2^23's less shift (exponent_bits is a register: the mask stays LOP3's
        # one immediate)
        plane_bits = (half & (0xF << shift)) | (exponent_bits - (shift << 23))
        zero_bits = (zeros << shift) | (exponent_bits - (shift << 23))  # 2^(23 - shift) + zero
        plane = plane_bits.to(tl.float32, bitcast=True) - zero_bits.to(tl.float32, bitcast=True)
        tile0 += _x_plane(x_ptr, rr, r_mask, p)[:, None] * plane
        if BLOCK_M > 1:
            tile1 += _x_plane(x1_ptr, rr, r_mask, p)[:, None] * plane
    return tile0, tile1, scales


@triton.jit
def _planar_wide2_tile(x_ptr, w_ptr, zeros_ptr, scales_ptr, k0, k_end, rn, n_mask, M, N, stride_xm, stride_w,
                       group_size, exponent_bits, ZERO_OFFSET: tl.constexpr, EVEN_K: tl.constexpr,
                       TILE_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                       PIECE_R: tl.constexpr):
    """`_planar_kernel`'s K-tile with WIDE2: (row 0's, row 1's unscaled [PIECE_R, BLOCK_N] sums, scales).

    `_planar_wide_tile`'s planes and exactness (a nibble at bits s..s+3 OR-ed with 2^(23 - s)'s exponent
    bits is 2^(23 - s) + q, the zero built alike, their difference q - zero exactly), with less around
    them (sm_90 SASS of the K loop, 64 x 128 tiles, 2 warps, bf16 x: 532 / 689 instructions a K-tile
    at 1 / 2 rows, 4.16 / 5.38 a weight, against WIDE's 569 / 737, 4.45 / 5.76):
    - The tile's BLOCK_R word rows are read as BLOCK_R / PIECE_R pieces of PIECE_R rows (the host picks
      PIECE_R so that a piece is one word row a thread, 8 columns each) and every piece's products go
      into one [PIECE_R, BLOCK_N] sum: a thread's rows are summed in its FMA chain, so the scales (read
      as [PIECE_R, BLOCK_N], 16 bytes a thread) are converted and applied once per column a thread,
      not once per word.
    - Nibbles 0..3 in place, 4..7 from `words >> 16` (one shift a word, as before): every plane sits at
      bits 0, 4, 8 or 12, so 4 zero vectors (not 5). They are made one column a thread, joined and moved
      to the words' layout together (two shared-memory round trips as Triton lowers it, 3 barriers)
      where WIDE moved five apart (10 barriers). The sum over a size-1 axis keeps Triton from moving the
      conversion back to the zero words (it would convert them once and rebuild the 4 vectors 8 columns
      a thread: 24 more FADDs); without the join it converts the 4 vectors one by one.
    - The shift amount 16 is computed from `exponent_bits` (a register): with a constant, LLVM turns
      `(words >> 16) & 15` into a bit-field extract of its own (2 instructions a word more).
    - 16-bit x: a piece's 8 inputs a row are one 16-byte read ([PIECE_R, 2] int64), not two of 8.
    - Group and first word row by unsigned shifts, loads at a per-tile base pointer plus loop-invariant
      offsets (fewer address instructions).
    Left: per weight the LOP3, FADD and FFMA a row; per word the shift; per input and row one
    instruction converting bf16 x; per K-tile about 115 instructions of addresses, cp.async, stage
    indices, the zeros' conversion and the scales (0.9 a weight at 128 weights a thread; one warp a
    program, as the default tiles run it, spreads them over 256: 3.85 / 5.09 a weight)."""
    ku = tl.cast(k0, tl.uint32)  # k0 >= 0: unsigned division is a shift
    if TILE_GROUPS:
        group = (ku // (BLOCK_R * 8)).to(tl.int32)
    else:
        group = k0 // group_size
    row0 = (ku // 8).to(tl.int32)  # the K-tile's first word row
    # The 4 zero vectors 2^(23 - s) + zero (s = 0, 4, 8, 12), one column a thread, then together to the words' layout
    zero_words = tl.load(zeros_ptr + group * (N // 8) + rn // 8, mask=n_mask, other=0)
    z0 = ((((zero_words >> ((rn % 8) * 4)) & 0xF) + ZERO_OFFSET) | exponent_bits).to(tl.float32, bitcast=True)
    z4 = z0 + (_FLOAT_2_23 / 16 - _FLOAT_2_23)  # exact: every value here is an integer below 2^24
    z8 = z0 + (_FLOAT_2_23 / 256 - _FLOAT_2_23)
    z12 = z0 + (_FLOAT_2_23 / 4096 - _FLOAT_2_23)
    zeros = tl.sum(tl.join(tl.join(z0, z8), tl.join(z4, z12))[:, :, :, None], axis=3)  # [BLOCK_N, 2, 2]
    zeros_even, zeros_odd = tl.split(zeros)
    zero0, zero8 = tl.split(zeros_even)
    zero4, zero12 = tl.split(zeros_odd)
    rp = tl.arange(0, PIECE_R)
    # The scales as [PIECE_R, BLOCK_N] (every row the same): 16 bytes (8 columns) a thread
    scales = tl.load((scales_ptr + group * N) + (rn[None, :] + 0 * rp[:, None]), mask=n_mask[None, :],
                     other=0.0).to(tl.float32)
    w_tile = w_ptr + row0 * stride_w
    x0_tile = x_ptr + k0
    x1_tile = x_ptr + tl.minimum(M - 1, 1) * stride_xm + k0  # row 0 again when M = 1 (its sums are not stored)
    tile0 = tl.zeros(scales.shape, dtype=tl.float32)
    tile1 = tl.zeros(scales.shape, dtype=tl.float32)
    sixteen = (exponent_bits >> 23) - 134  # 16, opaque to LLVM (see above)
    for piece in tl.static_range(BLOCK_R // PIECE_R):
        rr = piece * PIECE_R + rp  # word rows in the tile
        r_mask = _below(row0 + rr, k_end // 8, EVEN_K)
        words = tl.load(w_tile + (rr[:, None] * stride_w + rn[None, :]), mask=r_mask[:, None] & n_mask[None, :],
                        other=0)
        high = words >> sixteen  # nibbles 4..7 to bits 0..15
        x0 = _x_quads(x0_tile, rr, r_mask)
        x1 = _x_quads(x1_tile, rr, r_mask)
        for p in tl.static_range(8):
            half = words if p < 4 else high
            shift = 4 * (p % 4)
            if shift == 0:
                zero = zero0
            elif shift == 4:
                zero = zero4
            elif shift == 8:
                zero = zero8
            else:
                zero = zero12
            plane = (((half & (0xF << shift)) | (exponent_bits - (shift << 23))).to(tl.float32, bitcast=True)
                     - zero[None, :])
            tile0 += _x_quad_plane(x0, x0_tile, rr, r_mask, p)[:, None] * plane
            if BLOCK_M > 1:
                tile1 += _x_quad_plane(x1, x1_tile, rr, r_mask, p)[:, None] * plane
    return tile0, tile1, scales


@triton.jit
def _x_quads(x_ptr, rr, r_mask):
    """16-bit x: inputs 8 rr .. 8 rr + 7 as [R, 2] int64 (one 16-byte read a row); other x: nothing (each
    plane's inputs are read by `_x_quad_plane`)."""
    if x_ptr.dtype.element_ty.primitive_bitwidth == 16:
        q = tl.arange(0, 2)
        return tl.load(x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + (rr[:, None] * 2 + q[None, :]),
                       mask=r_mask[:, None], other=0)
    else:
        return rr


@triton.jit
def _x_of_pair(pair, x_ptr, P: tl.constexpr):
    """Input P % 2 of `pair` (int32: two of x's 16-bit inputs, the even one low) as fp32."""
    if x_ptr.dtype.element_ty == tl.bfloat16:  # bf16 is fp32's upper half
        if P % 2 == 0:
            return (pair << 16).to(tl.float32, bitcast=True)
        else:
            return (pair & -65536).to(tl.float32, bitcast=True)
    else:
        return (pair >> (16 * (P % 2))).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)


@triton.jit
def _x_quad_plane(quads, x_ptr, rr, r_mask, P: tl.constexpr):
    """x's inputs 8 rr + P as fp32: from `_x_quads`' [R, 2] int64 (16-bit x, one instruction an input) or
    read here (fp32 x)."""
    if x_ptr.dtype.element_ty.primitive_bitwidth == 16:
        quad0, quad1 = tl.split(quads)
        pair = ((quad0 if P < 4 else quad1) >> (32 * ((P // 2) % 2))).to(tl.int32)
        return _x_of_pair(pair, x_ptr, P)
    else:
        return tl.load(x_ptr + rr * 8 + P, mask=r_mask, other=0.0).to(tl.float32)


@triton.jit
def _x_plane(x_ptr, rr, r_mask, P: tl.constexpr):
    """x's inputs 8 rr + P as fp32. 16-bit x (8-byte aligned rows): inputs 8r..8r+3 and 8r+4..8r+7 are
    read as two int64 (the loads of planes sharing one are merged) and split, one instruction an input."""
    if x_ptr.dtype.element_ty.primitive_bitwidth == 16:
        quad = tl.load(x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + rr * 2 + P // 4, mask=r_mask, other=0)
        pair = (quad >> (32 * ((P // 2) % 2))).to(tl.int32)
        return _x_of_pair(pair, x_ptr, P)
    else:
        return tl.load(x_ptr + rr * 8 + P, mask=r_mask, other=0.0).to(tl.float32)


@triton.jit
def _finish(acc, rm, rn, m_mask, n_mask, pid_k, tile, M, N, split, partial_ptr, counter_ptr, scales_ptr, bias_ptr,
            out_ptr, FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write a program's [BLOCK_M, BLOCK_N] sum: the output tile, or with split-K its K range's partial,
    the tile's last program to arrive summing all of them into the output."""
    tile_offsets = rm[:, None] * N + rn[None, :]
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K:
        tl.store(partial_ptr + pid_k * M * N + tile_offsets, acc, mask=mn_mask)
        tl.debug_barrier()  # every thread's partial is stored before the counter says so
        counter = counter_ptr + tile
        if tl.atomic_add(counter, 1, sem="acq_rel") == split - 1:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            # In order, so that the sum does not depend on which program came last; decode's small
            # partials 8 loads at a time. ".cg": read at L2, where the other SMs' stores are.
            PARTIALS_IN_FLIGHT: tl.constexpr = 8 if acc.shape[0] * acc.shape[1] <= 4096 else 1
            for i in tl.range(split, loop_unroll_factor=PARTIALS_IN_FLIGHT):
                acc += tl.load(partial_ptr + i * M * N + tile_offsets, mask=mn_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA-graph replays included)
            _store_output(acc, scales_ptr, bias_ptr, out_ptr, rn, tile_offsets, mn_mask, n_mask, FORMAT, HAS_BIAS)
    else:
        _store_output(acc, scales_ptr, bias_ptr, out_ptr, rn, tile_offsets, mn_mask, n_mask, FORMAT, HAS_BIAS)


@triton.jit
def _store_output(acc, scales_ptr, bias_ptr, out_ptr, rn, tile_offsets, mn_mask, n_mask,
                  FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out's tile = acc (times int8's per-output scales, plus the bias) in out's dtype."""
    if FORMAT == INT8:
        acc *= tl.load(scales_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile_offsets, acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ AWQ weight (qweight [K, N/8]) -> [..., N] in x's dtype (into `out` if given)."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    return _quant_matmul(x, qweight, qzeros, scales, None, N, K, AWQ, group_size, 0, bias, out)


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, group_size: int, act_order: bool, zeros_minus_one: bool = True,
                bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ GPTQ weight (qweight [K/8, N]) -> [..., N] in x's dtype (into `out` if given).

    `group_size` -1 is one group over all K inputs. Without `act_order`, input k's group must be
    k // group_size (g_idx is then not read); with it, g_idx [K] names each input's group.
    `zeros_minus_one` for the v1 ("gptq") format.
    """
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    group_size = K if group_size == -1 else group_size
    return _quant_matmul(x, qweight, qzeros, scales, g_idx if act_order else None, N, K, GPTQ, group_size,
                         int(zeros_minus_one), bias, out)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (int8 weight [N, K] * scale [N]).T -> [..., N] in x's dtype (into `out` if given).
    One or two rows go through the dense GEMV (ops.triton_gemv, which takes int8 weights and their
    scales): an 8B layer's four matmuls in 88 us against 112 through the tiles here (H100, session 9)."""
    N, K = weight.shape
    if x.shape[-1] == K and 0 < x.numel() // K <= 2:
        from ops.triton_gemv import gemv  # (it imports this module)

        return gemv(x, weight, bias, scales=scale, out=out)
    return _quant_matmul(x, weight, None, scale, None, N, K, INT8, K, 0, bias, out)


def _quant_matmul(x: torch.Tensor, weight: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor,
                  g_idx: torch.Tensor | None, N: int, K: int, fmt: int, group_size: int,
                  zero_offset: int, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, N)
    if M == 0:
        return out
    planar_ok = fmt == GPTQ and g_idx is None
    if planar_ok and x2.element_size() == 2 and 0 < DEQUANT_GEMM_ROWS <= M:
        torch.matmul(x2, dequantize_gptq(weight, zeros, scales, group_size, zero_offset, x2.dtype), out=out2)
        if bias is not None:
            out2 += bias
        return out
    if planar_ok and 0 < GLUON_GEMM_ROWS <= M:
        gluon = importlib.import_module("ops.gluon_quant")
        if gluon.supports(x2, weight, zeros, scales, group_size):
            gluon.gluon_gptq_matmul(x2, weight, zeros, scales, group_size, zero_offset, bias, out2)
            return out
    tiles = tiles_for(M, planar_ok, packed_ok=planar_ok and x2.element_size() == 2)
    block_k = tiles.block_k
    if g_idx is None and group_size < K:
        block_k = min(block_k, group_size)  # one group per K-tile (group sizes are powers of two >= 32)
    num_tiles = triton.cdiv(M, tiles.block_m) * triton.cdiv(N, tiles.block_n)
    split = _split_k(num_tiles, K, block_k, tiles.programs_per_sm, x.device, tiles.max_split)
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    partial = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out2
    counters = _split_k_counters(x.device) if split > 1 else out2
    common = dict(HAS_BIAS=bias is not None, SPLIT_K=split > 1, EVEN_K=K % block_k == 0,
                  EVEN_N=N % tiles.block_n == 0, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k,
                  NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    bias_or_any = bias if bias is not None else scales
    if tiles.planar:
        wide = dict(WIDE=True, TILE_GROUPS=block_k == group_size) if tiles.wide else {}
        if tiles.wide2:  # a piece of the K-tile: one word row a thread, 8 columns each
            wide.update(WIDE2=True, PIECE_R=max(1, min(block_k // 8, 32 * tiles.num_warps * 8 // tiles.block_n)))
        if tiles.wide and x2.element_size() == 2 and (x2.data_ptr() % 8 or x2.stride(0) % 4):
            x2 = x2.clone()  # WIDE reads 16-bit x 4 inputs (8 aligned bytes) at a time
        _planar_kernel[(num_tiles, split)](
            x2, weight, zeros, scales, bias_or_any, out2, partial, counters,
            M, N, K, x2.stride(0), weight.stride(0), group_size, k_per_split, split, FLOAT_2_23_BITS,
            ZERO_OFFSET=zero_offset, **wide, **common,
        )
        return out
    packed = tiles.packed  # GPTQ's layout, 16-bit x (tiles_for)
    _quant_matmul_kernel[(num_tiles, split)](
        x2, weight, zeros if zeros is not None else scales, scales, g_idx if g_idx is not None else scales,
        bias_or_any, out2, partial, counters,
        M, N, K, x2.stride(0), weight.stride(0), group_size, k_per_split, split, FLOAT_2_23_BITS,
        FORMAT=fmt, ZERO_OFFSET=zero_offset, ACT_ORDER=g_idx is not None, **common,
        **(dict(PACKED=True, W_AS_B=tiles.w_as_b and tiles.block_m >= 64) if packed else {}),
        **(dict(maxnreg=tiles.max_registers) if packed and tiles.max_registers else {}),
    )
    return out


def tiles_for(M: int, planar_ok: bool = False, packed_ok: bool = False) -> Tiles:
    """The launch configuration for a batch of M rows (from `TILES`): the first entry whose batch bound M is
    within, planar entries only if `planar_ok`, packed ones only if `packed_ok`."""
    table = [(max_m, tiles) for max_m, tiles in TILES
             if (planar_ok or not tiles.planar) and (packed_ok or not tiles.packed)]
    return next((tiles for max_m, tiles in table if M <= max_m), table[-1][1])


@triton.jit
def _dequant_gptq_kernel(w_ptr, zeros_ptr, scales_ptr, out_ptr, N, K, stride_w, stride_z, stride_s, group_size,
                         ZERO_OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [K, N] = float32(q - zero) * float32(scale), rounded to out's dtype (`ops.quant_ref.dequantize_gptq`, bit
    for bit): GPTQ's layout, input k nibble k % 8 of qweight[k // 8, n], output n of a zero word nibble n % 8. One
    program: BLOCK_R packed rows (8 * BLOCK_R inputs) of BLOCK_N outputs."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rr < K // 8)[:, None] & (rn < N)[None, :]
    words = tl.load(w_ptr + rr[:, None] * stride_w + rn[None, :], mask=mask, other=0)
    for p in tl.static_range(8):
        k = rr * 8 + p
        group = (k // group_size)[:, None]
        zero_words = tl.load(zeros_ptr + group * stride_z + (rn // 8)[None, :], mask=mask, other=0)
        zeros = ((zero_words >> ((rn % 8) * 4)[None, :]) & 0xF) + ZERO_OFFSET
        scales = tl.load(scales_ptr + group * stride_s + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        q = (words >> (4 * p)) & 0xF
        tl.store(out_ptr + k[:, None] * N + rn[None, :], ((q - zeros).to(tl.float32) * scales).to(out_ptr.dtype.element_ty),
                 mask=mask)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                    zero_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """GPTQ's layout without act-order (qweight [K/8, N]) -> the weight [K, N] in `dtype`, on the GPU."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty((K, N), dtype=dtype, device=qweight.device)
    block_r, block_n = 8, 128
    _dequant_gptq_kernel[(triton.cdiv(K // 8, block_r), triton.cdiv(N, block_n))](
        qweight, qzeros, scales, out, N, K, qweight.stride(0), qzeros.stride(0), scales.stride(0), group_size,
        ZERO_OFFSET=zero_offset, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)
    return out


@triton.jit
def _dequant_swapab_kernel(w_ptr, zeros_ptr, scales_ptr, out_ptr, N, stride_z, stride_s, group_size,
                           ZERO_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [K, N] = float32(q - zero) * float32(scale) in out's dtype, from `ops.gluon_swapab.repack_swapab`'s words
    (int32 [K/64, N*8]) instead of GPTQ's. One program: a 64-deep K-tile t of BLOCK_N outputs, each element gathering
    its word (the module docstring of ops.gluon_swapab: word ((t * N/16 + n // 16) * 32 + 4 g + c) * 4 + 2 jj + r,
    nibble 4 i2 + 2 i1 + i0 for k = 64 t + 32 jj + 16 i2 + 8 i1 + 2 c + i0, n = 16 b + 8 r + g), so that the
    stores run along n. A word's 8 inputs lie in one 32-input block, hence in one group (groups >= 32)."""
    t = tl.program_id(0)
    k = tl.arange(0, 64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (n < N)[None, :]
    lane = 4 * (n % 8)[None, :] + ((k % 8) // 2)[:, None]  # 4 g + c
    word = ((t * (N // 16) + n // 16)[None, :] * 32 + lane) * 4 + (2 * (k // 32))[:, None] + ((n % 16) // 8)[None, :]
    nibble = (4 * ((k % 32) // 16) + 2 * ((k % 16) // 8) + k % 2)[:, None]
    q = (tl.load(w_ptr + word, mask=mask, other=0) >> (4 * nibble)) & 0xF
    group = ((t * 64 + k) // group_size)[:, None]
    zero_words = tl.load(zeros_ptr + group * stride_z + (n // 8)[None, :], mask=mask, other=0)
    zeros = ((zero_words >> ((n % 8) * 4)[None, :]) & 0xF) + ZERO_OFFSET
    scales = tl.load(scales_ptr + group * stride_s + n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (t * 64 + k)[:, None] * N + n[None, :],
             ((q - zeros).to(tl.float32) * scales).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_swapab(packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                      zero_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """A weight in repack_swapab's words (packed [K/64, N*8]) -> [K, N] in `dtype`, on the GPU (the large-batch path
    of engine::swapab_matmul, as `dequantize_gptq` is of the GPTQ-layout matmuls)."""
    K, N = packed.shape[0] * 64, packed.shape[1] // 8
    group_size = K if group_size == -1 else group_size
    out = torch.empty((K, N), dtype=dtype, device=packed.device)
    block_n = 128
    _dequant_swapab_kernel[(K // 64, triton.cdiv(N, block_n))](
        packed, qzeros, scales, out, N, qzeros.stride(0), scales.stride(0), group_size,
        ZERO_OFFSET=zero_offset, BLOCK_N=block_n, num_warps=4)
    return out


def _split_k(num_tiles: int, K: int, block_k: int, programs_per_sm: int, device: torch.device,
             max_split: int = 16) -> int:
    """How many K ranges (at most `max_split`) to cut each output tile's loop into, for about
    `programs_per_sm` programs per SM."""
    if num_tiles > _MAX_SPLIT_K_TILES:
        return 1
    sms = _num_sms(device.index) if device.type == "cuda" else _INTERPRETER_SMS
    return max(1, min(programs_per_sm * sms // num_tiles, triton.cdiv(K, block_k), max_split))


@functools.cache
def _num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _split_k_counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, shared by every split-K launch on `device`:
    each launch leaves them zeroed again (launches on one stream do not overlap). Made on the first
    split-K call, which should come before any CUDA-graph capture (as Triton's compilation must)."""
    return torch.zeros(_MAX_SPLIT_K_TILES, dtype=torch.int32, device=device)
