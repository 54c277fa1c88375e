"""A Triton GEMV for decode's smallest batches: y = x @ W.T for one or two rows of x and a dense weight
W [N, K] in nn.Linear's layout (bf16 / fp16; int8 with one scale per output).

Why: at one or two rows a linear layer is a read of its weight and nothing else, so its time is the
weight's bytes over the memory bandwidth. cuBLAS's kernels for these shapes read Llama-3.1-8B's
decoder-layer weights at about 2.6 TB/s on the H100 (166.5 us for 436 MB, perf/RESULTS.md, session 7's
quant_bench), and at batch 1 those reads are ~85% of a decode step.

How: each program owns BLOCK_N rows of W (whole rows are contiguous along K, so every load is a run of
BLOCK_K * 2 bytes) and streams them through a software pipeline (`tl.range(..., num_stages)`: cp.async
copies run ahead of the FMAs). Each row of x keeps a [BLOCK_N, BLOCK_K] fp32 sum through the K loop,
reduced over K once at the end, so the loop is one conversion and one FMA a weight a row. When the
rows alone make too few programs to keep every SM's loads in flight, K is split into ranges, one
program each, summed deterministically by the range's last program (`ops.triton_quant._finish`: the
split-K scheme the quantized kernels use, its workspace and self-resetting counters). Nothing here
syncs with the host, so it can be captured in CUDA graphs.

Measured on the H100 (perf/RESULTS.md, session 9; perf/gemv_bench.py): an 8B decoder layer's four
matmuls in 154.4 us against cuBLAS's 165.9 at one row, the 8B LM head in 338 against 435 us (3.1 TB/s);
every tile of a 40-tile grid within 1-4% of the default. Llama-3.1-8B batch-1 decode 155.1 -> 167.7
tok/s. int8 weights: 87.9 us a layer against 112.3 through ops.triton_quant's tiles.

`gemv` is the entry point; `ops.linear.dense_linear` sends decode's small batches here on CUDA and
everything else to F.linear; `ops.triton_quant.int8_matmul` sends its one- and two-row calls here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ops import pdl
from ops.triton_quant import INT8, GPTQ, _finish, _split_k, _split_k_counters

MAX_ROWS = 2  # rows of x the kernel takes (each keeps its own sum through the K loop)


@dataclass(frozen=True)
class GemvTiles:
    block_n: int  # rows of W (outputs) per program
    block_k: int  # inputs per K-tile
    num_warps: int
    num_stages: int  # K-tiles in the software pipeline
    programs_per_sm: int  # split K until about this many programs per SM


# The launch configuration for 1 and 2 rows of x ("default"); perf/gemv_bench.py --sweep times a grid around it.
# Compiled for sm_90 (triton 3.6): 72 / 118 registers at 1 / 2 rows, no spill.
CANDIDATE_TILES: dict[str, GemvTiles] = {
    "default": GemvTiles(block_n=8, block_k=512, num_warps=4, num_stages=3, programs_per_sm=4),
}


@triton.jit
def _silu_mul(gate, up):
    """silu(gate) * up in float32, rounded once to their dtype: what torch.compile makes of
    `F.silu(gate) * up` (engine.models.layers.silu_and_mul)."""
    g = gate.to(tl.float32)
    return (g * tl.sigmoid(g) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _load_x(row_ptr, k, k_mask, K, EVEN_K: tl.constexpr, SILU_MUL_X: tl.constexpr):
    """x[k] of one row as float32 (0 where masked); with SILU_MUL_X, silu(row[k]) * row[K + k]."""
    if EVEN_K:
        x = tl.load(row_ptr + k)
        if SILU_MUL_X:
            x = _silu_mul(x, tl.load(row_ptr + K + k))
    else:
        x = tl.load(row_ptr + k, mask=k_mask, other=0.0)
        if SILU_MUL_X:
            x = _silu_mul(x, tl.load(row_ptr + K + k, mask=k_mask, other=0.0))
    return x.to(tl.float32)


@triton.jit
def _load_w(w_rows, k, k_mask, EVEN_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of W, read once (evict first: no other program reads it)."""
    if EVEN_K:
        return tl.load(w_rows + k[None, :], eviction_policy="evict_first")
    return tl.load(w_rows + k[None, :], mask=k_mask[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _multiply_add(acc0, acc1, w, x_ptr, x1_ptr, k, k_mask, K, EVEN_K: tl.constexpr, SILU_MUL_X: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Each row's running [BLOCK_N, BLOCK_K] sums plus W's tile times that row's x[k]."""
    w = w.to(tl.float32)
    acc0 += w * _load_x(x_ptr, k, k_mask, K, EVEN_K, SILU_MUL_X)[None, :]
    if BLOCK_M > 1:
        acc1 += w * _load_x(x1_ptr, k, k_mask, K, EVEN_K, SILU_MUL_X)[None, :]
    return acc0, acc1


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr):
    """out[row] = silu(x[row, :d]) * x[row, d:2d], for the rows the GEMV does not take."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask)
    tl.store(out_ptr + row * stride_out + cols, _silu_mul(gate, up), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] -> silu(x[..., :d]) * x[..., d:], one kernel (torch.compile's rounding)."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] and d:
        block = min(1024, triton.next_power_of_2(d))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, d, x2.stride(0), d, BLOCK=block)
    return out


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_w, k_per_split, split,
    HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, SILU_MUL_X: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Rows 0..M-1 (M <= BLOCK_M <= 2) of x times BLOCK_N rows of W over one K range. With SILU_MUL_X,
    x's rows are [gate, up] (2 * K values) and the input is silu(gate) * up, made as it is loaded.
    With USE_PDL (launched with programmatic dependent launch, ops.pdl): the range's first weight tile
    is loaded before waiting for the previous kernel, everything else after."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    # Rows past N re-read the last one (their sums are not stored), so no load in the loop needs a row mask.
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_w
    x1_ptr = x_ptr + tl.minimum(M - 1, 1) * stride_xm  # row 0 again when M = 1 (its sums are not stored)
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if USE_PDL:
        # The weight is the one input no kernel writes: its first tile streams in while the previous
        # kernel finishes. Then the wait (x, the output and the split-K workspace are the previous
        # kernels'), and only then the signal that lets the next kernel start (ops.pdl's rules).
        k = k_start + rk
        w_first = _load_w(w_rows, k, k < k_end, EVEN_K)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        acc0, acc1 = _multiply_add(acc0, acc1, w_first, x_ptr, x1_ptr, k, k < k_end, K, EVEN_K, SILU_MUL_X, BLOCK_M)
        k_start += BLOCK_K
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + rk
        w = _load_w(w_rows, k, k < k_end, EVEN_K)
        acc0, acc1 = _multiply_add(acc0, acc1, w, x_ptr, x1_ptr, k, k < k_end, K, EVEN_K, SILU_MUL_X, BLOCK_M)
    if BLOCK_M > 1:
        sums = tl.trans(tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1)))  # [2, BLOCK_N]
    else:
        sums = tl.sum(acc0, axis=1)[None, :]
    rm = tl.arange(0, BLOCK_M)
    _finish(sums, rm, rn, rm < M, n_mask, pid_k, pid_n, M, N, split, partial_ptr, counter_ptr, scales_ptr, bias_ptr,
            out_ptr, INT8 if HAS_SCALES else GPTQ, HAS_BIAS, SPLIT_K)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scales: torch.Tensor | None = None,
         tiles: GemvTiles | None = None, out: torch.Tensor | None = None, silu_mul_x: bool = False) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows) @ weight [N, K].T (times `scales` [N] per output, for int8 weights)
    plus bias -> [..., N] in x's dtype (into `out` if given). With `silu_mul_x`, x is [..., 2 * K], a
    gate_up projection's output, and the product is silu_mul(x) @ weight.T (the activation in the x load)."""
    N, K = weight.shape
    if x.shape[-1] != K * (2 if silu_mul_x else 1):
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {K}{' (twice that with silu_mul_x)' if silu_mul_x else ''}")
    if weight.stride(1) != 1:
        raise ValueError("the weight must be contiguous along its inputs")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"the GEMV takes at most {MAX_ROWS} rows, not {M}")
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    elif out.shape != (*x.shape[:-1], N) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], N)}")
    if M == 0 or N == 0:
        return out
    tiles = tiles or CANDIDATE_TILES["default"]
    num_tiles = triton.cdiv(N, tiles.block_n)
    split = _split_k(num_tiles, K, tiles.block_k, tiles.programs_per_sm, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, split), tiles.block_k) * tiles.block_k
    split = triton.cdiv(K, k_per_split)
    out2 = out.view(-1, N)
    partial = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out2
    counters = _split_k_counters(x.device) if split > 1 else out2
    _gemv_kernel[(num_tiles, split)](
        x2, weight, scales if scales is not None else weight, bias if bias is not None else weight, out2, partial,
        counters, M, N, K, x2.stride(0), weight.stride(0), k_per_split, split,
        HAS_SCALES=scales is not None, HAS_BIAS=bias is not None, SPLIT_K=split > 1,
        EVEN_K=K % tiles.block_k == 0, BLOCK_M=M, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, NUM_STAGES=tiles.num_stages, SILU_MUL_X=silu_mul_x, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **_pdl_launch(x.device),
    )
    return out


def _pdl_launch(device: torch.device) -> dict:
    """The launch arguments for programmatic dependent launch where ops.pdl enables it, else none."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl.enabled(device) else {}
