"""Dense linear layers at decode batch sizes: cuBLAS (F.linear) against the Triton GEMV of
ops/triton_linear.py, on Llama-3.1-8B's layer shapes, bf16, one GPU.

Each variant is timed as a CUDA graph of 20 calls (no launch gaps from Python), cycling through
enough weight copies to overflow the L2 cache, after a warm-up replay; µs a call and the weight's
GB/s. `--sweep` also times a few other tile choices of the GEMV.

    python perf/linear_bench.py --out linear_bench.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops.triton_linear import gemv_tiles, small_m_linear  # noqa: E402
from tests.test_triton_linear import LLAMA_8B_SHAPES  # noqa: E402

NAMES = dict(zip(LLAMA_8B_SHAPES, ["qkv", "o", "gate_up", "down"]))
SWEEP = [(4, 512, 4), (8, 512, 4), (16, 512, 4), (32, 512, 4), (16, 256, 4), (8, 1024, 4), (16, 512, 8), (32, 256, 8)]
CALLS = 20


def time_us(fn, weights: list[torch.Tensor], x: torch.Tensor) -> float:
    for w in weights[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(x, weights[i % len(weights)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * CALLS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("linear_bench needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(f"{'layer':>8} {'K':>6} {'N':>6} {'M':>2} {'kernel':>18} {'us':>8} {'GB/s':>7} {'vs cuBLAS':>9}")
    for (K, N), name in NAMES.items():
        nbytes = K * N * 2
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
                   for _ in range(max(2, -(-256 * 2**20 // nbytes)))]
        for M in (1, 2, 4):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            variants = {"cublas": lambda a, w: F.linear(a, w), "gemv": lambda a, w: small_m_linear(a, w)}
            if args.sweep:
                for t in SWEEP:
                    variants["gemv %d/%d/%d" % t] = lambda a, w, t=t: small_m_linear(a, w, tiles=t)
            base = None
            for kernel, fn in variants.items():
                us = time_us(fn, weights, x)
                base = base or us
                row = dict(layer=name, K=K, N=N, M=M, kernel=kernel, us=us, gbps=nbytes / us / 1e3, speedup=base / us)
                if kernel == "gemv":
                    row["tiles"] = gemv_tiles(M, N, K, sms)
                rows.append(row)
                print(f"{name:>8} {K:>6} {N:>6} {M:>2} {kernel:>18} {us:8.1f} {row['gbps']:7.0f} {row['speedup']:8.2f}x")
        del weights
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
