"""The quantized linear layers' matmuls as torch custom ops, one per format, each picking its
implementation by device: the Triton kernels of `ops.triton_quant` on CUDA, the dequantize-then-
matmul reference of `ops.quant_ref` elsewhere (the CPU path, and what CI runs).

Being custom ops keeps them opaque to torch.compile (as `engine::paged_attention` is): dynamo does
not trace the kernels' host-side tile choices, and bitsandbytes' LLM.int8() matmul, whose outlier
columns have a data-dependent count, does not break the full graph.

- ``torch.ops.engine.awq_matmul(x, qweight, qzeros, scales, group_size, bias)``
- ``torch.ops.engine.gptq_matmul(x, qweight, qzeros, scales, g_idx, group_size, act_order, zeros_minus_one, bias)``
- ``torch.ops.engine.swapab_matmul(x, packed, qzeros, scales, group_size, zeros_minus_one, bias)``: a GPTQ-layout
  4-bit weight (no act-order) whose qweight `ops.gluon_swapab.repack_swapab` rearranged at load
  (`ENGINE_SWAPAB_GEMM=1`): the swap-AB Gluon GEMM on an sm_90 GPU (from ENGINE_DEQUANT_GEMM_ROWS rows, where set,
  the layer dequantized by `ops.triton_quant.dequantize_swapab` and multiplied by cuBLAS), the reference (the nibbles
  read back) elsewhere.
- ``torch.ops.engine.dual_4bit_matmul(x, qweight, packed, qzeros, scales, group_size, zeros_minus_one, bias)``: a
  GPTQ-layout 4-bit weight (no act-order) kept in both orders (`ENGINE_SWAPAB_GEMM=auto`, where the copy fits):
  on an sm_90 GPU below `DUAL_SWAPAB_MIN_ROWS` rows GPTQ's kernels on qweight (the planar GEMV at 1-2 rows), from
  there `swapab_matmul`'s path on `packed`; the reference on qweight elsewhere.
- ``torch.ops.engine.int8_matmul(x, weight, scale, bias)``
- ``torch.ops.engine.bnb_int8_matmul(x, weight, SCB, threshold, bias)``: LLM.int8() through
  bitsandbytes on any device (its CPU and CUDA builds), exactly as transformers' Linear8bitLt calls it.

Each returns [..., out] in x's dtype.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch

from ops import quant_ref


def _triton_quant():
    """ops.triton_quant, imported on first CUDA use: Triton is not installed on CPU-only machines."""
    return importlib.import_module("ops.triton_quant")


def _output_like(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("engine::awq_matmul", mutates_args=())
def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.is_cuda:
        return _triton_quant().awq_matmul(x, qweight, qzeros, scales, group_size, bias)
    return quant_ref.awq_matmul_ref(x, qweight, qzeros, scales, group_size, bias)


@awq_matmul.register_fake
def _(x, qweight, qzeros, scales, group_size, bias):
    return _output_like(x, qweight.shape[1] * quant_ref.PACK_FACTOR)


@torch.library.custom_op("engine::gptq_matmul", mutates_args=())
def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, group_size: int, act_order: bool, zeros_minus_one: bool,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.is_cuda:
        return _triton_quant().gptq_matmul(x, qweight, qzeros, scales, g_idx, group_size, act_order, zeros_minus_one,
                                           bias)
    return quant_ref.gptq_matmul_ref(x, qweight, qzeros, scales, g_idx, zeros_minus_one, bias)


@gptq_matmul.register_fake
def _(x, qweight, qzeros, scales, g_idx, group_size, act_order, zeros_minus_one, bias):
    return _output_like(x, qweight.shape[1])


def _swapab_cuda(x, packed, qzeros, scales, group_size: int, zeros_minus_one: bool, bias):
    """The repacked weight's product on an sm_90 GPU: the swap-AB Gluon GEMM, or from ENGINE_DEQUANT_GEMM_ROWS rows
    (prefill-sized steps, where set) the layer dequantized into a scratch, then cuBLAS."""
    from ops import gluon_swapab

    triton_quant = _triton_quant()
    if x.dtype in (torch.bfloat16, torch.float16) and 0 < triton_quant.DEQUANT_GEMM_ROWS <= x.numel() // x.shape[-1]:
        weight = triton_quant.dequantize_swapab(packed, qzeros, scales, group_size, int(zeros_minus_one), x.dtype)
        return x @ weight if bias is None else torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(
            *x.shape[:-1], -1)
    return gluon_swapab.swapab_gptq_matmul(x, packed, qzeros, scales, group_size, int(zeros_minus_one), bias)


def _in_order_groups(K: int, group_size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(K, device=device) // (K if group_size == -1 else group_size)


@torch.library.custom_op("engine::swapab_matmul", mutates_args=())
def swapab_matmul(x: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                  zeros_minus_one: bool, bias: Optional[torch.Tensor]) -> torch.Tensor:
    from ops import gluon_swapab

    if x.is_cuda:
        return _swapab_cuda(x, packed, qzeros, scales, group_size, zeros_minus_one, bias)
    qweight = quant_ref.pack_int4(gluon_swapab.unpack_swapab(packed), dim=0)
    g_idx = _in_order_groups(qweight.shape[0] * quant_ref.PACK_FACTOR, group_size, x.device)
    return quant_ref.gptq_matmul_ref(x, qweight, qzeros, scales, g_idx, zeros_minus_one, bias)


@swapab_matmul.register_fake
def _(x, packed, qzeros, scales, group_size, zeros_minus_one, bias):
    return _output_like(x, scales.shape[-1])


# Rows from which a layer kept in both orders takes the swap-AB GEMM: below, GPTQ's kernels (1-2 rows: the planar
# GEMV, 2.7x faster than swap-AB at one row on 70B's shapes; from 16 rows swap-AB beat the tl tiles, session 21).
DUAL_SWAPAB_MIN_ROWS = 3


@torch.library.custom_op("engine::dual_4bit_matmul", mutates_args=())
def dual_4bit_matmul(x: torch.Tensor, qweight: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor,
                     scales: torch.Tensor, group_size: int, zeros_minus_one: bool,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.is_cuda:
        if x.numel() // x.shape[-1] >= DUAL_SWAPAB_MIN_ROWS:
            return _swapab_cuda(x, packed, qzeros, scales, group_size, zeros_minus_one, bias)
        # groups in input order: no act-order, so the kernels read no g_idx
        return _triton_quant().gptq_matmul(x, qweight, qzeros, scales, None, group_size, False, zeros_minus_one, bias)
    g_idx = _in_order_groups(qweight.shape[0] * quant_ref.PACK_FACTOR, group_size, x.device)
    return quant_ref.gptq_matmul_ref(x, qweight, qzeros, scales, g_idx, zeros_minus_one, bias)


@dual_4bit_matmul.register_fake
def _(x, qweight, packed, qzeros, scales, group_size, zeros_minus_one, bias):
    return _output_like(x, scales.shape[-1])


@torch.library.custom_op("engine::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.is_cuda:
        return _triton_quant().int8_matmul(x, weight, scale, bias)
    return quant_ref.int8_matmul_ref(x, weight, scale, bias)


@int8_matmul.register_fake
def _(x, weight, scale, bias):
    return _output_like(x, weight.shape[0])


@torch.library.custom_op("engine::bnb_int8_matmul", mutates_args=())
def bnb_int8_matmul(x: torch.Tensor, weight: torch.Tensor, SCB: torch.Tensor, threshold: float,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    import bitsandbytes as bnb  # an optional dependency (the "bnb" extra)

    # It warns on every call that a bf16/fp32 input is cast to fp16 to be quantized: expected here.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    state = bnb.MatmulLtState()
    state.CB, state.SCB, state.threshold = weight, SCB, threshold
    state.has_fp16_weights, state.is_training = False, False
    return bnb.matmul(x, weight, bias=bias, state=state)


@bnb_int8_matmul.register_fake
def _(x, weight, SCB, threshold, bias):
    return _output_like(x, weight.shape[0])
