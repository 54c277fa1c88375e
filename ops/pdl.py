"""Programmatic dependent launch (PDL, Hopper and later), off unless ENGINE_PDL=1: not yet measured.

A kernel launched with PDL (Triton: `launch_pdl=True`) may start while the kernel before it in the stream
is still running, once every program of that one has signalled (`gdc_launch_dependents`) or exited. Until
it calls `gdc_wait`, which returns when the kernel before it has finished and its writes are visible, it
may only touch memory no earlier kernel writes: a weight. So a GEMV can stream its first weight tiles
during the previous kernel's last microseconds instead of after them. At batch 1 a Llama-3.1-8B decode
step runs ~130 GEMVs, at 84% of peak bandwidth (perf/RESULTS.md, session 19). Stream capture (CUDA
12.3 and later) keeps these launches as programmatic edges in the CUDA graphs.

The rules every kernel here keeps, so any chain of them (and torch inductor's own PDL code,
TORCHINDUCTOR_ENABLE_PDL, which skips its wait when it reads nothing its predecessor wrote) stays
correct:
- a kernel launched with PDL calls `gdc_wait` in every program before it reads or writes anything
  but weights; then each finished kernel implies that all kernels before it finished too;
- it signals its dependents only after that wait. A kernel launched without PDL started after the one
  before it had finished, so it may signal anywhere; `_decode_reduce_kernel` signals first thing.
"""

from __future__ import annotations

import functools
import os

import torch

ENABLED = os.environ.get("ENGINE_PDL") == "1"


@functools.cache
def _capable(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` use PDL: ENGINE_PDL=1, a CUDA device of compute capability 9.0 or
    later, and not Triton's interpreter (which has no `gdc_wait`)."""
    return (ENABLED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and _capable(device.index))
