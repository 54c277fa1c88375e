"""A Triton GEMM for decode's batches of dense 16-bit weights: y = x @ W.T for 3 to 256 rows of x and W [N, K] in
nn.Linear's layout (bf16 / fp16), where cuBLAS leaves most of the H100 idle on a small model's shapes.

Why: at a few hundred rows or fewer a small model's projections are short on output tiles. Qwen3-0.6B's o and down
projections have N = 1,024: eight 128-wide column tiles, so a kernel with one program a tile keeps 8-16 of the
H100's 132 SMs busy while the weight (4-6 MB) streams in. nano's full-batch step spent ~0.96 ms in cuBLAS GEMMs
against ~0.4 ms for reading the weights once (perf/RESULTS.md, session 20 call 4).

How: swap-AB tiles, each program a [BLOCK_N, BLOCK_M] tile of y^T = W x^T, so that W's 64 or 128 rows are wgmma's M
dimension and x's few rows its N (16 at least); both operands go through Triton's software pipeline
(`tl.range(..., num_stages)`, cp.async) into shared memory and from there straight to the tensor cores. K is split
into ranges until the programs fill the GPU (`ops.triton_quant`'s split-K: fp32 partials, the last program of a
tile sums them in a fixed order, so results do not depend on timing, and its counters reset themselves, so the
launch is CUDA-graph safe).

Tile sizes are fixed per batch-size class in `TILES` (no autotuning); `CANDIDATE_TILES` holds the alternatives
perf/quant_bench.py's `triton-dense` kernel compares (`--dense-tiles`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ops.triton_quant import DENSE, _below, _finish, _split_k, _split_k_counters


@dataclass(frozen=True)
class DenseTiles:
    block_m: int  # rows of x a program (wgmma's N: 16 at least)
    block_n: int  # outputs a program (wgmma's M: 64 a warpgroup)
    block_k: int
    num_warps: int
    num_stages: int
    programs_per_sm: int  # split K until about this many programs an SM


TileTable = tuple[tuple[int, DenseTiles], ...]
CANDIDATE_TILES: dict[str, TileTable] = {
    "default": (
        (16, DenseTiles(16, 128, 128, 4, 4, 2)),
        (32, DenseTiles(32, 128, 128, 4, 4, 2)),
        (64, DenseTiles(64, 128, 64, 4, 4, 2)),
        (128, DenseTiles(128, 128, 64, 4, 3, 1)),
        (1 << 62, DenseTiles(128, 128, 64, 8, 3, 1)),
    ),
    "n64": (
        (16, DenseTiles(16, 64, 128, 4, 4, 4)),
        (32, DenseTiles(32, 64, 128, 4, 4, 4)),
        (64, DenseTiles(64, 64, 128, 4, 4, 2)),
        (128, DenseTiles(128, 64, 64, 4, 4, 2)),
        (1 << 62, DenseTiles(256, 64, 64, 4, 3, 1)),
    ),
    "wide-m": (
        (32, DenseTiles(32, 128, 128, 4, 4, 2)),
        (1 << 62, DenseTiles(256, 128, 64, 8, 3, 1)),
    ),
    "more-split": (
        (16, DenseTiles(16, 128, 128, 4, 4, 4)),
        (32, DenseTiles(32, 128, 128, 4, 4, 4)),
        (64, DenseTiles(64, 128, 64, 4, 4, 3)),
        (128, DenseTiles(128, 128, 64, 4, 3, 2)),
        (1 << 62, DenseTiles(128, 128, 64, 8, 3, 2)),
    ),
}
TILES: TileTable = CANDIDATE_TILES["default"]


def tiles_for(M: int) -> DenseTiles:
    return next(tiles for max_m, tiles in TILES if M <= max_m)


@triton.jit(do_not_specialize=["M"])  # the rows change from step to step: one compile per tile, not three
def _dense_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_w, k_per_split, split,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = _below(rn, N, EVEN_N)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T's tile
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = _below(rk, k_end, EVEN_K)
        w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(w, x, acc)
    _finish(acc.T, rm, rn, m_mask, n_mask, pid_k, pid_m * tl.num_programs(0) + pid_n, M, N, split, partial_ptr,
            counter_ptr, bias_ptr, bias_ptr, out_ptr, DENSE, HAS_BIAS, SPLIT_K)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias) -> [..., N] in x's dtype, as F.linear (into `out` if given)."""
    N, K = weight.shape
    if x.shape[-1] != K or x.dtype != weight.dtype or weight.stride(1) != 1:
        raise ValueError(f"dense_matmul: x [..., {x.shape[-1]}] {x.dtype}, weight {tuple(weight.shape)} {weight.dtype} "
                         f"(needs x's last dimension K, one dtype, the weight contiguous along K)")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, N)
    if M == 0:
        return out
    tiles = tiles_for(M)
    num_m, num_n = triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n)
    split = _split_k(num_m * num_n, K, tiles.block_k, tiles.programs_per_sm, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, split), tiles.block_k) * tiles.block_k
    split = triton.cdiv(K, k_per_split)
    partial = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out2
    counters = _split_k_counters(x.device) if split > 1 else out2
    _dense_kernel[(num_n, num_m, split)](
        x2, weight, bias if bias is not None else weight, out2, partial, counters,
        M, N, K, x2.stride(0), weight.stride(0), k_per_split, split,
        HAS_BIAS=bias is not None, SPLIT_K=split > 1, EVEN_K=K % tiles.block_k == 0, EVEN_N=N % tiles.block_n == 0,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, NUM_STAGES=tiles.num_stages,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
