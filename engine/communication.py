"""The all-reduce of the tensor-parallel layers (row-parallel outputs, the vocab-parallel embedding).

`all_reduce(x)` is torch.distributed's (NCCL on CUDA, gloo on CPU) unless the engine has set up the
custom all-reduce, which it does on CUDA with 2 or more ranks (vLLM does the same; `--disable-custom-all-reduce`
keeps NCCL): PyTorch's symmetric-memory one-shot kernel, `torch.ops.symm_mem.one_shot_all_reduce_copy_out`.
Every rank maps every other rank's copy of one buffer (`symm_mem.empty` + `rendezvous`); the kernel
copies this rank's tensor into its buffer, meets the other ranks at a barrier in GPU memory, reads
and sums all the buffers over NVLink, and meets them again. One kernel and two barriers, against
NCCL's protocol and ring steps: a batch-1 decode step of Llama-3.1-8B at TP=2 all-reduces 65 tensors
of 8 KiB, where latency is all there is. Tensors larger than the buffer and dtypes the kernel does
not sum (it takes float32 and bfloat16) go to NCCL inside the same op.

The model's all-reduces are each followed by a residual add and an RMSNorm: `all_reduce_add_rms_norm`
does the three in one kernel of ours (ops.triton_allreduce) on the same buffer, by default the
Lamport variant (no barrier: values pushed into the peers' buffers); `ENGINE_FUSED_ALLREDUCE=flags`
picks the barrier-based one (PyTorch's barrier on its signal pad), `=0` neither (the one-shot
all-reduce above, then the add and the norm, which torch.compile fuses). perf/RESULTS.md, sessions
16-17: Llama-3.1-8B batch-1 decode at TP=2 ran 1.43x TP=1 without it, 1.61x with it.

The ops are opaque to torch.compile (`engine::custom_all_reduce`, `engine::all_reduce_add_rms_norm`)
and are captured in the CUDA graphs like any kernel. Unlike NCCL's, these kernels' waits have no end
and no abort ends them: when a rank fails in the middle of a step, rank 0 stands in for it at the
barriers (`release_after_peer_failure`) so that its GPU can get through what was queued, and its
wait for sampled tokens polls instead of blocking (`HostCopy.wait`). Other host reads of device
values (prompt logprobs' `.tolist()`) still block until the GPU gets there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("engine")

# Up to this many bytes a tensor takes the one-shot kernel, above it NCCL. vLLM's custom all-reduce
# runs one-shot on 2 GPUs up to its whole 8 MiB buffer; PyTorch's own intra-node all-reduce switches
# to two-shot above 256 KiB. Decode steps all-reduce [batch, hidden] tensors: 2 MiB holds 256 rows
# of 4,096 bf16 values.
MAX_BYTES = 2 << 20
DTYPES = (torch.bfloat16, torch.float32)


class CustomAllReduce:
    """One symmetric-memory buffer (up to MAX_BYTES), mapped by every rank of the default group."""

    def __init__(self, buffer: torch.Tensor, handle, group_name: str, numel: int):
        # buffer_numel(numel, world) values: the first `numel` PyTorch's kernel's, then what the fused
        # kernel (ops.triton_allreduce) uses: two halves of `numel` ("flags"), then the Lamport kernel's
        # slots. One rendezvous, one signal pad: PyTorch's kernel and the "flags" one keep the same
        # protocol on it and each call's flags are all consumed, so they can follow each other in any order.
        kernel = fused_kernel()
        world, device = handle.world_size, buffer.device
        self.buffer = buffer[:numel]
        self.handle = handle  # the rendezvous: every rank's buffer and signal pad
        self.group_name = group_name
        self.region = numel  # the most values one fused call takes
        size = buffer.element_size()
        # Every rank's copy of `buffer`, as this process maps it: the handle's base addresses, plus where
        # the tensor starts in its allocation (0 for symm_mem.empty's own block; the same on every rank).
        bases = [p + buffer.data_ptr() - handle.buffer_ptrs[handle.rank] for p in handle.buffer_ptrs]
        self.flags_ptrs = torch.tensor([p + size * numel for p in bases], dtype=torch.int64, device=device)
        self.lamport_ptrs = torch.tensor([p + size * 3 * numel for p in bases], dtype=torch.int64, device=device)
        # [slot, source rank, value]: -0.0 marks "not written yet" (see ops.triton_allreduce)
        self.lamport = buffer[3 * numel:].view(kernel.SLOTS, world, numel)
        self.lamport.fill_(-0.0)
        self.signal_pad_ptrs = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        # Each kernel's counters (Lamport: each row's slot; flags: each program's half), so a test or
        # benchmark can switch between them (between calls every rank makes alike).
        self.states = {"flags": torch.zeros(kernel.GRID, dtype=torch.int32, device=device),
                       "lamport": torch.zeros(numel // 8, dtype=torch.int32, device=device)}  # a row each (hidden >= 8)
        # Where a Lamport kernel gave up waiting (only with a bounded `spin_limit`: tests)
        self.lamport_status = torch.zeros(8, dtype=torch.int32, device=device)
        self.lamport_hidden: int | None = None  # the row size its counters are for (fused_fits)
        self.spin_limit = kernel.FOREVER
        protocol = os.environ.get("ENGINE_FUSED_ALLREDUCE", "lamport")
        if protocol not in ("0", *kernel.PROTOCOLS):
            raise ValueError(f"ENGINE_FUSED_ALLREDUCE={protocol!r}: one of 0, {', '.join(kernel.PROTOCOLS)}")
        if protocol == "flags" and kernel.GRID * world * 4 > handle.signal_pad_size:
            protocol = "0"
        self.protocol: str | None = None if protocol == "0" else protocol  # tests and benchmarks may switch it

    @property
    def fused(self) -> bool:
        return self.protocol is not None

    @staticmethod
    def buffer_numel(numel: int, world_size: int) -> int:
        return 3 * numel + fused_kernel().lamport_buffer_numel(numel, world_size)

    def stand_in_for_peers(self, seconds: float) -> None:
        """After another rank has failed: release this GPU from every barrier of the kernels for
        `seconds`, by doing from the host, over and over on a stream of its own, what the peers'
        kernels would do there. A barrier's flag for block b from rank r sits at b * world_size + r
        in the waiting rank's signal pad: peer r sets ours to 1 (we wait for that) and clears the one
        we set in its pad (we wait for that before setting it again). The Lamport kernel waits for
        peer r's values to replace the -0.0 marks in our buffer: zeros do. The sums come out wrong, which
        no longer matters: the step has failed. Without this the GPU spins at the barrier for as
        long as the process lives, and so does whatever waits for it (session 15: rank 0's host,
        blocked in the next step's NCCL broadcast)."""
        handle, device = self.handle, self.buffer.device
        world, rank = handle.world_size, handle.rank
        slots = min(handle.signal_pad_size // 4, 256 * world) // world * world  # 256 blocks: the kernel runs at most 24
        # Views of the pads, [block, rank]: no index tensors, whose making would queue behind the
        # stuck kernel on the default stream (this thread's current stream until the `with`).
        own = handle.get_signal_pad(rank, [slots], torch.int32).view(-1, world)
        peers = [(r, handle.get_signal_pad(r, [slots], torch.int32).view(-1, world)) for r in range(world) if r != rank]
        engine_stream = torch.cuda.default_stream(device)  # where the engine's steps run
        stream = torch.cuda.Stream(device)
        deadline, idle_since = time.monotonic() + seconds, None
        with torch.cuda.stream(stream):
            while time.monotonic() < deadline:
                for r, pad in peers:
                    own[:, r].fill_(1)  # "peer r has arrived"
                    pad[:, rank].fill_(0)  # "peer r has seen us arrive"
                    self.lamport[:, r].fill_(0.0)  # "peer r's values have landed" (the Lamport kernel)
                stream.synchronize()
                # Done once the engine's stream has stayed empty for 0.2 s (nothing more comes after a failure).
                if engine_stream.query():
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 0.2:
                        return
                else:
                    idle_since = None
                time.sleep(2e-4)

    def fits(self, x: torch.Tensor) -> bool:
        # The kernel moves at least 4 bytes at a time.
        return x.dtype == self.buffer.dtype and x.numel() <= self.buffer.numel() and x.numel() * x.element_size() % 4 == 0

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x) if out is None else out
        symm = self.buffer[: x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, x, "sum", self.group_name, out)

    def fused_fits(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
        fits = (self.fused and x.dim() == 2 and self.fits(x) and x.numel() <= self.region
                and x.shape[-1] <= fused_kernel().MAX_HIDDEN
                and x.shape[-1] % 8 == 0  # 16-byte rows: the kernel's vector loads
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
                and weight.shape == x.shape[-1:] and weight.dtype == x.dtype)
        if fits and self.protocol == "lamport":
            # The Lamport kernel keeps a slot counter a row, and a row is `hidden` values of the buffer:
            # rows of another size would land across other rows' counters. The first size takes it (every
            # rank makes the same calls); others take the unfused path. (A model's norms share one size.)
            self.lamport_hidden = self.lamport_hidden or x.shape[-1]
            fits = x.shape[-1] == self.lamport_hidden
        return fits

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                eps: float, out: torch.Tensor, residual_out: torch.Tensor) -> None:
        """residual_out = all_reduce(x) (+ residual), out = RMSNorm(residual_out) * weight, in one kernel."""
        lamport = self.protocol == "lamport"
        fused_kernel().all_reduce_add_rms_norm(
            x.contiguous(), None if residual is None else residual.contiguous(), weight, eps, out, residual_out,
            protocol=self.protocol, buffer_ptrs=self.lamport_ptrs if lamport else self.flags_ptrs,
            state=self.states[self.protocol],
            region=self.region, rank=self.handle.rank, world_size=self.handle.world_size,
            signal_pad_ptrs=self.signal_pad_ptrs, status=self.lamport_status, spin_limit=self.spin_limit)


_custom: CustomAllReduce | None = None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the tensor-parallel ranks (`x` itself may be overwritten with it)."""
    if _custom is not None:
        return torch.ops.engine.custom_all_reduce(x)
    dist.all_reduce(x)
    return x


def fused_kernel():
    """ops.triton_allreduce, imported on first use: Triton is not installed on CPU-only machines."""
    import ops.triton_allreduce

    return ops.triton_allreduce


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight multiply, exactly as HF Llama."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


# Without tensor parallelism, each decoder layer's residual add and RMSNorm on CUDA run as one opaque kernel
# (`add_rms_norm`) instead of what inductor makes of them: two kernels a norm (a reduction, then a pointwise pass;
# perf/RESULTS.md, session 20). On by default since session 25: with the q/k norm kernel (engine/models/qwen3.py)
# nano's full-batch step took 8.17 ms of GPU against 8.42, 316 kernels against 434 (H100). ENGINE_FUSED_NORM=0: off.
FUSED_NORM = os.environ.get("ENGINE_FUSED_NORM", "1") != "0"


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * weight, h) for h = x + residual (residual None: h = x), without tensor parallelism: on
    CUDA with FUSED_NORM one kernel (`engine::add_rms_norm`, ops.triton_allreduce's rounding), else torch."""
    if FUSED_NORM and x.is_cuda and x.shape[-1] <= fused_kernel().MAX_HIDDEN:
        return torch.ops.engine.add_rms_norm(x, residual, weight, eps)
    h = x if residual is None else x + residual
    return rms_norm(h, weight, eps), h


@torch.library.custom_op("engine::add_rms_norm", mutates_args=())
def _add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not x.is_cuda:  # the op's CPU form: what torch computes (no alias of x among the outputs)
        h = x.clone() if residual is None else x + residual
        return rms_norm(h, weight, eps), h
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    out, h = x.new_empty(x.shape), x.new_empty(x.shape)
    fused_kernel().add_rms_norm(x, residual, weight, eps, out, h)
    return out, h


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)  # contiguous, as the kernel writes them


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What follows a row-parallel layer: h = all_reduce(x) + residual (residual None: no add), then
    (RMSNorm(h) * weight, h). With the custom all-reduce on, one opaque kernel
    (`engine::all_reduce_add_rms_norm`); otherwise the all-reduce, then torch (which torch.compile fuses)."""
    if _custom is not None and _custom.fused:
        return torch.ops.engine.all_reduce_add_rms_norm(x, residual, weight, eps)
    h = all_reduce(x)
    if residual is not None:
        h = h + residual
    return rms_norm(h, weight, eps), h


@torch.library.custom_op("engine::all_reduce_add_rms_norm", mutates_args=())
def _all_reduce_add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _custom is not None and _custom.fused_fits(x, residual, weight):
        out, h = torch.empty_like(x), torch.empty_like(x)
        _custom.all_reduce_add_rms_norm(x, residual, weight, eps, out, h)
        return out, h
    h = _custom_all_reduce(x)  # too large for the buffer (a long prefill): NCCL
    if residual is not None:
        h = h + residual
    return rms_norm(h, weight, eps), h


@_all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("engine::custom_all_reduce", mutates_args=())
def _custom_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _custom is not None and _custom.fits(x):
        return _custom(x)
    out = x.clone()
    dist.all_reduce(out)
    return out


@_custom_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def why_not_custom(device: torch.device, dtype: torch.dtype, world_size: int) -> str | None:
    """Why the custom all-reduce cannot run here (the same answer on every rank), or None."""
    if world_size < 2:
        return "one rank"
    if device.type != "cuda":
        return f"{device.type} device"
    if dtype not in DTYPES:
        return f"its kernel does not sum {str(dtype).removeprefix('torch.')}"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy_out"
    return None


def init_custom_all_reduce(device: torch.device, dtype: torch.dtype, max_tokens: int, hidden_size: int) -> bool:
    """Set up the custom all-reduce on every rank of the default group (a collective: every rank
    calls it with the same arguments). Returns whether it is on; when it is not, `all_reduce` is NCCL's."""
    global _custom, _set_up_in_this_process
    _custom = None
    reason = why_not_custom(device, dtype, dist.get_world_size() if dist.is_initialized() else 1)
    numel = min(MAX_BYTES // dtype.itemsize, max_tokens * hidden_size)
    buffer = None
    if reason is None:  # the same on every rank: all of them take part in what follows
        import torch.distributed._symmetric_memory as symm_mem

        here = None
        if _set_up_in_this_process:
            # Only rank 0 can get here (workers are new processes). Session 15: the second TP engine
            # of one pytest process hung with it, the first did not. PyTorch's symmetric memory keeps
            # rendezvous state per process that a new worker does not share: the likely cause, not
            # confirmed. So one engine per process gets it.
            here = "an earlier tensor-parallel engine of this process had it (a second one hung)"
        else:
            try:
                buffer = symm_mem.empty(CustomAllReduce.buffer_numel(numel, dist.get_world_size()), dtype=dtype,
                                        device=device)
            except Exception as exc:  # noqa: BLE001  (no P2P, no driver support: NCCL it is)
                here = f"symmetric memory unavailable ({type(exc).__name__}: {exc})"
        # Every rank must have its buffer before any enters the rendezvous.
        ready = torch.tensor([here is None], dtype=torch.int32, device=device)
        dist.all_reduce(ready, op=dist.ReduceOp.MIN)
        if here is not None:
            reason = here
        elif not ready.item():
            reason = "not possible on another rank (its log says why)"
    if reason is not None:
        logger.info("tensor-parallel all-reduce: NCCL / gloo (custom all-reduce off: %s)", reason)
        return False
    group_name = dist.group.WORLD.group_name
    _set_up_in_this_process = True
    handle = symm_mem.rendezvous(buffer, group_name)
    _custom = CustomAllReduce(buffer, handle, group_name, numel)
    torch.cuda.synchronize(device)
    dist.barrier()  # every rank's buffer marked before any kernel writes into a peer's
    logger.info("tensor-parallel all-reduce: symmetric-memory one-shot up to %d KiB (%d %s values), NCCL above; "
                "fused with the residual add and RMSNorm: %s", numel * dtype.itemsize >> 10, numel,
                str(dtype).removeprefix("torch."), _custom.protocol or "off")
    return True


_set_up_in_this_process = False


def custom_all_reduce_on() -> bool:
    return _custom is not None


def release_after_peer_failure(seconds: float = 60.0) -> threading.Thread | None:
    """Another rank has failed (or is about to be killed): keep this rank's GPU from hanging at the
    custom all-reduce's barriers (`CustomAllReduce.stand_in_for_peers`, in a daemon thread, for at
    most `seconds`). Once a process; None when the custom all-reduce is off."""
    global _release
    custom = _custom
    with _release_lock:
        if custom is None or _release is not None:
            return _release
        _kept.append(custom)  # kernels still queued use its buffer: never freed in this process
        _release = threading.Thread(target=custom.stand_in_for_peers, args=(seconds,),
                                    name="engine-allreduce-release", daemon=True)
        _release.start()
        return _release


_kept: list[CustomAllReduce] = []
_release: threading.Thread | None = None
_release_lock = threading.Lock()


def shutdown_custom_all_reduce() -> None:
    """Drop the buffer (before its process group is destroyed)."""
    global _custom
    _custom = None
