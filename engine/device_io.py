"""Host-to-device copies that do not stall the host.

A copy from ordinary (pageable) host memory makes CUDA wait until the stream has drained before
it copies: the host then sits idle until every kernel queued before the copy has run, so the
next step's inputs cannot be prepared while the current step runs (async scheduling gains
nothing) and the GPU idles while the host prepares. From pinned (page-locked) memory the copy is
queued like a kernel and the call returns at once. torch's caching host allocator reuses the
pinned blocks and keeps each alive until its copy has finished.
"""

from __future__ import annotations

from typing import Any

import torch


def host_to_device(data: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`data` (a list, a numpy array or a CPU tensor) as a `dtype` tensor on `device`, queued
    without waiting for the device (through pinned memory on CUDA)."""
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
