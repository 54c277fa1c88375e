"""Triton weight-only quantized matmuls: y = x @ W for 4-bit AWQ / GPTQ weights and int8 weights,
dequantized INSIDE the kernel, one K-tile at a time in registers (no full-size float weight is ever
made). The layouts are those of `ops.quant_ref`, the pure-torch oracle these kernels are tested against.

One kernel, `_quant_matmul_kernel`, serves the three formats (a constexpr `FORMAT` picks how a
[BLOCK_K, BLOCK_N] tile of W is loaded and dequantized) and both shapes of problem:

- GEMM (M > GEMV_MAX_M rows): BLOCK_M x BLOCK_N output tiles, a loop over K in BLOCK_K steps, each
  step dequantizing W's K-tile and feeding it with x's K-tile to `tl.dot` (fp32 accumulator).
- GEMV-shaped (M <= GEMV_MAX_M, i.e. decode): BLOCK_M = 16 (the smallest `tl.dot`) and split-K:
  K is cut into `split` ranges, one program per (output tile, range), so that a batch of one still
  has about two programs per SM; each writes an fp32 partial [split, M, N] and torch sums them.

Dequantization is exactly the reference's: ``w = float32(q - zero) * float32(scale)``, rounded to x's
dtype, then multiplied in `tl.dot` with fp32 accumulation. For 4-bit formats the K-tile never spans
two groups (BLOCK_K <= group size, which is a power of two), so one row of zeros and scales serves
the whole tile. GPTQ act-order is the exception: every input row has its own group (`g_idx`), and
zeros and scales are gathered per row.

- AWQ: qweight int32 [K, N/8]: output n is nibble ``(n % 8) // 2 + 4 * (n % 2)`` of word n // 8
  (AutoAWQ's interleave 0,2,4,6,1,3,5,7); qzeros [K/group, N/8] the same; scales [K/group, N].
- GPTQ: qweight int32 [K/8, N]: input k is nibble k % 8 of word k // 8; qzeros [groups, N/8] with
  output n in nibble n % 8; scales [groups, N]; the v1 format stores zero - 1 (ZERO_OFFSET = 1).
- int8: weight [N, K] with one scale per output: the scale is applied to the fp32 accumulator after
  the K loop (it is constant along K), so W's tile is just the int8 values converted.

Tile sizes are fixed per shape class (no autotuning: deterministic, and no benchmarking at start-up).
No function here syncs with the host, so the kernels can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

AWQ: tl.constexpr = tl.constexpr(0)
GPTQ: tl.constexpr = tl.constexpr(1)
INT8: tl.constexpr = tl.constexpr(2)

GEMV_MAX_M = 16  # batches up to this many rows take the split-K path
_PROGRAMS_PER_SM = 2  # split-K aims for this many programs per SM
_INTERPRETER_PROGRAMS = 8  # CPU (Triton interpreter): enough to exercise split-K in tests


@triton.jit
def _zeros_and_scales(zeros_ptr, scales_ptr, groups, rn, N, zero_shifts, ZERO_OFFSET: tl.constexpr):
    """Zeros (int32) and scales (fp32) of `groups` for outputs rn: [BLOCK_N] for one group (a scalar),
    [BLOCK_K, BLOCK_N] for one group per row ([BLOCK_K, 1], act-order)."""
    n_mask = rn < N
    words = tl.load(zeros_ptr + groups * (N // 8) + rn // 8, mask=n_mask, other=0)
    zeros = ((words >> zero_shifts) & 0xF) + ZERO_OFFSET
    scales = tl.load(scales_ptr + groups * N + rn, mask=n_mask, other=0.0).to(tl.float32)
    return zeros, scales


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
    M, N, K, group_size, stride_xm, k_per_split,
    FORMAT: tl.constexpr, ZERO_OFFSET: tl.constexpr, ACT_ORDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    if FORMAT == AWQ:
        n_shifts = ((rn % 8) // 2 + (rn % 2) * 4) * 4  # AutoAWQ's interleaved nibble of output n
    else:
        n_shifts = (rn % 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        if FORMAT == INT8:
            w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=w_mask, other=0)
        else:
            if ACT_ORDER:
                groups = tl.load(g_idx_ptr + rk, mask=k_mask, other=0)[:, None]
            else:
                groups = k0 // group_size  # the whole tile lies in one group
            zeros, scales = _zeros_and_scales(zeros_ptr, scales_ptr, groups, rn, N, n_shifts, ZERO_OFFSET)
            if FORMAT == AWQ:
                words = tl.load(w_ptr + rk[:, None] * (N // 8) + (rn // 8)[None, :], mask=w_mask, other=0)
                q = (words >> n_shifts[None, :]) & 0xF
            else:
                words = tl.load(w_ptr + (rk // 8)[:, None] * N + rn[None, :], mask=w_mask, other=0)
                q = (words >> ((rk % 8) * 4)[:, None]) & 0xF
            w = (q - zeros).to(tl.float32) * scales
        acc += tl.dot(x, w.to(x.dtype))
    if FORMAT == INT8:
        acc *= tl.load(scales_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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
    """x [..., K] @ (int8 weight [N, K] * scale [N]).T -> [..., N] in x's dtype (into `out` if given)."""
    N, K = weight.shape
    return _quant_matmul(x, weight, None, scale, None, N, K, INT8, None, 0, bias, out)


def _quant_matmul(x: torch.Tensor, weight: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor,
                  g_idx: torch.Tensor | None, N: int, K: int, fmt: int, group_size: int | None,
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
    block_m, block_n, block_k, num_warps = _tiles(M)
    if g_idx is None and group_size is not None and group_size < K:
        block_k = min(block_k, group_size)  # one group per K-tile (group sizes are powers of two >= 32)
    num_programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split = _split_k(num_programs, K, block_k, x.device) if M <= GEMV_MAX_M else 1
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    target = out2 if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _quant_matmul_kernel[(num_programs, split)](
        x2, weight, zeros if zeros is not None else scales, scales, g_idx if g_idx is not None else scales, target,
        M, N, K, group_size or K, x2.stride(0), k_per_split,
        FORMAT=fmt, ZERO_OFFSET=zero_offset, ACT_ORDER=g_idx is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=3,
    )
    if split > 1:
        out2.copy_(target.sum(dim=0))
    if bias is not None:
        out2 += bias
    return out


def _tiles(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a batch of M rows."""
    if M <= GEMV_MAX_M:
        return 16, 64, 128, 4
    if M <= 64:
        return 64, 128, 64, 4
    return 128, 128, 64, 8


def _split_k(num_programs: int, K: int, block_k: int, device: torch.device) -> int:
    """How many K ranges to cut each output tile's loop into, so that ~2 programs run per SM."""
    target = _PROGRAMS_PER_SM * _num_sms(device.index) if device.type == "cuda" else _INTERPRETER_PROGRAMS
    return max(1, min(target // num_programs, triton.cdiv(K, block_k)))


@functools.cache
def _num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
