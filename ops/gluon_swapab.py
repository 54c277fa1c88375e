"""A second Gluon W4A16 GEMM for Hopper: "swap-AB", the dequantized weight as wgmma's REGISTER A operand (the
design of vLLM's Machete / Marlin), so that W never goes through shared memory.

Why (perf/notes/gluon_gemm256.md): `ops.gluon_quant` stores each dequantized W tile to shared memory, which costs
three bar.syncs and a fence.proxy.async a K-tile and ~144 KB of shared-memory traffic; on the H100 it measured
only 5% faster than the tl kernel. Here the output is computed transposed,

    y^T[BLOCK_N, BLOCK_M] = W^T[BLOCK_N, K] @ x^T[K, BLOCK_M]

so W^T is wgmma's A operand, which Hopper takes from registers (`HGMMA.64x256x16.F32.BF16 R.., R.., gdesc`):
each thread dequantizes exactly the elements of its own A fragment and hands them to the tensor cores in place.
x is the B operand, in shared memory, stored [BLOCK_M, BLOCK_K] K-contiguous (NVMMA swizzle) and given to wgmma
as a [BLOCK_K, BLOCK_M] view (`.permute((1, 0))`).

Weight format. qzeros int32 [K/group, N/8] and scales fp16 [K/group, N] are GPTQ's, untouched. qweight is
repacked once at load time (`repack_swapab`, pure torch) from GPTQ's [K/8, N] into [K/64, N*8] int32 words
ordered so that each thread reads its A fragment of a 64-deep K-tile with ONE 16-byte load (Marlin's trick):

    word index  ((t * (N / 16) + b) * 32 + lane) * 4 + 2 * jj + r       t: 64-deep K-tile, b: 16-output block
    lane = 4 * g + c (g = lane // 4, c = lane % 4: wgmma's groupID and thread-in-group)
    nibble i = 4 * i2 + 2 * i1 + i0 of that word holds q[k, n] for
        n = 16 b + 8 r + g
        k = 64 t + 32 jj + 16 i2 + 8 i1 + 2 c + i0

That is wgmma's m64nNk16 A fragment (PTX ISA "Register fragment for matrix A"): a thread holds rows g and g + 8
of its warp's 16 rows, columns 2c, 2c + 1, 2c + 8, 2c + 9 of each 16-deep step. One word = one row (so one zero
and one scale) and two 16-deep steps; its nibble pairs (2j, 2j + 1) are (k, k + 1), exactly the packed 16-bit
pair one A register holds, and the dequant routine (`ops.triton_quant._nibble_pairs_asm`) produces nibbles in
those pairs. A 32-deep K-tile (group 32) reads half of it (words jj = t % 2: one 8-byte load).

One program: a BLOCK_N (128) x BLOCK_M tile of y^T, NUM_WARPS (8) warps = 2 warpgroups of 64 outputs each
(accumulator 64 x BLOCK_M fp32 per warpgroup: BLOCK_M / 2 registers a thread, `instr_shape [16, BLOCK_M, 16]`,
i.e. wgmma's N is BLOCK_M); K-tiles of BLOCK_K = min(64, group) inputs. BLOCK_M is a constexpr picked by rows
(`block_m_for`): 64 for M <= 64, 128 for M <= 128, else 256 (a 256-wide wgmma on 77 rows would multiply 179
zero rows). Shared memory: only x, a ring of STAGES (4) [BLOCK_M, BLOCK_K] slots filled by TMA (async proxy,
completion on one mbarrier a slot; rows past M come back as zeros; the descriptor's box and the ring's NVMMA
layout follow BLOCK_M). Iteration k:

    1. mbarrier wait: x's tile k landed in slot k % STAGES
    2. issue wgmma k, async: acc += A_k (registers) @ x_k^T (shared)
    3. wgmma.wait_group 1: wgmma k - 1 done in this warpgroup (A_{k-1}'s registers free: they are the wait's
       deps, so they stay allocated until here)
    4. bar.sync (both warpgroups past 3: slot (k - 1) % STAGES is free), then one thread issues the TMA of x's
       tile k - 1 + STAGES into it (expect-tx on its mbarrier)
    5. ld.global (16 bytes a thread) W's words of tile k + 2; dequantize tile k + 1's words (loaded in iteration
       k - 1) straight into A_{k+1}: the CUDA cores' work, under wgmma k

The loop is unrolled by two with two A fragments (even / odd K-tiles): A_{k+1} takes A_{k-1}'s registers only
after step 3 retired wgmma k - 1. (Rolled, the fragment is a loop-carried value whose back-edge copy rewrote the
registers of a wgmma still in flight: undefined behaviour in PTX, and ptxas did not guard it;
perf/gluon_swapab_sass.py checks the SASS for such writes.) Hence K-tiles come in pairs: K % (2 BLOCK_K) == 0.

No generic-proxy shared-memory writes in the loop, hence no fence.proxy.async; one bar.sync a K-tile (the ring's
WAR: Gluon's mbarrier.arrive is one thread's, so a per-warpgroup "slot empty" barrier cannot be spelled here).

Dequantization is bit for bit the reference's float32 (q - zero) * scale rounded to x's dtype (the PTX of
`ops.triton_quant._nibble_pairs`). The dequantized [BLOCK_N, BLOCK_K] tile reaches wgmma's DotOperandLayout by
`join` / `reshape` / `permute` only; the final `convert_layout(..., assert_trivial=True)` fails the compile if
that is not a register renaming (no shared-memory round trip).

Output: y[m, n] = acc[n, m], transposed in registers (`permute`) and converted to a row-major blocked layout for
16-byte stores (Triton's shared-memory scratch, once a tile); rows past M masked.

Split-K (SPLIT_K constexpr; grid axis 1). There are N / 128 output tiles whatever M is when M <= BLOCK_M (70B:
qkv 80, o / down 64, gate_up 448, for 132 SMs), so cutting K is the only way to fill the GPU at small M.
`split_k_for` takes the most ranges that still run as one wave of programs over SMs x `PROGRAMS_PER_SM[BLOCK_M]`
(2 at BLOCK_M 64 / 128: <= 128 registers, from the offline compile; 1 at 256): a second wave of shorter programs
lost on the H100 (session 21); `k_ranges` makes every range a multiple of two K-tiles (the loop's pairs) and of a group's K-tiles, so
the kernel starts W's, the zeros' and the scales' pointers at its range (scalar adds before the loop; x's TMA
coordinate adds `first`) and runs the same loop from 0. 70B on 132 SMs: at <= 128 rows qkv 3 ranges, o / down 4;
at 129..256 qkv 1, o / down 2; gate_up 1. Each range's fp32 accumulator is stored to a workspace [split, tiles,
BLOCK_N * BLOCK_M] in the accumulator's register order (`_workspace_offsets`: one warp instruction writes 256
contiguous bytes, 8-byte pairs, no mask; the first form, row-major with a row mask, took 4-byte stores and ~30% of
a split o projection's time, session 22); then bar.sync and one acq_rel atomic add on the tile's counter
(`ops.triton_quant._split_k_counters`, as ops.gluon_quant). The last program to arrive reads the partials back
(".cg", L2, 16-byte loads) and sums them in range order (deterministic), in 64-row chunks (a whole running sum plus
a whole loaded partial would be 256 registers a thread at BLOCK_M 256: it spilled), adds the bias, writes y, and
zeroes the counter (CUDA-graph replays find them zeroed).

Stream-K (`_swapab_streamk_kernel`, a second kernel: `use_stream_k` picks it at BLOCK_M 256 where split-K finds
no split and whole tiles would leave more than a tenth of the last wave's SMs idle: 70B gate_up (448 tiles, 3.4
waves) and qkv (80 tiles) at 129-256 rows). One persistent program an SM: `dp_rounds` whole waves of whole tiles,
then the remaining tiles' K-tiles cut into equal ranges of `units` (`stream_k_plan`), which may start and end inside
tiles; a tile's pieces meet in the workspace as split-K's ranges do (index 2p for a program's first piece, 2p + 1
for its last). Both kernels share `_mainloop`; the x ring's mbarrier phases count from the program's running K-tile
total. On the H100 at 256 rows (session 22): gate_up 406 us against 458 without, qkv 88 against 103.

Requirements (the wrapper checks): Gluon (Triton 3.6's API), sm_90, x bf16/fp16 with K a multiple of 64 (and
of 128 when BLOCK_K is 64),
N of BLOCK_N, group a power of two >= 32 dividing K (-1: one group), no act-order. `swapab_gptq_matmul` takes
optional `split_k` (None: automatic, 1: none), `block_m` (None: by rows) and `stream_k` (None: automatic). The
engine calls it through engine::swapab_matmul / engine::dual_4bit_matmul (`ENGINE_SWAPAB_GEMM`,
engine/quantization/swapab.py); `perf/quant_bench.py --kernels gluon-swapab-gptq-g128 gluon-swapab-gptq-g128-dp
gluon-swapab-gptq-g128-s1` and `tests/test_gluon_swapab.py` call it directly.
"""

