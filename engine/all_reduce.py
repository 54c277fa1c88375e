"""The tensor-parallel all-reduce: `torch.ops.engine.all_reduce(x)`, the sum of x over the ranks.

A row-parallel layer (o_proj, down_proj) and the vocab-parallel embedding end in one; at batch-1
decode on Llama-3.1-8B that is 65 a token, each of a few KB. NCCL's ring all-reduce costs tens of
microseconds at that size however small the message (it measured TP=2 at only 1.15x TP=1), so on
GPUs with peer access small tensors go through PyTorch's symmetric-memory one-shot all-reduce
(`torch.ops.symm_mem.one_shot_all_reduce_copy_out`): one kernel copies this rank's x into a buffer
every peer can read (allocated once, at start, with `torch.distributed._symmetric_memory`), waits at
a barrier of flags in peer memory, reads every rank's copy and sums them, and meets the others at a
second barrier before the buffer is written again. No NVLink multicast is used. Larger tensors
(prefill steps), other dtypes (the kernel takes bf16 and fp32), CPU (gloo) and
`disable_custom_all_reduce` use `torch.distributed.all_reduce`.

The op is opaque to torch.compile (a custom op with a fake implementation), and the choice between
the two paths is made when it runs: at CUDA-graph capture, by each bucket's size.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("engine")

# Up to this many bytes a tensor goes through the one-shot kernel (decode at up to 64 rows of a
# 4096-wide bf16 hidden state); above, NCCL's bandwidth-optimal ring wins. perf/all_reduce_bench.py
# measures both on the GPUs at hand.
ONE_SHOT_MAX_BYTES = 512 * 1024


class SymmMemAllReduce:
    """A symmetric-memory buffer shared by the ranks of the default process group, and the one-shot
    all-reduce through it."""

    def __init__(self, device: torch.device, dtype: torch.dtype, max_bytes: int = ONE_SHOT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.group_name = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before torch 2.9, a no-op after
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)  # collective: every rank maps every peer's buffer

    def fits(self, x: torch.Tensor) -> bool:
        # 16-byte multiples keep the kernel's vector loads aligned in x, the buffer and the output alike.
        return (x.dtype == self.dtype and x.is_cuda and x.numel() <= self.max_numel
                and (x.numel() * x.element_size()) % 16 == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        flat = x.contiguous().view(-1)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(self.buffer[: flat.numel()], flat, "sum", self.group_name,
                                                        out.view(-1))
        return out


_one_shot: SymmMemAllReduce | None = None


def init_custom_all_reduce(device: torch.device, dtype: torch.dtype, disabled: bool) -> str:
    """Set up the one-shot path on every rank (a collective: all ranks call it at the same point, after
    the process group is up). Returns what the engine logs: which all-reduce small tensors get."""
    global _one_shot
    _one_shot = None
    if disabled:
        return "NCCL (disable_custom_all_reduce)" if device.type == "cuda" else "gloo"
    if device.type != "cuda":
        return "gloo"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"NCCL (the one-shot kernel takes bf16 and fp32, not {dtype})"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return "NCCL (this PyTorch has no symm_mem.one_shot_all_reduce_copy_out)"
    world = dist.get_world_size()
    peers_ok = all(torch.cuda.can_device_access_peer(device.index, other.index)
                   for other in (torch.device("cuda", r) for r in range(world)) if other != device)
    # Every rank must agree before any of them enters the collective rendezvous.
    agree = torch.tensor([int(peers_ok)], device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    if not agree.item():
        return "NCCL (no peer access between the GPUs)"
    _one_shot = SymmMemAllReduce(device, dtype)
    return f"symmetric-memory one-shot up to {ONE_SHOT_MAX_BYTES // 1024} KiB, NCCL above"


def reset_custom_all_reduce() -> None:
    """Forget the buffer (the engine's shutdown, before the process group goes)."""
    global _one_shot
    _one_shot = None


@torch.library.custom_op("engine::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the ranks of the default process group, as a new tensor."""
    if _one_shot is not None and _one_shot.fits(x):
        return _one_shot.all_reduce(x)
    out = x.clone()
    dist.all_reduce(out)
    return out


@all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
