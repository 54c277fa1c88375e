"""Host-to-device copies that do not stall the host.

A copy from ordinary (pageable) host memory makes CUDA wait until the stream has drained before
it copies: the host then sits idle until every kernel queued before the copy has run, so the
next step's inputs cannot be prepared while the current step runs (async scheduling gains
nothing) and the GPU idles while the host prepares. From pinned (page-locked) memory the copy is
queued like a kernel and the call returns at once. torch's caching host allocator reuses the
pinned blocks and keeps each alive until its copy has finished.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

POLL_S = 50e-6  # how often a wait that can be abandoned looks at the device (~0.1 ms with the OS's sleep)


def host_to_device(data: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`data` (a list, a numpy array or a CPU tensor) as a `dtype` tensor on `device`, queued
    without waiting for the device (through pinned memory on CUDA)."""
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """Device tensors on their way to pinned host memory: the copies are queued on the stream now
    and `wait()` blocks only until they have landed.

    Reading a device tensor directly (`.tolist()`, `.cpu()`) queues the copy behind everything
    already on the stream: with async scheduling that is the next step's forward, so the host would
    wait for step N+1 to read step N's tokens. Queued right after step N's sampling, the copy is
    ready as soon as step N is.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        self.event = None
        if not tensors or tensors[0].device.type != "cuda":
            self.tensors = tensors
            return
        self.tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self, give_up: threading.Event | None = None) -> list[torch.Tensor]:
        """The host copies, once they have landed. With `give_up` the host polls the device instead
        of blocking and raises RuntimeError once the event is set: with tensor parallelism, a worker
        that failed in the middle of a step can leave this GPU waiting forever at an all-reduce's
        barrier (the custom all-reduce's, which no NCCL abort ends)."""
        if self.event is None:
            return self.tensors
        if give_up is None:
            self.event.synchronize()
            return self.tensors
        while not self.event.query():
            if give_up.is_set():
                raise RuntimeError("gave up waiting for the device: another tensor-parallel rank failed")
            time.sleep(POLL_S)
        return self.tensors
