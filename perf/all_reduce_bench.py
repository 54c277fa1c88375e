"""The tensor-parallel all-reduce on the GPUs at hand: `torch.ops.engine.all_reduce` (symmetric-memory
one-shot up to engine.all_reduce.ONE_SHOT_MAX_BYTES, NCCL above) against plain NCCL, per message size.

Each rank is a process on its own GPU (cuda:0..N-1), as in the engine. For every size it checks that
both give the same sums (bf16; fresh random inputs per rank, the output poisoned first), then times
each inside a CUDA graph of --calls all-reduces (so that launch costs count as they do in the
engine's decode graphs), replayed --iters times after a warm-up.

    python3 perf/all_reduce_bench.py --world-size 2 [--json-out FILE]

Set NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 on the lent machines (no NVLink multicast).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import all_reduce as ar  # noqa: E402

DEFAULT_SIZES_KB = [8, 16, 32, 64, 128, 256, 512, 1024, 4096]


def _time_graph(fn, x: torch.Tensor, calls: int, iters: int) -> float:
    """µs per all-reduce: a CUDA graph of `calls` chained all-reduces, replayed `iters` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(calls):
            y = fn(y) * 0.5  # chained, as the layers are; the scale keeps values bounded
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (iters * calls)


def _nccl(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out)
    return out


def _rank_main(rank: int, world: int, port: int, sizes_kb: list[int], calls: int, iters: int, queue) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(minutes=5))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    how = ar.init_custom_all_reduce(device, torch.bfloat16, disabled=False)
    rows = []
    for kb in sizes_kb:
        numel = kb * 1024 // 2
        torch.manual_seed(1000 * kb + rank)
        x = torch.randn(numel, device=device, dtype=torch.bfloat16)
        ours = torch.ops.engine.all_reduce(x)
        want = _nccl(x)
        torch.cuda.synchronize()
        equal = bool(torch.equal(ours, want))
        close = bool(torch.allclose(ours.float(), want.float(), atol=2e-2, rtol=2e-2))  # summation order may differ
        ours_us = _time_graph(torch.ops.engine.all_reduce, x, calls, iters)
        nccl_us = _time_graph(_nccl, x, calls, iters)
        one_shot = ar._one_shot is not None and ar._one_shot.fits(x)
        rows.append(dict(kb=kb, one_shot=one_shot, equal=equal, close=close, engine_us=round(ours_us, 2), nccl_us=round(nccl_us, 2)))
    if rank == 0:
        queue.put(dict(world_size=world, device=torch.cuda.get_device_name(device), path=how, sizes=rows))
    ar.reset_custom_all_reduce()
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, sizes_kb: list[int], calls: int, iters: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, sizes_kb, calls, iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return queue.get(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--sizes-kb", type=int, nargs="+", default=DEFAULT_SIZES_KB)
    p.add_argument("--calls", type=int, default=64, help="all-reduces per CUDA graph (Llama-8B decode: 65 a token)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    result = run(args.world_size, args.sizes_kb, args.calls, args.iters)
    print(f"{result['device']} x {result['world_size']}; engine.all_reduce: {result['path']}")
    print(f"{'KiB':>6} {'path':>9} {'equal':>6} {'close':>6} {'engine µs':>10} {'NCCL µs':>9} {'NCCL/engine':>12}")
    for r in result["sizes"]:
        print(f"{r['kb']:>6} {'one-shot' if r['one_shot'] else 'NCCL':>9} {str(r['equal']):>6} {str(r['close']):>6} {r['engine_us']:>10.2f} "
              f"{r['nccl_us']:>9.2f} {r['nccl_us'] / r['engine_us']:>12.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
