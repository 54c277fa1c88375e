"""`torch.ops.engine.linear(x, weight, bias)`: the dense linear layers' matmul, F.linear except at
decode batch sizes on a GPU, where a Triton GEMV (`ops.triton_linear`) streams the weight faster
than cuBLAS does at one or two rows.

A custom op, so the choice by row count happens when it runs: inside torch.compile a Python branch
on the (dynamic) batch size would be a guard, and the model would compile a second time for the
small buckets. The op costs a few microseconds of dispatch a call, which CUDA graphs remove from
decode steps.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

SMALL_M_MAX = 4  # rows up to this take the GEMV on CUDA (decode buckets 1, 2 and 4)
_GEMV_DTYPES = (torch.bfloat16, torch.float16)


@torch.library.custom_op("engine::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.is_cuda and x.dim() == 2 and x.shape[0] <= SMALL_M_MAX and weight.dtype in _GEMV_DTYPES:
        return importlib.import_module("ops.triton_linear").small_m_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
