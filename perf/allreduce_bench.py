"""All-reduce latency inside CUDA graphs, as the decode graphs run it: NCCL against the engine's
custom all-reduce (engine.communication: the symmetric-memory one-shot kernel), bf16 [rows, hidden];
then each followed by the residual add and RMSNorm the model does after it (compiled into one kernel),
against the kernel that fuses all three (ops.triton_allreduce, its Lamport and its barrier-based variant).

    python3 perf/allreduce_bench.py --gpus 2 --hidden 4096 --out perf/results/allreduce.json

Each variant is captured as one graph of --ops all-reduces in a row (each one's output the next
one's input, as layers chain them), replayed --iters times after a warm-up replay; the time per
all-reduce is rank 0's replay time over --ops. The variants are checked against each other first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import communication  # noqa: E402


def time_graph(fn, x: torch.Tensor, ops: int, iters: int) -> float:
    """Microseconds an all-reduce, from replays of a graph of `ops` of them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)  # warm-up outside the capture (NCCL's and cuBLAS's lazy set-up)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(ops):
            y = fn(y)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * ops)


@torch.compile(dynamic=False)
def add_norm(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = y + residual
    return communication.rms_norm(h, weight, 1e-5), h


def nccl(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()  # out of place, as the engine's op is
    dist.all_reduce(y)
    return y


def rank_main(rank: int, world: int, port: int, args, results) -> None:
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    torch._dynamo.config.cache_size_limit = 64  # add_norm: one graph a row count
    max_rows = max(args.rows)
    communication.MAX_BYTES = args.max_bytes
    assert communication.init_custom_all_reduce(torch.device("cuda"), torch.bfloat16, max_rows, args.hidden)
    custom = torch.ops.engine.custom_all_reduce
    gen = torch.Generator("cuda").manual_seed(rank)
    weight = (1 + 0.1 * torch.randn(args.hidden, device="cuda", generator=gen)).to(torch.bfloat16)
    dist.broadcast(weight, 0)  # one norm weight on every rank, as the model's
    rows_out = []
    for rows in args.rows:
        # Values small enough that 64 sums in a row stay finite and exact-ish in bf16.
        x = (torch.randint(-4, 5, (rows, args.hidden), device="cuda") * (rank + 1)).to(torch.bfloat16)
        torch.testing.assert_close(custom(x), nccl(x), rtol=0, atol=0)
        row = {"rows": rows, "bytes": rows * args.hidden * 2, "custom": communication._custom.fits(x)}
        for name, fn in (("nccl", nccl), ("custom", custom)):
            row[f"{name}_us"] = time_graph(fn, x * 0, args.ops, args.iters)
        # What the model does after each row-parallel layer: all-reduce, residual add, RMSNorm (the
        # add and norm compiled into one kernel, as in the engine), against the fused kernel.
        residual = torch.randn(rows, args.hidden, device="cuda", generator=gen).to(torch.bfloat16)
        chains = {
            "nccl_norm": lambda y: add_norm(nccl(y), residual, weight)[0],
            "custom_norm": lambda y: add_norm(custom(y), residual, weight)[0],
            "fused": lambda y: torch.ops.engine.all_reduce_add_rms_norm(y, residual, weight, 1e-5)[0],
            "fused_flags": lambda y: torch.ops.engine.all_reduce_add_rms_norm(y, residual, weight, 1e-5)[0],
        }
        x = torch.randn(rows, args.hidden, device="cuda", generator=gen).to(torch.bfloat16)
        communication._custom.protocol = "lamport"  # off in the engine by default (experimental)
        want, got = add_norm(nccl(x), residual, weight), torch.ops.engine.all_reduce_add_rms_norm(x, residual, weight, 1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        torch.testing.assert_close(got[0], want[0])
        row["fused"] = communication._custom.fused_fits(x, residual, weight)
        for name, fn in chains.items():
            communication._custom.protocol = "flags" if name == "fused_flags" else "lamport"
            row[f"{name}_us"] = time_graph(fn, x, args.ops, args.iters)
        communication._custom.protocol = None
        rows_out.append(row)
        if rank == 0:
            print(f"{rows:5d} rows ({row['bytes'] / 1024:7.0f} KiB): NCCL {row['nccl_us']:7.2f} us, "
                  f"custom {row['custom_us']:7.2f} us{'' if row['custom'] else ' (over the buffer: NCCL inside)'}; "
                  f"with the add and norm after it: NCCL {row['nccl_norm_us']:7.2f}, custom {row['custom_norm_us']:7.2f}, "
                  f"fused {row['fused_us']:7.2f} us (barrier-based: {row['fused_flags_us']:7.2f})"
                  f"{'' if row['fused'] else ' (not fused: over the buffer)'}",
                  flush=True)
    if rank == 0:
        results.put(rows_out)
    communication.shutdown_custom_all_reduce()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--ops", type=int, default=64)
    p.add_argument("--max-bytes", type=int, default=8 << 20, help="the custom all-reduce's buffer (the engine's: engine.communication.MAX_BYTES)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    torch.multiprocessing.start_processes(rank_main, args=(args.gpus, port, args, results), nprocs=args.gpus,
                                          join=True, start_method="spawn")
    rows = results.get()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"gpus": args.gpus, "hidden": args.hidden, "ops": args.ops, "iters": args.iters,
                       "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
