"""The swap-AB Gluon GEMM for 4-bit layers in GPTQ's layout (AWQ after its repack, GPTQ without act-order), set by
`ENGINE_SWAPAB_GEMM`:

- `auto` (the default): where a second copy of the 4-bit weights fits in `AUTO_COPY_FRACTION` of the GPU's memory
  (Llama-3.1-8B on an 80 GB card: 3.3 GiB), each layer keeps GPTQ's qweight AND a copy in
  `ops.gluon_swapab.repack_swapab`'s order (`swapab_packed`); its matmuls run as `torch.ops.engine.dual_4bit_matmul`:
  GPTQ's kernels at 1-2 rows (the planar GEMV: batch-1 latency), the swap-AB GEMM from 3. Models whose copy does not
  fit (Llama-3.1-70B: 34 GiB) stay on GPTQ's kernels.
- `1`: qweight replaced by its repacked words (no extra memory), every batch size through the swap-AB GEMM
  (`torch.ops.engine.swapab_matmul`). For large models at high batch: Llama-3.1-70B AWQ `fixed` 1000 x 128 x 512 on
  one H100 5.38 req/s against 3.52 on GPTQ's kernels (perf/RESULTS.md, session 22), but at one row it costs 2.7x the
  GEMV.
- `0`: GPTQ's kernels only.

On the swap-AB GEMM (perf/notes/gluon_swapab.md): the weight dequantized straight into wgmma's register operand, a
70B layer's four matmuls at 256 rows in 768 us against the tl kernels' 1,261 and bf16 cuBLAS's 678. It needs Gluon
(Triton 3.6) and an sm_90 GPU: elsewhere `1` runs its reference and `auto` keeps no copy. With
ENGINE_DEQUANT_GEMM_ROWS set, steps of that many rows or more dequantize the layer and use cuBLAS instead."""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODE = os.environ.get("ENGINE_SWAPAB_GEMM", "auto")
if MODE not in ("auto", "0", "1"):
    raise ValueError(f"ENGINE_SWAPAB_GEMM must be auto, 0 or 1, not {MODE!r}")
ENABLED = MODE == "1"  # every 4-bit layer replaced by its repacked words
AUTO_COPY_FRACTION = 0.06  # `auto`: the most of a GPU's memory the repacked copies may take
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


def plan_copies(model: nn.Module) -> None:
    """`auto`, before the layers' process_weights_after_loading: mark every 4-bit layer (`swapab_copy`) to keep a
    repacked copy if all the copies fit in AUTO_COPY_FRACTION of their GPU's memory (all or none: one model, one
    plan), on an sm_90 GPU with Gluon."""
    if MODE != "auto":
        return
    layers = [m for m in model.modules() if isinstance(getattr(m, "qweight", None), torch.Tensor)
              and m.qweight.dtype == torch.int32 and hasattr(m, "qzeros")]
    if not layers or not _copies_pay(layers[0].qweight.device):
        return
    copies = sum(m.qweight.numel() * m.qweight.element_size() for m in layers)
    budget = AUTO_COPY_FRACTION * _device_memory(layers[0].qweight.device)
    if copies > budget:
        logger.info(f"ENGINE_SWAPAB_GEMM=auto: 4-bit layers stay on GPTQ's kernels only (a swap-AB copy would take "
                    f"{copies / 2**30:.2f} GiB, over {AUTO_COPY_FRACTION:.0%} of the GPU; ENGINE_SWAPAB_GEMM=1 repacks "
                    "them in place instead)")
        return
    for m in layers:
        m.swapab_copy = True
    logger.info(f"ENGINE_SWAPAB_GEMM=auto: 4-bit layers keep a swap-AB copy ({copies / 2**30:.2f} GiB): 1-2 rows on "
                "GPTQ's kernels, more on the swap-AB Gluon GEMM")


def _copies_pay(device: torch.device) -> bool:
    """Does the swap-AB GEMM run here (an sm_90 GPU with Gluon)? Elsewhere a copy would only cost memory."""
    from ops import gluon_swapab

    return (device.type == "cuda" and gluon_swapab.HAVE_GLUON
            and torch.cuda.get_device_capability(device) == (9, 0))


def _device_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def _repacked(qweight: torch.Tensor) -> torch.Tensor:
    from ops import gluon_swapab

    parts = [gluon_swapab.repack_swapab(qweight[i : i + _REPACK_ROWS]) for i in range(0, qweight.shape[0], _REPACK_ROWS)]
    return torch.cat(parts)


def maybe_repack(layer: nn.Module, group_size: int) -> bool:
    """For a layer the GEMM takes: with ENGINE_SWAPAB_GEMM=1 qweight (GPTQ's [K/8, N]) repacked in place of itself
    (`layer.swapab`, `layer.swapab_group` set); with `auto` and a plan that keeps copies, the repacked copy beside it
    (`layer.swapab_packed`, `layer.swapab_group`). Returns whether it did either."""
    if not (ENABLED or getattr(layer, "swapab_copy", False)):
        return False
    qweight = layer.qweight.data
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if not repackable(K, N, group_size, qweight.device):
        _log_once(f"ENGINE_SWAPAB_GEMM={MODE}: a {K} x {N} layer (group {group_size}) stays on GPTQ's layout alone "
                  "(the swap-AB GEMM does not take its shape or this device)")
        return False
    layer.swapab_group = group_size
    if ENABLED:
        layer.qweight = nn.Parameter(_repacked(qweight), requires_grad=False)
        layer.swapab = True
        _log_once("ENGINE_SWAPAB_GEMM=1: 4-bit layers repacked for the swap-AB Gluon GEMM (every batch size runs it)")
    else:
        layer.swapab_packed = nn.Parameter(_repacked(qweight), requires_grad=False)
    return True


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)
