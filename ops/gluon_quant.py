"""A Gluon (Triton's lower-level language) W4A16 GEMM for GPTQ's layout on Hopper, written so that the
dequantization of W's next K-tile overlaps the tensor cores' work on the current one.

Why (perf/notes/gemm256_sass.md): `ops.triton_quant._quant_matmul_kernel`'s 256-row entry dequantizes each
64-deep K-tile of W into ONE shared-memory buffer, barriers, runs wgmma, then `wgmma.wait_group 0`: the CUDA
cores (dequant) and the tensor cores (wgmma) take turns. Triton's `tl` cannot express anything else (a dot
whose shared operand is an in-loop `local_alloc` is lowered synchronously). Gluon exposes the pieces directly.

The layout (`ops.quant_ref`): qweight int32 [K/8, N], input k of output n is nibble k % 8 of word [k // 8, n];
qzeros int32 [K/group, N/8], output n's zero in nibble n % 8 (plus ZERO_OFFSET: 1 for GPTQ v1, 0 for v2 and for
AWQ repacked by `awq_to_gptq`); scales [K/group, N] (fp16). No act-order. x 16-bit (bf16 or fp16), y in x's
dtype: y = x @ ((q - zero) * scale).

One program computes a BLOCK_M x BLOCK_N (256 x 128) output tile with NUM_WARPS (16) warps, i.e. four
warpgroups, each wgmma-ing its own 64 rows (`NVMMADistributedLayout`, warps [16, 1], instruction 16x128x16);
its K loop runs over K-tiles of BLOCK_K = min(64, group) inputs (a K-tile never spans two groups). Shared memory:

- x ring: X_STAGES (4) slots of [BLOCK_M, BLOCK_K] (NVMMA 128-byte swizzle), filled by cp.async (16 bytes a
  copy; rows past M re-read row M - 1, never stored), X_STAGES - 2 K-tiles ahead. x is wgmma's A operand.
- W ring: B_STAGES (3) slots of the dequantized tile, stored [BLOCK_N, BLOCK_K] (K contiguous, NVMMA swizzle:
  each thread's word is 8 consecutive inputs of one output, one 16-byte store) and handed to wgmma as the
  [BLOCK_K, BLOCK_N] B operand through a transposed view (K-major B).

Iteration k of the K loop (each warp; a `thread_barrier` closes every iteration):

    1. cp.async x's tile k + X_STAGES - 2 into slot (k - 2) % X_STAGES   (wgmma k - 2 finished everywhere: 5.)
    2. issue wgmma k, async: acc += x[k % X_STAGES] @ W[k % 3]           (4 x wgmma.mma_async, one commit group)
    3. ld.global the packed words / zeros / scales of W's tile k + 2     (registers; consumed in iteration k + 1)
    4. dequantize W's tile k + 1 (words loaded in iteration k - 1) and st.shared it into W[(k + 1) % 3]
       -- the CUDA cores' work, while wgmma k (and maybe k - 1) runs on the tensor cores; slot (k + 1) % 3
       was last read by wgmma k - 2, finished everywhere before iteration k began
    5. wgmma.wait_group 1 (wgmma k - 1 done: its slots are free), cp.async.wait_group for x's tile k + 1,
       fence.proxy.async (generic-proxy writes -> wgmma's async-proxy reads), bar.sync

So the tensor cores always hold the next wgmma before the current one ends (wgmma k + 1 is issued at most one
barrier after wgmma k - 1 completes), and the dequant runs under them; the only waits for wgmma are
`wait_group 1`. The one barrier an iteration orders every warp's st.shared (4.) before any warpgroup's
wgmma on that slot, and every warpgroup's wgmma k - 1 before any warp overwrites its slots.

Dequantization is `ops.triton_quant`'s packed 16-bit form (`_nibble_pairs`, same PTX): per word one shift,
per pair of nibbles a PRMT, a LOP3 (nibble | magic: MAGIC + q exactly), a packed add of -(MAGIC + zero) and the
scale (fp16: one packed multiply; bf16: the fp16 scale split s_hi + s_lo in bf16, one multiply and one FMA),
rounded once: bit for bit the reference's float32 (q - zero) * scale rounded to x's dtype.

Split-K (`split_for`, automatic unless `split_k` is given): at 256 rows the 70B layers have 64 (o, down) or 80
(qkv) output tiles for 132 SMs, one program an SM; their K loops are then cut into 2 or 3 ranges (grid axis 1),
each range's fp32 partial goes to a workspace, and the last program of a tile to finish (a counter per tile,
`ops.triton_quant._split_k_counters`, zeroed again after use) sums them in a fixed order and writes the output.

Requirements (the wrapper checks; `supports` asks): N a multiple of BLOCK_N, K of the K-tile, group size a power
of two >= 32 dividing K (-1: one group). M any (masked). The engine uses it only with ENGINE_GLUON_GEMM_ROWS set
(`ops.triton_quant.GLUON_GEMM_ROWS`, off by default until it has run on a GPU); `perf/quant_bench.py --kernels
gluon-gptq-g128` and `tests/test_gluon_quant.py` call it directly.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon ships with Triton >= 3.5; the Hopper pieces' names are 3.6's
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    HAVE_GLUON = True
except ImportError as _error:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False
    _IMPORT_ERROR = _error

from ops.triton_quant import _nibble_pairs_asm, _SCALE_BF16_ASM, _SCALE_F16_ASM

BLOCK_M = 256
BLOCK_N = 128
MAX_BLOCK_K = 64
NUM_WARPS = 16
X_STAGES = 4
B_STAGES = 3


if HAVE_GLUON:
    _PAIRS_BF16 = gl.constexpr(_nibble_pairs_asm(0x4300, "bf16x2", _SCALE_BF16_ASM).value)
    _PAIRS_F16 = gl.constexpr(_nibble_pairs_asm(0x6400, "f16x2", _SCALE_F16_ASM).value)

    @gluon.jit
    def _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs, t, N, BLOCK_K: gl.constexpr, GROUP_SIZE: gl.constexpr):
        """W's K-tile t, packed: words [BLOCK_N, BLOCK_K // 8] (output-major view of qweight's rows), the zero words
        [BLOCK_N] (one int32 per output, its nibble picked later) and the scales [BLOCK_N] of the tile's group."""
        g = (t * BLOCK_K) // GROUP_SIZE
        words = gl.load(w_ptrs + t * (BLOCK_K // 8) * N)
        zero_words = gl.load(zeros_ptrs + g * (N // 8))
        scales = gl.load(scales_ptrs + g * N)
        return words, zero_words, scales

    @gluon.jit
    def _scale_pairs(scales, DTYPE: gl.constexpr):
        """fp16 scales as packed pairs (both halves the same 16 bits) for `_nibbles_dequantized`: (s_hi, s_lo) in
        bf16 for bf16 x (s = s_hi + s_lo exactly: an fp16 scale has 11 significant bits), (s, s) in fp16 for fp16 x."""
        s = scales.to(gl.float32)
        s_hi = s.to(DTYPE)
        hi_pairs = (s_hi.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) * 0x10001
        lo_pairs = hi_pairs
        if DTYPE == gl.bfloat16:
            s_lo = (s - s_hi.to(gl.float32)).to(gl.bfloat16)
            lo_pairs = (s_lo.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) * 0x10001
        return hi_pairs, lo_pairs

    @gluon.jit
    def _nibbles_dequantized(words, neg_zero_pairs, hi_pairs, lo_pairs, DTYPE: gl.constexpr):
        """(q - zero) * scale in DTYPE of each word's 8 nibbles (`ops.triton_quant._nibble_pairs`'s PTX: 17 / 21
        instructions a word, fp16 / bf16), as words' shape + [2, 2, 2]: element [..., c, b, a] is nibble 4c + 2b + a
        (join(u, v)[..., i] is u for i = 0). Shared by this module's kernel and ops.gluon_swapab's."""
        if DTYPE == gl.bfloat16:
            p0, p1, p2, p3, p4, p5, p6, p7 = gl.inline_asm_elementwise(
                _PAIRS_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", [words, neg_zero_pairs, hi_pairs, lo_pairs],
                (gl.bfloat16, ) * 8, True, 1)
        else:
            p0, p1, p2, p3, p4, p5, p6, p7 = gl.inline_asm_elementwise(
                _PAIRS_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, neg_zero_pairs, hi_pairs],
                (gl.float16, ) * 8, True, 1)
        return gl.join(gl.join(gl.join(p0, p4), gl.join(p2, p6)), gl.join(gl.join(p1, p5), gl.join(p3, p7)))

    @gluon.jit
    def _dequant_tile(words, zero_words, scales, n, ZERO_OFFSET: gl.constexpr, DTYPE: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """(q - zero) * scale in DTYPE, [BLOCK_N, BLOCK_K] (element [n, k]: input k0 + k of output n0 + n), in a
        blocked layout of 8 consecutive inputs (one word) a thread; n: the outputs' offsets (for the zero's nibble)."""
        MAGIC: gl.constexpr = 0x4300 if DTYPE == gl.bfloat16 else 0x6400
        zeros = ((zero_words >> ((n % 8) * 4)) & 0xF) + ZERO_OFFSET  # 0..16
        neg_zero_pairs = gl.expand_dims((zeros + (MAGIC | 0x8000)) * 0x10001, 1)  # -(MAGIC + zero), both halves
        hi_pairs, lo_pairs = _scale_pairs(scales, DTYPE)
        t = _nibbles_dequantized(words, neg_zero_pairs, gl.expand_dims(hi_pairs, 1), gl.expand_dims(lo_pairs, 1),
                                 DTYPE)
        # [BLOCK_N, BLOCK_K // 8, 2, 2, 2]: element [n, w, c, b, a], nibble 4 c + 2 b + a of word w, which the
        # reshape puts at input 8 w + 4 c + 2 b + a: the word's order.
        return gl.reshape(t, [BLOCK_N, BLOCK_K])

    @gluon.jit(do_not_specialize=["M"])
    def _gluon_gptq_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
                           M, N, K, stride_xm, tiles_per_split, split,
                           GROUP_SIZE: gl.constexpr, ZERO_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr,
                           SPLIT_K: gl.constexpr,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                           X_STAGES: gl.constexpr, B_STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        DTYPE: gl.constexpr = x_ptr.dtype.element_ty
        gl.static_assert(X_STAGES >= 3)
        gl.static_assert(B_STAGES == 3)
        gl.static_assert(BLOCK_M % (16 * NUM_WARPS) == 0)
        # Layouts. The accumulator: warps stacked along M, 16 rows each (16 warps: warpgroup g owns rows 64 g .. 64 g + 63).
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        # x's copies: 16 bytes (8 inputs) a thread, a row of the tile by BLOCK_K // 8 threads.
        x_regs: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [NUM_WARPS, 1], [1, 0])
        # W's packed words [BLOCK_N, BLOCK_K // 8]: a warp reads 32 consecutive outputs of one word row (128 bytes).
        w_regs: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, NUM_WARPS // 4], [0, 1])
        x_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], DTYPE)
        b_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], DTYPE)

        # Output tile: the row tiles of one column tile run next to each other (they share W's tiles in L2).
        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        n0 = (pid // num_m) * BLOCK_N
        # This program's K-tiles: first .. last (split-K: the pid_k-th range of tiles_per_split; else all).
        pid_k = gl.program_id(1)
        first = pid_k * tiles_per_split
        last = gl.minimum(first + tiles_per_split, K // BLOCK_K) - 1
        num_k = last - first + 1

        rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_regs))
        rows = gl.minimum(rows, M - 1)  # rows past M copy row M - 1: valid memory, results never stored
        cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_regs))
        x_ptrs = x_ptr + gl.expand_dims(rows * stride_xm, 1) + gl.expand_dims(cols, 0)

        n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_regs))
        kw = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, w_regs))
        w_ptrs = w_ptr + gl.expand_dims(kw * N, 0) + gl.expand_dims(n0 + n, 1)
        zeros_ptrs = zeros_ptr + (n0 + n) // 8
        scales_ptrs = scales_ptr + n0 + n

        x_smem = gl.allocate_shared_memory(DTYPE, [X_STAGES, BLOCK_M, BLOCK_K], x_shared)
        b_smem = gl.allocate_shared_memory(DTYPE, [B_STAGES, BLOCK_N, BLOCK_K], b_shared)

        # Prologue: x's tiles 0 .. X_STAGES - 3 in flight; W's tile 0 dequantized into slot 0, tile 1's words loaded.
        for s in gl.static_range(X_STAGES - 2):
            async_copy.async_copy_global_to_shared(x_smem.index(s), x_ptrs + gl.minimum(first + s, last) * BLOCK_K)
            async_copy.commit_group()
        words, zero_words, scales = _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs, first, N, BLOCK_K, GROUP_SIZE)
        b_smem.index(0).store(_dequant_tile(words, zero_words, scales, n, ZERO_OFFSET, DTYPE, BLOCK_N, BLOCK_K))
        words, zero_words, scales = _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs, gl.minimum(first + 1, last), N,
                                                 BLOCK_K, GROUP_SIZE)
        async_copy.wait_group(X_STAGES - 3)
        fence_async_shared()
        gl.thread_barrier()

        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        for k in range(num_k):
            # 1. wgmma k, left running.
            acc = warpgroup_mma(x_smem.index(k % X_STAGES), b_smem.index(k % B_STAGES).permute((1, 0)), acc,
                                is_async=True)
            # 2. x's tile k + X_STAGES - 2 (clamped: past the end, a harmless re-copy keeps the group count).
            ahead = k + X_STAGES - 2
            async_copy.async_copy_global_to_shared(x_smem.index(ahead % X_STAGES),
                                                   x_ptrs + gl.minimum(first + ahead, last) * BLOCK_K)
            async_copy.commit_group()
            # 3. W's tile k + 2, packed, into registers (waited for at its first use, in the next iteration).
            next_words, next_zero_words, next_scales = _load_w_tile(w_ptrs, zeros_ptrs, scales_ptrs,
                                                                    gl.minimum(first + k + 2, last), N, BLOCK_K,
                                                                    GROUP_SIZE)
            # 4. W's tile k + 1 dequantized under wgmma k (past the end: a dead slot, never read).
            b_smem.index((k + 1) % B_STAGES).store(
                _dequant_tile(words, zero_words, scales, n, ZERO_OFFSET, DTYPE, BLOCK_N, BLOCK_K))
            words, zero_words, scales = next_words, next_zero_words, next_scales
            # 5. wgmma k - 1 done (its slots free), x's tile k + 1 landed, the writes visible to wgmma, all warps here.
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            async_copy.wait_group(X_STAGES - 3)
            fence_async_shared()
            gl.thread_barrier()
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        async_copy.wait_group(0)  # the clamped re-copies

        out_rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        out_cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        if SPLIT_K:
            # Each K range's fp32 partial to the workspace [split, M, N]; the tile's last program to arrive (a
            # counter per tile) sums them in order (deterministic) and writes the output, then zeroes the counter.
            # (The 2-D offsets are rebuilt at each use from the 1-D ones: kept live beside acc, they would spill.)
            gl.store(_tile_ptrs(partial_ptr + pid_k * M * N, out_rows, out_cols, N), acc,
                     mask=gl.expand_dims(out_rows < M, 1))
            gl.thread_barrier()  # every thread's partial stored before the counter says so
            if gl.atomic_add(counter_ptr + pid, 1, sem="acq_rel") == split - 1:
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
                for i in range(split):  # ".cg": read at L2, where the other SMs' stores are
                    acc += gl.load(_tile_ptrs(partial_ptr + i * M * N, out_rows, out_cols, N),
                                   mask=gl.expand_dims(out_rows < M, 1), other=0.0, cache_modifier=".cg")
                gl.atomic_xchg(counter_ptr + pid, 0)  # ready for the next launch (CUDA-graph replays included)
                _store_output(acc, bias_ptr, out_ptr, out_rows, out_cols, M, N, HAS_BIAS)
        else:
            _store_output(acc, bias_ptr, out_ptr, out_rows, out_cols, M, N, HAS_BIAS)

    @gluon.jit
    def _tile_ptrs(base, rows, cols, N):
        return base + gl.expand_dims(rows * N, 1) + gl.expand_dims(cols, 0)

    @gluon.jit
    def _store_output(acc, bias_ptr, out_ptr, rows, cols, M, N, HAS_BIAS: gl.constexpr):
        if HAS_BIAS:
            acc = acc + gl.expand_dims(gl.load(bias_ptr + cols).to(gl.float32), 0)
        gl.store(_tile_ptrs(out_ptr, rows, cols, N), acc.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(rows < M, 1))

