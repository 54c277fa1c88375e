"""Pure-torch reference for weight-only quantized matmuls: 4-bit (AWQ and GPTQ on-disk layouts) and
int8 with per-output-channel scales (quantized at load).

It unpacks the int32 words into integers, dequantizes to a float weight and multiplies: slow, but
it is the CPU path and the oracle the fused GPU kernels are checked against.

Both formats store 8 nibbles per int32, least significant nibble first, and dequantize as
``w = (q - zero) * scale`` with one scale and one zero per (group of inputs, output):

- AWQ (AutoAWQ "GEMM"): ``qweight`` [in, out/8] and ``qzeros`` [in/group, out/8] pack along the
  output dim in AutoAWQ's interleaved order: nibble i of word c holds output ``8c + AWQ_ORDER[i]``.
  ``scales`` [in/group, out]. Zeros are stored as they are.
- GPTQ (AutoGPTQ / GPTQModel): ``qweight`` [in/8, out] packs 8 consecutive inputs per word,
  ``qzeros`` [groups, out/8] 8 consecutive outputs per word, ``scales`` [groups, out], and ``g_idx``
  [in] names each input's group (arbitrary with act-order). The "gptq" (v1) format stores
  ``zero - 1``: add 1 when unpacking; "gptq_v2" stores the zero itself.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed word holds output AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output j sits in nibble AWQ_REVERSE_ORDER[j]
PACK_FACTOR = 8  # 4-bit values per int32
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> int32 values in [0, 15], nibbles laid out sequentially along `dim` (8x longer)."""
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [..., 8] on a new last dim
    dim = dim % packed.ndim
    nibbles = nibbles.movedim(-1, dim + 1)  # each word's 8 values right after that word's index
    return nibbles.flatten(dim, dim + 1)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ qweight [in, out/8] or qzeros [groups, out/8] -> int32 [in or groups, out] in output order."""
    values = unpack_int4(packed, dim=-1)
    rows, cols = values.shape
    return values.view(rows, cols // PACK_FACTOR, PACK_FACTOR)[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, cols)


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """int values in [0, 15] -> int32 words of 8 consecutive values along `dim`, first in the low nibble."""
    dim = dim % values.ndim
    shape = list(values.shape)
    shape[dim : dim + 1] = [shape[dim] // PACK_FACTOR, PACK_FACTOR]
    nibbles = values.to(torch.int64).reshape(shape).movedim(dim + 1, -1)
    words = (nibbles << torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)).sum(-1)
    return words.to(torch.uint32).view(torch.int32)  # the top nibble's bit is the sign bit


def awq_to_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, rows_at_once: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's qweight [in, out/8] and qzeros [groups, out/8] -> GPTQ's qweight [in/8, out] and qzeros
    [groups, out/8] (zeros in output order, stored as they are: the "gptq_v2" convention). The
    same weight: AWQ is GPTQ without act-order, packed another way. `rows_at_once` input rows at a
    time (a multiple of 8), so the unpacked integers never take the whole layer's size."""
    parts = [pack_int4(unpack_awq(qweight[i : i + rows_at_once]), dim=0) for i in range(0, qweight.shape[0], rows_at_once)]
    return torch.cat(parts), pack_int4(unpack_awq(qzeros), dim=-1)


def sort_by_group(qweight: torch.Tensor, g_idx: torch.Tensor, group_size: int,
                  columns_at_once: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """A GPTQ act-order weight with its inputs reordered by group, as vLLM's exllama path shuffles it:
    (qweight [in/8, out] with its input rows in that order, g_idx sorted, the order [in], or None
    where the inputs were in order already); x gathered by the order, times it, is x times the
    weight. Each group's inputs are then contiguous (input k in group k // group_size), so kernels
    need no g_idx. None where the sorted inputs are not whole groups in order (a row-parallel
    rank's share of an act-order layer holds parts of groups). `columns_at_once` output columns are
    unpacked at a time, so the integers never take the whole layer's size."""
    order = torch.argsort(g_idx, stable=True)
    groups = g_idx[order]
    inputs = torch.arange(g_idx.numel(), device=g_idx.device)
    if not torch.equal(groups.long(), inputs // (g_idx.numel() if group_size == -1 else group_size)):
        return None
    if torch.equal(order, inputs):
        return qweight, groups, None
    parts = [pack_int4(unpack_int4(qweight[:, i : i + columns_at_once], dim=0)[order], dim=0)
             for i in range(0, qweight.shape[1], columns_at_once)]
    return torch.cat(parts, dim=1), groups, order


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [in, out] of an AWQ GEMM layer."""
    q, zeros = unpack_awq(qweight), unpack_awq(qzeros)
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros[groups]).float() * scales[groups].float()


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    zeros_minus_one: bool = True) -> torch.Tensor:
    """The float32 weight [in, out] of a GPTQ layer; `zeros_minus_one` for the v1 ("gptq") format."""
    q = unpack_int4(qweight, dim=0)
    zeros = unpack_int4(qzeros, dim=-1) + int(zeros_minus_one)
    groups = g_idx.long()
    return (q - zeros[groups]).float() * scales[groups].float()


def _matmul(x: torch.Tensor, weight_in_out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight_in_out.to(x.dtype)
    return out if bias is None else out + bias


def awq_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequantized AWQ weight -> [..., out] in x's dtype."""
    return _matmul(x, dequantize_awq(qweight, qzeros, scales, group_size), bias)


def gptq_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, zeros_minus_one: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequantized GPTQ weight -> [..., out] in x's dtype."""
    return _matmul(x, dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_minus_one), bias)


INT8_MAX = 127  # symmetric: -127..127, so that w and -w quantize alike


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], scale [out] in `scale_dtype`), symmetric per output channel.

    The scale is max|w| / 127 over the inputs; weights are divided by the scale as stored (rounded to
    `scale_dtype`), so dequantizing gives the nearest representable weight.
    """
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).to(scale_dtype)
    divisor = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # an all-zero row stays zero
    return torch.round(w / divisor).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 weight [out, in] and per-output scale [out] -> the weight [out, in] in the scale's dtype."""
    return weight.to(scale.dtype) * scale[:, None]


def int8_matmul_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ (int8 weight [out, in] * scale [out]).T -> [..., out] in x's dtype."""
    return torch.nn.functional.linear(x, dequantize_int8(weight, scale).to(x.dtype), bias)
