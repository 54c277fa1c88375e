"""Stress check of the fused all-reduce + residual add + RMSNorm kernels (ops.triton_allreduce) on two
or more GPUs, with diagnostics where the GPU test only says pass or fail.

    python3 perf/fused_allreduce_check.py --protocols lamport flags --out perf/results/fused_check.json

For each protocol, three ways of calling, each against the same sums made with NCCL (bit for bit):
  step    one call at a time, the host waiting for it (what the GPU test does), rows varying;
  burst   64 calls back to back, no host wait between them (the ranks drift apart by up to a call);
  graph   64 calls captured in a CUDA graph on fixed inputs, replayed on fresh ones (the engine's way).
The Lamport kernel's waits are bounded here (--spin-limit polls): a row that gives up counts itself in
its status instead of hanging the run. At the first wrong row or give-up of a way, every rank prints
what it holds for that row: its slot counter and its peers', and for each slot, how many of the
peer's values are still marked unwritten (-0.0) and how many equal what the peer sent in this call.
That separates "the peer's values never came" from "they came into another slot" (counters out of
step) and from "they came but the poll did not see them".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys

import torch
import torch.distributed as dist
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import communication
from ops.triton_allreduce import _marks

ROWS = [1, 1, 1, 2, 1, 3, 7, 1, 1, 2, 64, 65, 1, 200, 256, 1, 2, 2, 1]


def reference(xs: list[torch.Tensor], residual, weight, eps):
    """Every rank's x summed in float32 in rank order and rounded once, + residual, then the norm."""
    h = torch.stack([x.float() for x in xs]).sum(0).to(xs[0].dtype)
    h = h if residual is None else h + residual
    return communication.rms_norm(h, weight, eps), h