def _block_k(group_size: int) -> int:
    return min(MAX_BLOCK_K, group_size)


def split_for(num_tiles: int, num_k_tiles: int, sms: int, max_split: int = 8, min_k_tiles: int = 16,
              min_gain: float = 0.15) -> int:
    """K ranges per output tile: the split whose waves of programs (one program an SM) take the least time,
    ceil(tiles * split / SMs) / split of the unsplit tile's, each larger split taken only if it saves at least
    `min_gain` of the best so far (the partials' round trip through L2 costs something). 70B at 256 rows on 132
    SMs: qkv (80 tiles) 3, o and down (64) 2, gate_up (448) 1."""
    best, best_cost = 1, float(triton.cdiv(num_tiles, sms))
    for split in range(2, max_split + 1):
        if num_k_tiles < split * min_k_tiles or num_tiles * split > _MAX_SPLIT_K_TILES:
            break
        cost = triton.cdiv(num_tiles * split, sms) / split
        if cost < best_cost * (1 - min_gain):
            best, best_cost = split, cost
    return best


_MAX_SPLIT_K_TILES = 1 << 16  # ops.triton_quant's counters: one int32 per output tile


def supports(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> bool:
    """Can `gluon_gptq_matmul` run this call (Gluon present, an sm_90 GPU, a shape and dtype it takes)? The
    engine's dispatch (`ops.triton_quant`, ENGINE_GLUON_GEMM_ROWS) asks before it calls."""
    if not (HAVE_GLUON and x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0)):
        return False
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    group_size = K if group_size == -1 else group_size
    M = x.numel() // max(1, x.shape[-1])
    return (x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] == K and N % BLOCK_N == 0
            and group_size >= 32 and not group_size & (group_size - 1) and K % group_size == 0
            and K % _block_k(group_size) == 0 and M * max(N, K) < 1 << 31
            and qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous())


