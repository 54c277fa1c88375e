"""The Triton GEMV (ops.triton_gemv) against cuBLAS (F.linear) on Llama-3.1-8B's projection shapes at one
and two rows, bf16 (and int8 weights against the quantized int8 kernel with `--int8`).

    python perf/gemv_bench.py                       # the default tiles
    python perf/gemv_bench.py --sweep --out gemv.json  # every candidate tile in a grid, ranked

Each (config, shape, rows) is checked against an fp32 matmul first, then warmed up (compiled) outside
the timer. Then one call on each of enough copies of the weight that L2 (50 MB) cannot serve them is
captured in a CUDA graph, as decode runs, and the replay timed with CUDA events (best of --repeats).
GB/s is the weight's bytes over the time: at one or two rows these matmuls are bound by that read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, no install needed

from ops import triton_gemv  # noqa: E402
from ops.triton_gemv import GemvTiles, gemv  # noqa: E402

# name -> (K, N): nn.Linear's weight is [N, K]
SHAPES = {
    "qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
    "lm_head": (4096, 128256),
    "tp2-qkv": (4096, 3072), "tp2-o": (2048, 4096), "tp2-gate_up": (4096, 14336), "tp2-down": (7168, 4096),
}
LAYER = ("qkv", "o", "gate_up", "down")
L2_DEFEAT_BYTES = 256 << 20


def sweep_grid(programs_per_sm: list[int]) -> dict[str, GemvTiles]:
    """Tiles around the default; with more than one `programs_per_sm`, each tile at each (how far K is
    split where the tiles alone make too few programs: TP=2's halved shapes make half as many)."""
    grid = {}
    for bn, bk, warps, stages, pps in itertools.product((4, 8, 16), (512, 1024), (4, 8), (1, 2, 3, 4), programs_per_sm):
        per_thread = bn * bk // (32 * warps)  # fp32 sum elements a thread holds, per row of x
        if 16 <= per_thread <= 64:
            suffix = f"-p{pps}" if len(programs_per_sm) > 1 else ""
            grid[f"n{bn}-k{bk}-w{warps}-s{stages}{suffix}"] = GemvTiles(bn, bk, warps, stages, pps)
    return grid


def time_graph(fn, iters_inside: int, repeats: int) -> float:
    """Seconds per call: `fn` makes iters_inside calls; captured once, replayed `repeats` times."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best / iters_inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="every tile of a grid too, not just ops.triton_gemv.CANDIDATE_TILES")
    parser.add_argument("--programs-per-sm", nargs="+", type=int, default=[4],
                        help="with --sweep: each tile at each of these split-K targets (programs an SM)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--int8", action="store_true", help="also int8 weights: the GEMV vs ops.triton_quant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    configs = dict(triton_gemv.CANDIDATE_TILES)
    if args.sweep:
        configs.update(sweep_grid(args.programs_per_sm))
    torch.manual_seed(0)
    results = []
    for shape in args.shapes:
        K, N = SHAPES[shape]
        copies = max(2, -(-L2_DEFEAT_BYTES // (N * K * 2)))
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ weights[0].float().T
            runs = {"cublas": lambda w: F.linear(x, w)}
            runs.update({name: (lambda w, t=t: gemv(x, w, tiles=t)) for name, t in configs.items()})
            for name, call in runs.items():
                try:
                    y = call(weights[0]).float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    if not err < 1e-2:
                        print(f"{shape} rows={rows} {name}: WRONG (relative error {err:.2e})", flush=True)
                        continue
                    seconds = time_graph(lambda: [call(w) for w in weights], copies, args.repeats)
                except Exception as exc:  # a tile that does not compile (registers, shared memory)
                    print(f"{shape} rows={rows} {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                gbps = N * K * 2 / seconds / 1e9
                results.append(dict(shape=shape, rows=rows, config=name, us=seconds * 1e6, gbps=gbps, err=err))
                if not args.sweep or name in ("cublas", "default"):
                    print(f"{shape:>12} rows={rows} {name:>20}: {seconds * 1e6:8.1f} us {gbps:7.0f} GB/s", flush=True)
        if args.int8:
            from ops.triton_quant import INT8, _quant_matmul  # its own tiles: int8_matmul sends 1-2 rows to the GEMV

            w8 = [torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
                  for _ in range(max(2, -(-L2_DEFEAT_BYTES // (N * K))))]
            scale = torch.rand(N, device="cuda", dtype=torch.bfloat16) * 0.01
            for rows in args.rows:
                x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
                ref = (x.float() @ w8[0].float().T) * scale.float()
                for name, call in (("int8-quant", lambda w: _quant_matmul(x, w, None, scale, None, N, K, INT8, K, 0, None, None)),
                                   ("int8-gemv", lambda w: gemv(x, w, scales=scale))):
                    err = ((call(w8[0]).float() - ref).abs().max() / ref.abs().max()).item()
                    seconds = time_graph(lambda: [call(w) for w in w8], len(w8), args.repeats)
                    gbps = N * K / seconds / 1e9
                    results.append(dict(shape=shape, rows=rows, config=name, us=seconds * 1e6, gbps=gbps, err=err))
                    print(f"{shape:>12} rows={rows} {name:>20}: {seconds * 1e6:8.1f} us {gbps:7.0f} GB/s"
                          f" (err {err:.1e})", flush=True)
        del weights
        torch.cuda.empty_cache()
        if args.out:  # after each shape: a run cut short by a time limit keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=1))
    # Per rows: each config's time summed over one decoder layer's four matmuls (shapes present), ranked.
    for rows in args.rows:
        for prefix in ("", "tp2-"):
            layer = [prefix + s for s in LAYER if prefix + s in args.shapes]
            if not layer:
                continue
            totals = {}
            for config in {r["config"] for r in results}:
                times = [r["us"] for r in results if r["config"] == config and r["rows"] == rows and r["shape"] in layer]
                if len(times) == len(layer):
                    totals[config] = sum(times)
            ranked = sorted(totals.items(), key=lambda kv: kv[1])
            print(f"\n{prefix or '8b-'}layer ({', '.join(layer)}), rows={rows}: us summed, best first")
            for config, total in ranked[:12] + ([("cublas", totals["cublas"])] if "cublas" in totals else []):
                print(f"  {config:>20}: {total:8.1f} us")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