def gather(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def diagnose(custom, rows_bad: list[int], xs: list[torch.Tensor], n_rows: int) -> list[dict]:
    """What this rank holds for each bad row (Lamport): counters, and each slot's peer regions. A
    collective: every rank calls it for the same call."""
    rank, world, hidden = dist.get_rank(), dist.get_world_size(), xs[0].shape[-1]
    counters = gather(custom.states["lamport"][:n_rows].clone())
    out = []
    for row in (rows_bad or [0])[:4]:
        entry = {"row": row, "counters": [int(c[row]) for c in counters], "slots": []}
        for slot in range(custom.lamport.shape[0]):
            per_peer = {}
            for peer in range(world):
                if peer == rank:
                    continue
                region = custom.lamport[slot, peer, row * hidden:(row + 1) * hidden]
                sent = xs[peer][row].clone()
                sent[sent == 0] = 0.0
                per_peer[peer] = {
                    "marked": int((region.view(torch.int16) == -32768).sum()),
                    "equal_to_sent": int((region.view(torch.int16) == sent.view(torch.int16)).sum()),
                }
            entry["slots"].append(per_peer)
        out.append(entry)
    return out


def check(name: str, got, inputs, weight, eps, custom, log: list, quiet: bool = False) -> bool:
    """Compare each call's (out, h) with the NCCL reference (a collective: every rank, the same calls).
    A call is bad when any rank got a wrong sum; at the first, every rank diagnoses it. Returns ok."""
    rank = dist.get_rank()
    status = gather(custom.lamport_status.clone())
    wrong = []
    for (out, h), (x, residual) in zip(got, inputs):
        xs = gather(x)
        want_out, want_h = reference(xs, residual, weight, eps)
        rows = (h.view(torch.int16) != want_h.view(torch.int16)).any(-1).nonzero().flatten().tolist()
        wrong.append((rows, (out.float() - want_out.float()).abs().max().item(), xs))
    bad = torch.tensor([bool(rows) or not off <= 0.1 for rows, off, _ in wrong], dtype=torch.int32, device="cuda")
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    first = None
    if bad.any():
        i = int(bad.nonzero()[0])
        rows, off, xs = wrong[i]
        first = {"call": i, "rows": inputs[i][0].shape[0], "wrong_rows": rows[:16], "n_wrong_rows": len(rows), "norm_off": off}
        if custom.protocol == "lamport":
            first["diagnosis"] = diagnose(custom, rows, xs, inputs[i][0].shape[0])
    gave_up = sum(int(st[0]) for st in status)
    entry = {"way": name, "protocol": custom.protocol, "rank": rank, "calls": len(got), "bad_calls": int(bad.sum()),
             "status": [st.tolist() for st in status], "first_bad": first}
    if first or gave_up or not quiet:
        print(json.dumps(entry), flush=True)
        log.append(entry)
    custom.lamport_status.zero_()
    return first is None and gave_up == 0


@triton.jit
def _negative_zero_probe(out):
    cols = tl.arange(0, 8)
    tl.store(out + cols, -tl.zeros([8], dtype=out.dtype.element_ty))
    tl.store(out + 8 + cols, tl.full([8], -0.0, out.dtype.element_ty))
    tl.store(out + 16 + cols, _marks(8, out.dtype.element_ty))


def negative_zeros(device: str = "cuda") -> dict:
    """How this Triton and torch make -0.0 (bits of a bf16): the Lamport kernel's mark."""
    out = torch.ones(24, dtype=torch.bfloat16, device=device)
    _negative_zero_probe[(1,)](out)
    bits = out.view(torch.int16).view(3, 8)[:, 0].tolist()
    filled = torch.empty(8, dtype=torch.bfloat16, device=device).fill_(-0.0).view(torch.int16)[0].item()
    return {"-tl.zeros": hex(bits[0] & 0xFFFF), "tl.full(-0.0)": hex(bits[1] & 0xFFFF), "_marks": hex(bits[2] & 0xFFFF),
            "torch fill_(-0.0)": hex(filled & 0xFFFF), "triton": triton.__version__}


def rank_main(rank: int, world: int, port: int, args, results) -> None:
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    hidden, eps = args.hidden, 1e-5
    assert communication.init_custom_all_reduce(torch.device("cuda"), torch.bfloat16, max(ROWS), hidden)
    custom = communication._custom
    custom.spin_limit = args.spin_limit
    handle = custom.handle
    if rank == 0:
        print(f"-0.0 in bf16 (0x8000 is right): {negative_zeros()}", flush=True)
        print(f"symmetric memory: buffer at {custom.buffer.data_ptr():#x}, handle's own {handle.buffer_ptrs[rank]:#x}, "
              f"region {custom.region} values, lamport slots {tuple(custom.lamport.shape)}", flush=True)
    gen = torch.Generator("cuda").manual_seed(rank)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(torch.bfloat16)
    dist.broadcast(weight, 0)
    log: list[dict] = []

    def make(rows: int, with_residual: bool):
        x = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
        residual = None
        if with_residual:
            residual = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
            dist.broadcast(residual, 0)
        return x, residual

    def fused(x, residual):
        out, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        custom.all_reduce_add_rms_norm(x, residual, weight, eps, out, h)
        return out, h

    rng = random.Random(0)
    for protocol in args.protocols:
        custom.protocol = protocol
        # step: one call at a time
        inputs = [make(ROWS[i % len(ROWS)], i % 3 != 1) for i in range(args.calls)]
        for i, (x, residual) in enumerate(inputs):
            torch.cuda.synchronize()
            dist.barrier()
            got = fused(x, residual)
            torch.cuda.synchronize()
            if not check(f"step{i}", [got], [(x, residual)], weight, eps, custom, log, quiet=True):
                break
        else:
            entry = {"way": "step", "protocol": protocol, "rank": rank, "calls": len(inputs), "bad_calls": 0}
            print(json.dumps(entry), flush=True)
            log.append(entry)
        # burst: back to back
        for trial in range(args.trials):
            inputs = [make(rng.choice([1, 1, 2, 3]), True) for _ in range(64)]
            torch.cuda.synchronize()
            dist.barrier()
            got = [fused(x, r) for x, r in inputs]
            torch.cuda.synchronize()
            if not check(f"burst{trial}", got, inputs, weight, eps, custom, log):
                break
        # graph: 64 calls on fixed inputs of 1-3 rows, replayed on fresh values
        shapes = [rng.choice([1, 1, 2, 3]) for _ in range(64)]
        static = [make(rows, True) for rows in shapes]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = []
            for x, residual in static:
                out, h = torch.empty_like(x), torch.empty_like(x)
                custom.all_reduce_add_rms_norm(x, residual, weight, eps, out, h)
                outs.append((out, h))
        for trial in range(args.trials):
            fresh = [make(rows, True) for rows in shapes]
            for (x, residual), (fx, fr) in zip(static, fresh):
                x.copy_(fx)
                residual.copy_(fr)
            for out, h in outs:
                out.fill_(float("nan"))
                h.fill_(float("nan"))
            torch.cuda.synchronize()
            dist.barrier()
            graph.replay()
            torch.cuda.synchronize()
            if not check(f"graph{trial}", [(o.clone(), h.clone()) for o, h in outs], fresh, weight, eps, custom, log):
                break
        del graph
    results.put(log)
    communication.shutdown_custom_all_reduce()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--protocols", nargs="+", default=["lamport", "flags"])
    p.add_argument("--calls", type=int, default=120, help="calls of the step way")
    p.add_argument("--trials", type=int, default=10, help="bursts, and graph replays")
    p.add_argument("--spin-limit", type=int, default=1 << 22, help="polls of a row before a Lamport kernel gives up")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    torch.multiprocessing.start_processes(rank_main, args=(args.gpus, port, args, results), nprocs=args.gpus,
                                          join=True, start_method="spawn")
    log = []
    for _ in range(args.gpus):
        log += results.get()
    bad = [e for e in log if e.get("first_bad") or any(st[0] for st in e.get("status", []))]
    print(f"{len(log)} checks, {len(bad)} bad", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"gpus": args.gpus, "hidden": args.hidden, "device": torch.cuda.get_device_name(0),
                       "torch": torch.__version__, "checks": log}, f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