def gluon_gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      group_size: int, zero_offset: int, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] (bf16 / fp16) @ GPTQ weight (qweight int32 [K/8, N], no act-order) -> [..., N] in x's dtype.
    `zero_offset` 1 for GPTQ v1 (stored zero - 1), 0 for v2 / AWQ repacked (`ops.quant_ref.awq_to_gptq`).
    `split_k`: K ranges per output tile (None: `split_for`'s choice; 1: none)."""
    if not HAVE_GLUON:
        raise RuntimeError(f"triton.experimental.gluon is unavailable: {_IMPORT_ERROR}")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    group_size = K if group_size == -1 else group_size
    block_k = _block_k(group_size)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 or fp16, not {x.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {K}")
    if N % BLOCK_N or K % group_size or group_size < 32 or group_size & (group_size - 1) or K % block_k:
        raise ValueError(f"unsupported shape: K={K}, N={N}, group {group_size} (N % {BLOCK_N}, group a power of 2 >= 32)")
    if not (qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("qweight, qzeros and scales must be contiguous")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # cp.async copies 16 aligned bytes
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, N)
    if M == 0:
        return out
    if M * N >= 1 << 31 or M * K >= 1 << 31:
        raise ValueError(f"{M} rows: int32 offsets overflow (M * N and M * K must stay below 2^31)")
    num_tiles = triton.cdiv(M, BLOCK_M) * (N // BLOCK_N)
    num_k_tiles = K // block_k
    if split_k is None:
        from ops.triton_quant import _num_sms

        split_k = split_for(num_tiles, num_k_tiles, _num_sms(x.device.index))
    tiles_per_split = triton.cdiv(num_k_tiles, max(1, min(split_k, num_k_tiles)))
    split = triton.cdiv(num_k_tiles, tiles_per_split)  # no empty range
    if split * M * N >= 1 << 31:  # the workspace's int32 offsets
        tiles_per_split, split = num_k_tiles, 1
    if split > 1:
        from ops.triton_quant import _split_k_counters

        partial = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        counters = _split_k_counters(x.device)
        if num_tiles > counters.numel():
            raise ValueError(f"{num_tiles} output tiles: split-K counts at most {counters.numel()}")
    else:
        partial, counters = out2, out2  # unread
    _gluon_gptq_kernel[(num_tiles, split)](
        x2, qweight, qzeros, scales, bias if bias is not None else scales, out2, partial, counters,
        M, N, K, x2.stride(0), tiles_per_split, split,
        GROUP_SIZE=group_size, ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None, SPLIT_K=split > 1,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k, X_STAGES=X_STAGES, B_STAGES=B_STAGES,
        NUM_WARPS=NUM_WARPS, num_warps=NUM_WARPS,
    )
    return out


def compile_sm90(dtype: str = "bf16", group_size: int = 128, zero_offset: int = 0, has_bias: bool = False,
                 x_stages: int = X_STAGES, num_warps: int = NUM_WARPS, split_k: bool = False):
    """The kernel compiled offline for sm_90 (no GPU needed): a CompiledKernel with .asm["ptx"] / ["cubin"]."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _gluon_gptq_kernel
    ptr = "*" + dtype
    signature = dict(x_ptr=ptr, w_ptr="*i32", zeros_ptr="*i32", scales_ptr="*fp16", bias_ptr="*fp16",
                     out_ptr=ptr, partial_ptr="*fp32", counter_ptr="*i32", M="i32", N="i32", K="i32",
                     stride_xm="i32", tiles_per_split="i32", split="i32")
    constexprs = dict(GROUP_SIZE=group_size, ZERO_OFFSET=zero_offset, HAS_BIAS=has_bias, SPLIT_K=split_k,
                      BLOCK_M=BLOCK_M,
                      BLOCK_N=BLOCK_N, BLOCK_K=_block_k(group_size), X_STAGES=x_stages, B_STAGES=B_STAGES,
                      NUM_WARPS=num_warps)
    names = fn.arg_names
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    sig = {k: sig[k] for k in names}
    aligned = ("N", "K", "stride_xm")  # as the JIT specializes them (multiples of 16) on the 70B shapes
    attrs = {(names.index(k), ): [["tt.divisibility", 16]] for k, kind in sig.items()
             if kind.startswith("*") or k in aligned}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=constexprs,
                         attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