from __future__ import annotations

import os

import torch

try:  # Gluon ships with Triton >= 3.5; the Hopper pieces' names are 3.6's
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    HAVE_GLUON = True
except ImportError as _error:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False
    _IMPORT_ERROR = _error

BLOCK_M = 256
BLOCK_N = 128
STREAM_K = os.environ.get("ENGINE_SWAPAB_STREAM_K", "1") == "1"  # use_stream_k's automatic choice on (A/B switch)
MAX_BLOCK_K = 64
REPACK_K = 64  # the repacked format's K-tile
NUM_WARPS = 8
STAGES = 4


# ----------------------------------------------------------------------------------------------------------------
# The repacked weight (pure torch; CPU or GPU)

def repack_swapab(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight int32 [K/8, N] (input k of output n: nibble k % 8 of word [k // 8, n]) -> int32 [K/64, N*8]
    in the per-thread A-fragment order of the module docstring. K a multiple of 64, N of 16."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if K % REPACK_K or N % 16:
        raise ValueError(f"repack_swapab needs K % 64 == 0 and N % 16 == 0, not K={K}, N={N}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(K, N)  # q[k, n], 0..15
    # k = 64 t + 32 jj + 16 i2 + 8 i1 + 2 c + i0, n = 16 b + 8 r + g
    q = q.view(K // 64, 2, 2, 2, 4, 2, N // 16, 2, 8)  # [t, jj, i2, i1, c, i0, b, r, g]
    q = q.permute(0, 6, 8, 4, 1, 7, 2, 3, 5)  # [t, b, g, c, jj, r, i2, i1, i0]
    q = q.reshape(K // 64, N // 16, 32, 4, 8).to(torch.int64)  # lane = 4 g + c, word = 2 jj + r, nibble i
    words = (q << torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)).sum(-1)
    return words.to(torch.uint32).view(torch.int32).reshape(K // 64, N * 8).contiguous()


def unpack_swapab(packed: torch.Tensor) -> torch.Tensor:
    """The nibbles q [K, N] (int32, 0..15) of a repacked weight, read the way the kernel's threads read them
    (word index and nibble -> (k, n) by the docstring's formulas, written out independently of the repack)."""
    T, N = packed.shape[0], packed.shape[1] // 8
    idx = torch.arange(packed.numel(), device=packed.device)
    wlocal, lane, rest = idx % 4, (idx // 4) % 32, idx // 128
    b, t = rest % (N // 16), rest // (N // 16)
    jj, r, g, c = wlocal // 2, wlocal % 2, lane // 4, lane % 4
    words = packed.reshape(-1)
    q = torch.empty(T * 64, N, dtype=torch.int32, device=packed.device)
    for i in range(8):
        i2, i1, i0 = i // 4, (i // 2) % 2, i % 2
        k = 64 * t + 32 * jj + 16 * i2 + 8 * i1 + 2 * c + i0
        n = 16 * b + 8 * r + g
        q[k, n] = (words >> (4 * i)) & 0xF
    return q


# ----------------------------------------------------------------------------------------------------------------
# The kernel

if HAVE_GLUON:
    from ops.gluon_quant import _nibbles_dequantized, _scale_pairs  # the dequant both Gluon GEMMs share

    @gluon.constexpr_function
    def _acc_layout(block_m, num_warps):
        """The accumulator y^T [BLOCK_N, BLOCK_M]: wgmma's, warps along the outputs (16 each), N = BLOCK_M."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_m, 16])

    @gluon.constexpr_function
    def _out_layout(block_n, num_warps):
        """The output y [rows, BLOCK_N]: 8 outputs (16 bytes) a thread, a warp two rows."""
        return gl.BlockedLayout([1, 8], [32 // (block_n // 8), block_n // 8], [num_warps, 1], [1, 0])

    @gluon.jit
    def _check_tiles(BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        gl.static_assert(BLOCK_N == 16 * NUM_WARPS)  # a warp's 16 outputs, 4 warps a warpgroup's 64
        gl.static_assert(BLOCK_K == 32 or BLOCK_K == 64)
        gl.static_assert(STAGES >= 2)

    @gluon.jit
    def _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs, t, N, BLOCK_K: gl.constexpr, GROUP_SIZE: gl.constexpr):
        """K-tile t's words [NB, 32, WPT] (one 16- or 8-byte load a thread), and for each word its output's zero
        word and scale (group of the tile)."""
        TILES_PER_REPACK: gl.constexpr = 64 // BLOCK_K
        WPT: gl.constexpr = BLOCK_K // 16
        g = (t * BLOCK_K) // GROUP_SIZE
        words = gl.load(w_ptrs + (t // TILES_PER_REPACK) * (N * 8) + (t % TILES_PER_REPACK) * WPT)
        zero_words = gl.load(zeros_ptrs + g * (N // 8))
        scales = gl.load(scales_ptrs + g * N)
        return words, zero_words, scales

    @gluon.jit
    def _dequant_fragment(words, zero_words, zero_shift, scales, a_layout: gl.constexpr, ZERO_OFFSET: gl.constexpr,
                          DTYPE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """(q - zero) * scale in DTYPE as W^T's [BLOCK_N, BLOCK_K] tile in wgmma's A-operand layout (each thread
        its own fragment: the words it loaded are exactly its fragment's nibbles)."""
        MAGIC: gl.constexpr = 0x4300 if DTYPE == gl.bfloat16 else 0x6400
        NB: gl.constexpr = BLOCK_N // 16
        JJ: gl.constexpr = BLOCK_K // 32
        zeros = ((zero_words >> zero_shift) & 0xF) + ZERO_OFFSET  # 0..16
        neg_zero_pairs = (zeros + (MAGIC | 0x8000)) * 0x10001  # -(MAGIC + zero), both halves
        hi_pairs, lo_pairs = _scale_pairs(scales, DTYPE)
        # [NB, 32, WPT, i2, i1, i0] holding nibble 4 i2 + 2 i1 + i0
        t = _nibbles_dequantized(words, neg_zero_pairs, hi_pairs, lo_pairs, DTYPE)
        # lane = 4 g + c, word = 2 jj + r -> [b, g, c, jj, r, i2, i1, i0] -> [b, r, g | jj, i2, i1, c, i0]
        t = gl.reshape(t, [NB, 8, 4, JJ, 2, 2, 2, 2])
        t = gl.permute(t, (0, 4, 1, 3, 5, 6, 2, 7))
        t = gl.reshape(t, [BLOCK_N, BLOCK_K])  # n = 16 b + 8 r + g, k = 32 jj + 16 i2 + 8 i1 + 2 c + i0
        return gl.convert_layout(t, a_layout, assert_trivial=True)

    @gluon.jit
    def _k_step(k, kc, a_k, a_prev, acc, words, zero_words, scales, x_desc, x_smem, ready, w_ptrs, zeros_ptrs,
                scales_ptrs, zero_shift, m0, N, first, num_k, a_layout: gl.constexpr, ZERO_OFFSET: gl.constexpr,
                DTYPE: gl.constexpr, GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                STAGES: gl.constexpr):
        """K-tile k: issue its wgmma (A_k from registers), retire wgmma k - 1, refill the x slot it read, and
        dequantize tile k + 1 into a_prev's place (A_{k-1}'s registers, free once wgmma k - 1 is retired).
        words / zero_words / scales: tile k + 1's, loaded one step earlier; returns tile k + 2's. k counts from
        this program's first K-tile (`first`: 0 without split-K; W's pointers start there, x's TMA adds it)."""
        X_BYTES: gl.constexpr = x_desc.block_type.nbytes
        slot = (kc + k) % STAGES
        # 1. x's tile k landed
        mbarrier.wait(ready.index(slot), ((kc + k) // STAGES) & 1)
        # 2. wgmma k, left running
        acc = warpgroup_mma(a_k, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
        # 3. wgmma k - 1 done in this warpgroup: A_{k-1} may be overwritten, its x slot is free here
        acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
        # 4. ... and in every warpgroup: the slot takes x's tile k - 1 + STAGES
        gl.thread_barrier()
        refill = (k >= 1) & (k - 1 + STAGES < num_k)
        free = (kc + k + STAGES - 1) % STAGES
        mbarrier.expect(ready.index(free), X_BYTES, pred=refill)
        tma.async_copy_global_to_shared(x_desc, [m0, (first + k - 1 + STAGES) * BLOCK_K], ready.index(free),
                                        x_smem.index(free), pred=refill)
        # 5. W's tile k + 2 loaded; tile k + 1 dequantized into fresh A registers, under wgmma k
        next_words, next_zero_words, next_scales = _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs,
                                                                gl.minimum(k + 2, num_k - 1), N, BLOCK_K,
                                                                GROUP_SIZE)
        a_next = _dequant_fragment(words, zero_words, zero_shift, scales, a_layout, ZERO_OFFSET, DTYPE, BLOCK_N,
                                   BLOCK_K)
        return acc, a_next, next_words, next_zero_words, next_scales

    @gluon.jit
    def _mainloop(x_desc, x_smem, ready, w_ptr, zeros_ptr, scales_ptr, m0, n0, N, first, num_k, kc,
                  ZERO_OFFSET: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        """y^T's tile (n0, m0) [BLOCK_N, BLOCK_M] over K-tiles first .. first + num_k - 1 (num_k even, `first` a
        multiple of two K-tiles and of a group's), fp32 in the wgmma layout, every wgmma retired. kc: the x ring's
        slots used before (a persistent program's earlier tiles), for the slots' mbarrier phases."""
        DTYPE: gl.constexpr = x_desc.dtype
        WPT: gl.constexpr = BLOCK_K // 16  # words a thread a K-tile
        NB: gl.constexpr = BLOCK_N // 16
        # Layouts. The accumulator y^T [BLOCK_N, BLOCK_M]: warps along the outputs, 16 each.
        mma: gl.constexpr = _acc_layout(BLOCK_M, NUM_WARPS)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        # The repacked words [NB, 32, WPT]: warp b, lane, the thread's WPT consecutive words (one vector load).
        w_regs: gl.constexpr = gl.BlockedLayout([1, 1, WPT], [1, 32, 1], [NUM_WARPS, 1, 1], [2, 1, 0])

        # W's, the zeros' and the scales' pointers start at K-tile `first` (scalars), so the loop counts from 0.
        w_ptr += (first * BLOCK_K // 64) * (N * 8)
        zeros_ptr += (first * BLOCK_K // GROUP_SIZE) * (N // 8)
        scales_ptr += (first * BLOCK_K // GROUP_SIZE) * N
        # Each word's address (within a 64-deep repacked tile), output, and its zero's nibble.
        b = gl.expand_dims(gl.expand_dims(gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_regs))), 1), 2)
        lane = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_regs))), 0), 2)
        w = gl.expand_dims(gl.expand_dims(gl.arange(0, WPT, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_regs))), 0), 1)
        w_ptrs = w_ptr + ((n0 // 16 + b) * 32 + lane) * 4 + w
        n = n0 + 16 * b + 8 * (w % 2) + lane // 4  # [NB, 32, WPT]
        zeros_ptrs = zeros_ptr + n // 8
        zero_shift = (n % 8) * 4
        scales_ptrs = scales_ptr + n

        # Prologue: x's tiles 0 .. STAGES - 1 requested; W's tile 0 dequantized, tile 1's words loaded.
        X_BYTES: gl.constexpr = BLOCK_M * BLOCK_K * 2
        for s in gl.static_range(STAGES):
            slot = (kc + s) % STAGES
            mbarrier.expect(ready.index(slot), X_BYTES, pred=s < num_k)
            tma.async_copy_global_to_shared(x_desc, [m0, (first + s) * BLOCK_K], ready.index(slot),
                                            x_smem.index(slot), pred=s < num_k)
        words, zero_words, scales = _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs, 0, N, BLOCK_K, GROUP_SIZE)
        a_even = _dequant_fragment(words, zero_words, zero_shift, scales, a_layout, ZERO_OFFSET, DTYPE, BLOCK_N,
                                   BLOCK_K)
        words, zero_words, scales = _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs, gl.minimum(1, num_k - 1), N,
                                                 BLOCK_K, GROUP_SIZE)

        # Two fragments, A_even / A_odd, for the even / odd K-tiles, and the loop unrolled by two: A_{k+1} is
        # written only after the wait that retires wgmma k - 1 (its previous reader), never while a wgmma that
        # reads those registers is in flight (PTX: undefined behaviour), and no copy is needed at the back edge.
        a_odd = gl.zeros([BLOCK_N, BLOCK_K], DTYPE, layout=a_layout)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        for k in range(0, num_k, 2):
            acc, a_odd, words, zero_words, scales = _k_step(
                k, kc, a_even, a_odd, acc, words, zero_words, scales, x_desc, x_smem, ready, w_ptrs, zeros_ptrs,
                scales_ptrs, zero_shift, m0, N, first, num_k, a_layout, ZERO_OFFSET, DTYPE, GROUP_SIZE, BLOCK_N,
                BLOCK_K, STAGES)
            acc, a_even, words, zero_words, scales = _k_step(
                k + 1, kc, a_odd, a_even, acc, words, zero_words, scales, x_desc, x_smem, ready, w_ptrs, zeros_ptrs,
                scales_ptrs, zero_shift, m0, N, first, num_k, a_layout, ZERO_OFFSET, DTYPE, GROUP_SIZE, BLOCK_N,
                BLOCK_K, STAGES)
        acc, a_odd = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_odd))
        return acc

    @gluon.jit
    def _workspace_offsets(n, m):
        """Offsets in a workspace tile of y^T element (n, m) (n: [BLOCK_N] in SliceLayout(1, L), m: [R] in
        SliceLayout(0, L) -> [BLOCK_N, R] in L), ordered as the wgmma accumulator's registers: for each 8 columns
        (j = m // 8) and half warp row (n // 8 % 2), the 256 threads' pairs (thread 32 w + 4 g + c holds rows
        16 w + g (+ 8), columns 8 j + 2 c, + 1) in thread order, so one store instruction of a warp writes 256
        contiguous bytes (8-byte pairs). A bijection onto 0 .. 128 * BLOCK_M - 1 (BLOCK_N 128, 8 warps)."""
        return (gl.expand_dims(512 * ((n // 8) % 2) + 64 * (n // 16) + 8 * (n % 8), 1)
                + gl.expand_dims(1024 * (m // 8) + m % 8, 0))

    @gluon.jit
    def _store_partial(acc, partial_ptr, index, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       NUM_WARPS: gl.constexpr):
        """acc (fp32, wgmma layout) to the workspace's tile `index` ([.., BLOCK_N * BLOCK_M]) in
        `_workspace_offsets`' order: 8-byte stores, 256 contiguous bytes a warp instruction. Every column is
        written (those of rows past M hold zeros: TMA filled x's missing rows with them): no mask to split the
        stores. (Row-major with a mask took 4-byte stores and ~30% of a split o projection's time, ncu.)"""
        gl.static_assert(BLOCK_N == 128 and NUM_WARPS == 8)
        mma: gl.constexpr = _acc_layout(BLOCK_M, NUM_WARPS)
        tile_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
        tile_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
        gl.store(partial_ptr + index * (BLOCK_N * BLOCK_M) + _workspace_offsets(tile_n, tile_m), acc)

    @gluon.jit
    def _reduce_partials(partial_ptr, counter_ptr, bias_ptr, out_ptr, tile, start, stride, first_extra, count, m0,
                         n0, M, N, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         NUM_WARPS: gl.constexpr):
        """After this program stored its partial of output tile `tile`: count its arrival (an acq_rel atomic on
        the tile's counter); the last of the tile's `count` partials to arrive sums them all, in order (partial i
        at workspace index start + i * stride, + first_extra for i = 0: deterministic), CHUNK rows of x at a time
        (a whole running sum plus a whole loaded partial would be 256 registers a thread at BLOCK_M 256), adds the
        bias, writes y and zeroes the counter (CUDA-graph replays find them zeroed)."""
        out_regs: gl.constexpr = _out_layout(BLOCK_N, NUM_WARPS)
        TILE: gl.constexpr = BLOCK_N * BLOCK_M
        gl.thread_barrier()  # every thread's partial stored before the counter says so
        if gl.atomic_add(counter_ptr + tile, 1, sem="acq_rel") == count - 1:
            # [BLOCK_N, CHUNK] pieces; a thread 8 columns of one row (32 contiguous bytes of the workspace), a
            # warp's 8 rows 8 * 8 floats apart: 4 x 256 contiguous bytes a load instruction
            CHUNK: gl.constexpr = 64 if BLOCK_M > 64 else BLOCK_M
            red: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [NUM_WARPS, 1], [1, 0])
            red_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, red))
            red_m = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, red))
            for c in gl.static_range(BLOCK_M // CHUNK):
                offs = _workspace_offsets(red_n, c * CHUNK + red_m)
                part = gl.zeros([BLOCK_N, CHUNK], gl.float32, layout=red)
                for i in range(count):  # ".cg": read at L2, where the other SMs' stores are
                    index = start + i * stride + gl.where(i == 0, first_extra, 0)
                    part += gl.load(partial_ptr + index * TILE + offs, cache_modifier=".cg")
                _store_output(part, bias_ptr, out_ptr, m0 + c * CHUNK, n0, M, N, red, out_regs, HAS_BIAS, CHUNK,
                              BLOCK_N)
            gl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next launch (CUDA-graph replays included)

    @gluon.jit(do_not_specialize=["M", "tiles_per_split", "split"])
    def _swapab_kernel(x_desc, w_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K,
                       tiles_per_split, split,
                       GROUP_SIZE: gl.constexpr, ZERO_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr,
                       SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                       STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        """One output tile a program (grid axis 0; row tiles of one output tile next to each other: they share W
        in L2), and with SPLIT_K one range of its K-tiles (grid axis 1)."""
        DTYPE: gl.constexpr = x_desc.dtype
        _check_tiles(BLOCK_N, BLOCK_K, STAGES, NUM_WARPS)
        mma: gl.constexpr = _acc_layout(BLOCK_M, NUM_WARPS)
        out_regs: gl.constexpr = _out_layout(BLOCK_N, NUM_WARPS)

        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BLOCK_M)
        m0 = (pid % num_m) * BLOCK_M
        n0 = (pid // num_m) * BLOCK_N
        # This program's K-tiles: first .. first + num_k - 1 (split-K: the pid_k-th range of tiles_per_split, an
        # even number, so every range holds whole pairs of K-tiles, and whole groups and 64-deep repacked tiles;
        # else all of them).
        if SPLIT_K:
            pid_k = gl.program_id(1)
            first = pid_k * tiles_per_split
            num_k = gl.minimum(tiles_per_split, K // BLOCK_K - first)
        else:
            first = 0
            num_k = K // BLOCK_K

        x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        acc = _mainloop(x_desc, x_smem, ready, w_ptr, zeros_ptr, scales_ptr, m0, n0, N, first, num_k, 0,
                        ZERO_OFFSET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE, STAGES, NUM_WARPS)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        if SPLIT_K:
            # Range pid_k's partial at workspace index pid_k * tiles + pid ([split, tiles, BLOCK_N, BLOCK_M]).
            num_tiles = gl.num_programs(0)
            _store_partial(acc, partial_ptr, pid_k * num_tiles + pid, BLOCK_M, BLOCK_N, NUM_WARPS)
            _reduce_partials(partial_ptr, counter_ptr, bias_ptr, out_ptr, pid, pid, num_tiles, 0, split, m0, n0, M,
                             N, HAS_BIAS, BLOCK_M, BLOCK_N, NUM_WARPS)
        else:
            _store_output(acc, bias_ptr, out_ptr, m0, n0, M, N, mma, out_regs, HAS_BIAS, BLOCK_M, BLOCK_N)

    @gluon.jit(do_not_specialize=["M", "dp_rounds", "units"])
    def _swapab_streamk_kernel(x_desc, w_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, M,
                               N, K, dp_rounds, units,
                               GROUP_SIZE: gl.constexpr, ZERO_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                               STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Persistent "data-parallel + stream-K" schedule (`stream_k_plan`): P = grid programs. Program p first
        computes whole tiles p, p + P, ... (dp_rounds of them), then its range of the remaining tiles' K-tiles,
        taken as one row of tiles x K-tiles: [p * units, (p + 1) * units) counted from tile dp_rounds * P's first
        K-tile (`units` an even number, a multiple of a group's K-tiles). A tile that range covers whole is
        written directly; a piece of a tile goes to the workspace [P, 2, BLOCK_N, BLOCK_M] (index 2p for the
        program's first piece, 2p + 1 for its last), and the tile's last piece to arrive sums them."""
        DTYPE: gl.constexpr = x_desc.dtype
        _check_tiles(BLOCK_N, BLOCK_K, STAGES, NUM_WARPS)
        mma: gl.constexpr = _acc_layout(BLOCK_M, NUM_WARPS)
        out_regs: gl.constexpr = _out_layout(BLOCK_N, NUM_WARPS)

        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        num_m = gl.cdiv(M, BLOCK_M)
        num_tiles = num_m * (N // BLOCK_N)
        k_tiles = K // BLOCK_K  # a tile's K-tiles
        dp_tiles = dp_rounds * programs
        sk_tiles = num_tiles - dp_tiles
        start = pid * units  # this program's stream-K range, counted from tile dp_tiles's first K-tile
        end = gl.minimum(start + units, sk_tiles * k_tiles)

        x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)

        j = 0  # whole tiles done
        it = start  # the next stream-K K-tile
        kc = 0  # x ring slots used so far
        while (j < dp_rounds) | (it < end):
            if j < dp_rounds:
                tile = pid + j * programs
                first = 0
                num_k = k_tiles
                j += 1
            else:
                local = it // k_tiles  # the tile, counted from dp_tiles
                tile = dp_tiles + local
                first = it - local * k_tiles
                num_k = gl.minimum(end, (local + 1) * k_tiles) - it
                it += num_k
            m0 = (tile % num_m) * BLOCK_M
            n0 = (tile // num_m) * BLOCK_N
            acc = _mainloop(x_desc, x_smem, ready, w_ptr, zeros_ptr, scales_ptr, m0, n0, N, first, num_k, kc,
                            ZERO_OFFSET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE, STAGES, NUM_WARPS)
            kc += num_k
            gl.thread_barrier()  # both warpgroups' wgmmas retired: the x ring is free for the next tile's loads
            if num_k == k_tiles:
                _store_output(acc, bias_ptr, out_ptr, m0, n0, M, N, mma, out_regs, HAS_BIAS, BLOCK_M, BLOCK_N)
            else:
                # This piece: the program's first (its range starts inside this tile) or its last.
                u = (tile - dp_tiles) * k_tiles  # the tile's first K-tile in stream-K counting
                index = 2 * pid + gl.where(start >= u, 0, 1)
                _store_partial(acc, partial_ptr, index, BLOCK_M, BLOCK_N, NUM_WARPS)
                # The tile's pieces: programs p0 .. p1; p0's is its last piece (index 2 p0 + 1) unless p0's range
                # starts exactly at the tile, every later program's is its first (2 p).
                p0 = u // units
                p1 = (u + k_tiles - 1) // units
                _reduce_partials(partial_ptr, counter_ptr, bias_ptr, out_ptr, tile, 2 * p0, 2,
                                 gl.where(p0 * units < u, 1, 0), p1 - p0 + 1, m0, n0, M, N, HAS_BIAS, BLOCK_M,
                                 BLOCK_N, NUM_WARPS)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

    @gluon.jit
    def _store_output(acc, bias_ptr, out_ptr, m0, n0, M, N, acc_layout: gl.constexpr, out_regs: gl.constexpr,
                      HAS_BIAS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):
        """y[m0 + m, n0 + n] = acc[n, m] (+ bias[n]), acc [BLOCK_N, ROWS]: transposed in registers, converted to
        16-byte rows, rows past M masked."""
        out_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        if HAS_BIAS:
            acc = acc + gl.expand_dims(gl.load(bias_ptr + out_n).to(gl.float32), 1)
        y = gl.convert_layout(gl.permute(acc.to(out_ptr.dtype.element_ty), (1, 0)), out_regs)  # [ROWS, BLOCK_N]
        rows = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out_regs))
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_regs))
        gl.store(out_ptr + gl.expand_dims(rows * N, 1) + gl.expand_dims(cols, 0), y,
                 mask=gl.expand_dims(rows < M, 1))


def _block_k(group_size: int) -> int:
    return min(MAX_BLOCK_K, group_size)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_m_for(M: int) -> int:
    """The row tile (wgmma's N) for M rows: the smallest of 64 / 128 / 256 that holds them (256 past that)."""
    return 64 if M <= 64 else 128 if M <= 128 else BLOCK_M


# Programs an SM holds at once, by BLOCK_M (sm_90's 64K registers and 227 KB shared memory over the offline
# compile's registers a thread x 256 threads and the x ring; perf/notes/gluon_swapab.md), for split_k_for's one wave.
PROGRAMS_PER_SM = {64: 2, 128: 2, 256: 1}


def split_k_for(M: int, N: int, K: int, group_size: int, sms: int, block_m: int | None = None,
                max_split: int = 8, min_k_tiles: int = 16) -> int:
    """K ranges per output tile: the most that still run as ONE wave (tiles x ranges <= the SMs times the programs an
    SM holds at this BLOCK_M), each range at least `min_k_tiles` K-tiles; 1 where the tiles alone fill a wave.
    A second wave of shorter programs did not pay on the H100 (session 21, 70B qkv at 256 rows, 80 tiles, one
    program an SM: 3 ranges 136.9 us, none 103.0), while one wave of split programs did (o / down at 256 rows,
    2 ranges: 89.6 / 227.3 us against 102.3 / 345.0; qkv at 128 rows, 3 ranges: 77.4 against 102.1)."""
    block_m = block_m or block_m_for(M)
    num_tiles = _cdiv(M, block_m) * (N // BLOCK_N)
    slots = sms * PROGRAMS_PER_SM[block_m]
    num_k_tiles = K // _block_k(group_size)
    split = 1
    for candidate in range(2, max_split + 1):
        if num_tiles * candidate > slots or num_k_tiles < candidate * min_k_tiles:
            break
        split = candidate
    return split


def stream_k_plan(num_tiles: int, num_k_tiles: int, tiles_per_group: int, slots: int,
                  min_k_tiles: int = 16) -> tuple[int, int, int]:
    """(programs, dp_rounds, units) of `_swapab_streamk_kernel`'s schedule for `num_tiles` output tiles of
    `num_k_tiles` K-tiles on `slots` programs at once: dp_rounds whole waves of whole tiles, then the remaining
    tiles' K-tiles cut into equal ranges of `units` (a multiple of two K-tiles and of a group's, at least
    `min_k_tiles` so that no tile is cut into slivers), one a program."""
    unit = max(2, tiles_per_group)
    dp_rounds = num_tiles // slots
    sk_k_tiles = (num_tiles - dp_rounds * slots) * num_k_tiles
    if sk_k_tiles == 0:
        return slots, dp_rounds, unit
    units = unit * _cdiv(max(_cdiv(sk_k_tiles, slots), min_k_tiles), unit)
    sk_programs = _cdiv(sk_k_tiles, units)
    return (slots if dp_rounds else sk_programs), dp_rounds, units


def use_stream_k(M: int, N: int, K: int, group_size: int, sms: int, block_m: int | None = None,
                 min_efficiency: float = 0.9) -> bool:
    """The automatic choice: stream-K at BLOCK_M 256 (one program an SM either way: the stream-K kernel takes
    233-253 registers a thread, so at 64 / 128 it would halve PROGRAMS_PER_SM's 2) where `split_k_for` finds no
    split and whole tiles would leave more than a tenth of the last wave's SMs idle. 70B on 132 SMs from 129 to
    256 rows: gate_up (448 tiles: 3 waves and 52 tiles) and qkv (80 tiles); o / down split in 2 instead."""
    block_m = block_m or block_m_for(M)
    if not STREAM_K or block_m != 256 or split_k_for(M, N, K, group_size, sms, block_m) > 1:
        return False
    num_tiles = _cdiv(M, block_m) * (N // BLOCK_N)
    return num_tiles / (_cdiv(num_tiles, sms) * sms) < min_efficiency


def k_ranges(num_k_tiles: int, split_k: int, tiles_per_group: int = 1) -> tuple[int, int]:
    """(K-tiles a range, ranges) for `split_k` requested ranges of `num_k_tiles` (even) K-tiles: each range a
    multiple of 2 K-tiles (the loop runs them in pairs) and of a group's `tiles_per_group` (the kernel starts
    W's, the zeros' and the scales' pointers at the range), none empty; fewer ranges where that does not fit."""
    unit = max(2, tiles_per_group)  # both powers of two
    tiles_per_split = unit * _cdiv(_cdiv(num_k_tiles, max(1, split_k)), unit)
    return tiles_per_split, _cdiv(num_k_tiles, tiles_per_split)


def _gl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]


def x_layout(dtype, block_k: int, block_m: int = BLOCK_M):
    """The x tile's shared layout (NVMMA swizzle, K contiguous), as both the TMA descriptor and the kernel use it."""
    return gl.NVMMASharedLayout.get_default_for([block_m, block_k], dtype)


def swapab_gptq_matmul(x: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       group_size: int, zero_offset: int, bias: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, split_k: int | None = None,
                       block_m: int | None = None, stream_k: bool | None = None) -> torch.Tensor:
    """x [..., K] (bf16 / fp16) @ a GPTQ weight (no act-order) whose qweight went through `repack_swapab`
    (packed int32 [K/64, N*8]) -> [..., N] in x's dtype. qzeros [K/group, N/8] and scales [K/group, N] as GPTQ
    stores them; `zero_offset` 1 for GPTQ v1 (stored zero - 1), 0 for v2 / AWQ repacked.
    `split_k`: K ranges per output tile (None: `split_k_for`'s choice; 1: none). `block_m`: the row tile, 64,
    128 or 256 (None: `block_m_for(M)`). `stream_k`: the persistent data-parallel + stream-K schedule instead
    (None: where `use_stream_k` says, if `split_k` is None)."""
    if not HAVE_GLUON:
        raise RuntimeError(f"triton.experimental.gluon is unavailable: {_IMPORT_ERROR}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 or fp16, not {x.dtype}")
    K, N = x.shape[-1], scales.shape[-1]
    if packed.dtype != torch.int32 or packed.shape != (K // REPACK_K, N * 8) or K % REPACK_K:
        raise ValueError(f"packed must be repack_swapab's int32 [K/64, N*8] = [{K // REPACK_K}, {N * 8}] "
                         f"(K % 64 == 0), not {packed.dtype} {tuple(packed.shape)}")
    group_size = K if group_size == -1 else group_size
    if (N % BLOCK_N or group_size < 32 or group_size & (group_size - 1) or K % group_size
            or K % (2 * _block_k(group_size))):
        raise ValueError(f"unsupported shape: K={K}, N={N}, group {group_size} (N % {BLOCK_N}, group a power of 2 >= 32, "
                         f"K a multiple of two K-tiles)")
    if scales.shape != (K // group_size, N) or qzeros.shape != (K // group_size, N // 8):
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match K={K}, N={N}, "
                         f"group {group_size}")
    if not (packed.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("packed, qzeros and scales must be contiguous")
    if block_m is not None and block_m not in PROGRAMS_PER_SM:
        raise ValueError(f"block_m must be one of {sorted(PROGRAMS_PER_SM)}, not {block_m}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # TMA: 16-byte aligned base and row stride
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, N)
    if M == 0:
        return out
    if M * N >= 1 << 31:
        raise ValueError(f"{M} rows: int32 offsets overflow (M * N must stay below 2^31)")
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block_k = _block_k(group_size)
    block_m = block_m or block_m_for(M)
    num_tiles = _cdiv(M, block_m) * (N // BLOCK_N)
    from ops.triton_quant import _num_sms

    sms = _num_sms(x.device.index)
    x_desc = TensorDescriptor(x2, [M, K], [x2.stride(0), 1], [block_m, block_k],
                              x_layout(_gl_dtype(x.dtype), block_k, block_m))
    if stream_k is None:
        stream_k = split_k is None and use_stream_k(M, N, K, group_size, sms, block_m)
    if stream_k:
        programs, dp_rounds, units = stream_k_plan(num_tiles, K // block_k, group_size // block_k, sms)
        from ops.triton_quant import _split_k_counters

        counters = _split_k_counters(x.device)
        if num_tiles > counters.numel():
            raise ValueError(f"{num_tiles} output tiles: stream-K counts at most {counters.numel()}")
        partial = torch.empty((programs, 2, BLOCK_N, block_m), dtype=torch.float32, device=x.device)
        _swapab_streamk_kernel[(programs, )](
            x_desc, packed, qzeros, scales, bias if bias is not None else scales, out2, partial, counters, M, N, K,
            dp_rounds, units,
            GROUP_SIZE=group_size, ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None, BLOCK_M=block_m,
            BLOCK_N=BLOCK_N, BLOCK_K=block_k, STAGES=STAGES, NUM_WARPS=NUM_WARPS, num_warps=NUM_WARPS,
        )
        return out
    if split_k is None:
        split_k = split_k_for(M, N, K, group_size, sms, block_m)
    tiles_per_split, split = k_ranges(K // block_k, split_k, group_size // block_k)
    if split * num_tiles * BLOCK_N * block_m >= 1 << 31:  # the workspace's int32 offsets
        tiles_per_split, split = K // block_k, 1
    if split > 1:
        from ops.triton_quant import _split_k_counters

        counters = _split_k_counters(x.device)
        if num_tiles > counters.numel():
            raise ValueError(f"{num_tiles} output tiles: split-K counts at most {counters.numel()}")
        partial = torch.empty((split, num_tiles, BLOCK_N, block_m), dtype=torch.float32, device=x.device)
    else:
        partial, counters = out2, out2  # unread
    _swapab_kernel[(num_tiles, split)](
        x_desc, packed, qzeros, scales, bias if bias is not None else scales, out2, partial, counters, M, N, K,
        tiles_per_split, split,
        GROUP_SIZE=group_size, ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None, SPLIT_K=split > 1,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, STAGES=STAGES, NUM_WARPS=NUM_WARPS,
        num_warps=NUM_WARPS,
    )
    return out


def compile_sm90(dtype: str = "bf16", group_size: int = 128, zero_offset: int = 0, has_bias: bool = False,
                 stages: int = STAGES, num_warps: int = NUM_WARPS, block_m: int = BLOCK_M, split_k: bool = False,
                 stream_k: bool = False):
    """The kernel (`stream_k`: the stream-K kernel) compiled offline for sm_90 (no GPU needed): a CompiledKernel
    with .asm["ttgir"] / ["ptx"] / ["cubin"]."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _swapab_streamk_kernel if stream_k else _swapab_kernel
    block_k = _block_k(group_size)
    layout = x_layout({"bf16": gl.bfloat16, "fp16": gl.float16}[dtype], block_k, block_m)
    signature = dict(x_desc=f"tensordesc<{dtype}[{block_m}, {block_k}],{layout!r}>", w_ptr="*i32",
                     zeros_ptr="*i32", scales_ptr="*fp16", bias_ptr="*fp16", out_ptr="*" + dtype,
                     partial_ptr="*fp32", counter_ptr="*i32", M="i32", N="i32", K="i32", tiles_per_split="i32",
                     split="i32", dp_rounds="i32", units="i32")
    constexprs = dict(GROUP_SIZE=group_size, ZERO_OFFSET=zero_offset, HAS_BIAS=has_bias, SPLIT_K=split_k,
                      BLOCK_M=block_m, BLOCK_N=16 * num_warps, BLOCK_K=block_k, STAGES=stages, NUM_WARPS=num_warps)
    names = fn.arg_names
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    sig = {k: sig[k] for k in names}
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    aligned = ("N", "K")  # as the JIT specializes them (multiples of 16) on the 70B shapes
    attrs = {(names.index(k), ): [["tt.divisibility", 16]] for k, kind in sig.items()
             if kind.startswith("*") or k in aligned}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
