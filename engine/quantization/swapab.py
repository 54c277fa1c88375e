"""`ENGINE_SWAPAB_GEMM=1` (off by default): 4-bit layers in GPTQ's layout (AWQ after its repack, GPTQ without
act-order) keep their qweight in `ops.gluon_swapab.repack_swapab`'s order instead, and every matmul of theirs runs
as `torch.ops.engine.swapab_matmul`: on an sm_90 GPU the swap-AB Gluon GEMM (the weight dequantized straight into
wgmma's register operand; perf/notes/gluon_swapab.md), elsewhere the reference. The repacked words replace GPTQ's
(the same bytes), so the small-batch kernels of `ops.triton_quant`, which read GPTQ's order, are not used for these
layers: every batch size goes through the swap-AB GEMM (from ENGINE_DEQUANT_GEMM_ROWS rows, where that is set, the
layer is dequantized by `ops.triton_quant.dequantize_swapab` and multiplied by cuBLAS instead).

On the H100 (perf/RESULTS.md, session 21) it took Llama-3.1-70B AWQ `fixed` 1000 x 128 x 512 from 3.52 to 4.86 req/s:
a 70B layer's four matmuls at 256 rows in 883 us against the tl kernel's 1,261 (bf16 cuBLAS: 664). It stays off by
default because one row costs 2.7x the planar GEMV's (474 against 174 us a 70B layer), and the two orders cannot
both be kept without doubling the weights' memory."""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("ENGINE_SWAPAB_GEMM", "0") == "1"
_REPACK_ROWS = 128  # qweight rows (1,024 inputs) repacked at a time: the unpacked nibbles never take a whole layer


def repackable(K: int, N: int, group_size: int, device: torch.device) -> bool:
    """Does the swap-AB GEMM take this layer (shapes; on CUDA also Gluon and an sm_90 GPU)?"""
    from ops import gluon_swapab

    group = K if group_size == -1 else group_size
    block_k = min(gluon_swapab.MAX_BLOCK_K, group)
    shapes_ok = (K % gluon_swapab.REPACK_K == 0 and N % gluon_swapab.BLOCK_N == 0 and group >= 32
                 and not group & (group - 1) and K % group == 0 and K % (2 * block_k) == 0)
    if device.type != "cuda":
        return shapes_ok
    return shapes_ok and gluon_swapab.HAVE_GLUON and torch.cuda.get_device_capability(device) == (9, 0)


def maybe_repack(layer: nn.Module, group_size: int) -> bool:
    """With ENGINE_SWAPAB_GEMM=1 and a layer the GEMM takes: qweight (GPTQ's [K/8, N]) repacked in place of itself,
    `layer.swapab` and `layer.swapab_group` set. Returns whether it did."""
    if not ENABLED:
        return False
    from ops import gluon_swapab

    qweight = layer.qweight.data
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if not repackable(K, N, group_size, qweight.device):
        _log_once(f"ENGINE_SWAPAB_GEMM=1: a {K} x {N} layer (group {group_size}) stays in GPTQ's layout "
                  "(the swap-AB GEMM does not take its shape or this device)")
        return False
    parts = [gluon_swapab.repack_swapab(qweight[i : i + _REPACK_ROWS]) for i in range(0, qweight.shape[0], _REPACK_ROWS)]
    layer.qweight = nn.Parameter(torch.cat(parts), requires_grad=False)
    layer.swapab, layer.swapab_group = True, group_size
    _log_once("ENGINE_SWAPAB_GEMM=1: 4-bit layers repacked for the swap-AB Gluon GEMM (every batch size runs it)")
    return True


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)
