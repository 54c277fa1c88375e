"""The dense linear layers' matmul: decode's smallest batches through the Triton GEMV (ops.triton_gemv) on
CUDA, everything else through F.linear (cuBLAS on CUDA; every CPU call, which is what CI runs).
`silu_mul_dense_linear` is the same for an MLP's down projection, with the SwiGLU activation before it.

`dense_linear(x, weight, bias)` is what the model's unquantized linear layers and the LM head call.
Inside torch.compile it goes through the custom op ``torch.ops.engine.dense_linear``, so the compiled
graph keeps it opaque (as `engine::paged_attention`) and the row count is looked at when it runs, in
each CUDA graph's capture; outside (eager steps, the LM head) it calls the implementation directly,
without the custom op's dispatch cost.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F

# Devices whose small batches take the GEMV: CUDA where Triton is. () (or ENGINE_GEMV=0 in the environment, which
# reaches a server's engine process too) sends everything to F.linear, to measure cuBLAS alone.
GEMV_DEVICES = ("cuda",) if importlib.util.find_spec("triton") and os.environ.get("ENGINE_GEMV") != "0" else ()
GEMV_DTYPES = (torch.bfloat16, torch.float16)
# The MLP's SwiGLU activation inside the down projection's op (silu_mul_dense_linear, session 16); ENGINE_SILU_IN_GEMV=0
# leaves it to torch (torch.compile fuses it), as before, to measure the two against each other.
SILU_IN_LINEAR = os.environ.get("ENGINE_SILU_IN_GEMV") != "0"


def _gemv_module():
    """ops.triton_gemv, imported on first CUDA use: Triton is not installed on CPU-only machines."""
    return importlib.import_module("ops.triton_gemv")


@functools.cache
def _capable(device: torch.device) -> bool:
    """bf16 needs sm_80 in Triton; older cards keep cuBLAS for every dtype."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type not in GEMV_DEVICES or weight.dtype not in GEMV_DTYPES or x.dtype != weight.dtype:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= _gemv_module().MAX_ROWS and weight.shape[0] > 0 and weight.stride(1) == 1
            and _capable(x.device))


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if takes_gemv(x, weight):
        return _gemv_module().gemv(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.library.custom_op("engine::dense_linear", mutates_args=())
def _dense_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _dense_linear(x, weight, bias)


@_dense_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T + bias -> [..., out], as F.linear."""
    if x.device.type not in GEMV_DEVICES:
        return F.linear(x, weight, bias)  # decided while tracing too: CPU graphs keep aten's linear
    if torch.compiler.is_compiling():
        return _dense_linear_op(x, weight, bias)
    return _dense_linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where x is a fused [..., 2 * d] gate_up projection's output."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _silu_mul_dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    gemv = _gemv_module()
    if takes_gemv(x[..., : x.shape[-1] // 2], weight):
        return gemv.gemv(x, weight, bias, silu_mul_x=True)
    return F.linear(gemv.silu_mul(x), weight, bias)


@torch.library.custom_op("engine::silu_mul_dense_linear", mutates_args=())
def _silu_mul_dense_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _silu_mul_dense_linear(x, weight, bias)


@_silu_mul_dense_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def silu_mul_dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dense_linear(silu_and_mul(x), weight, bias) for a gate_up output x [..., 2 * in]. On CUDA one
    kernel at decode's smallest batches (the activation made in the GEMV's x load: one launch and one
    round trip through memory less a layer), else a one-kernel activation and F.linear."""
    if x.device.type not in GEMV_DEVICES:
        return F.linear(silu_and_mul(x), weight, bias)
    if not SILU_IN_LINEAR:
        return dense_linear(silu_and_mul(x), weight, bias)
    if torch.compiler.is_compiling():
        return _silu_mul_dense_linear_op(x, weight, bias)
    return _silu_mul_dense_linear(x, weight, bias)
