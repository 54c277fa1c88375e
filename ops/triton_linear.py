"""A Triton GEMV for dense linear layers at decode batch sizes: y = x @ W.T (+ bias) for x [M, K] with
M <= SMALL_M_MAX rows and W [N, K] in bf16 / fp16, row-major.

Why: at one or two rows a linear layer only streams its weight, so it should run at memory
bandwidth. cuBLAS does for Llama-3.1-8B's gate_up (2.9 TB/s on an H100 at M = 2) but not for its
q/k/v, o and down projections (1.6-1.9 TB/s, perf/RESULTS.md, session 3 profile), which is about
1.3 ms of a 6.4 ms batch-1 decode step.

Each program owns BLOCK_N output features: it streams their weight rows [BLOCK_N, BLOCK_K] along K
(contiguous, so 16-byte loads), multiplies them by x's K-slice for every row of x, and sums along K
into an fp32 accumulator [BLOCK_M, BLOCK_N]. No tensor cores (M is tiny), no split-K (N / BLOCK_N
programs already fill the GPU for the shapes this serves), nothing read back on the host: safe to
capture in CUDA graphs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ops.linear import SMALL_M_MAX


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_mask[:, None], other=0.0)
        else:
            k_mask = k < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # [BLOCK_M, 1, BLOCK_K] * [1, BLOCK_N, BLOCK_K], summed over K
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv_tiles(M: int, N: int, K: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): tiles of 8 KiB or more of weight a loop step, with at least
    about four programs per SM so that enough loads are in flight."""
    block_k = 512 if K >= 512 else triton.next_power_of_2(K)
    block_n = 32
    while block_n > 4 and triton.cdiv(N, block_n) < 4 * num_sms:
        block_n //= 2
    return block_n, block_k, 4


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (M <= SMALL_M_MAX) @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype (into `out`
    if given). `tiles` overrides the (BLOCK_N, BLOCK_K, num_warps) choice (benchmarks)."""
    M, K = x.shape
    N = weight.shape[0]
    if M > SMALL_M_MAX or weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"small_m_linear takes x [<= {SMALL_M_MAX}, K] and a row-major weight [N, K]; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)} strides {weight.stride()}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_n, block_k, num_warps = tiles or gemv_tiles(M, N, K, _num_sms(x.device))
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, out,
        M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0,
        BLOCK_M=max(triton.next_power_of_2(M), 1), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index) if device.type == "cuda" else 8  # the interpreter: a few programs


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
