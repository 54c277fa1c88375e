"""Quantized-matmul benchmark: the Triton AWQ / GPTQ / int8 kernels (ops.triton_quant) vs a bf16
torch matmul, on Llama-3.1-8B's projection shapes (or 70B's, `--shapes 70b`) at batch 1, 16 and 256.

    python perf/quant_bench.py --out perf/quant_bench.json
    python perf/quant_bench.py --tiles default gemv small --kernels bf16 awq-g128 int8 --layers qkv gate_up
    python perf/quant_bench.py --tiles default planar-narrow --kernels bf16 gptq-g128 awq-gptq-g128 --batches 1 2
    python perf/quant_bench.py --planar-sweep --kernels bf16 awq-gptq-g128 --batches 1
    python perf/quant_bench.py --shapes 70b --kernels bf16 awq-gptq-g128 --batches 128 256
    python perf/quant_bench.py --shapes 70b --kernels bf16 awq-gptq-g128 gluon-gptq-g128 --batches 256
    python perf/quant_bench.py --shapes qwen3-0.6b --kernels bf16 --batches 8 64 256

Each (kernel, layer, batch) is first checked against the dequantize-then-matmul reference, then warmed
up (Triton compiles every kernel variant it needs here, outside the timer). Then `--iters` back-to-back
calls are captured in a CUDA graph, as the engine runs decode, and the graph's replay is timed with
CUDA events (the best of `--repeats`), so the host's launch overhead is not counted (`--eager` times
plain calls instead; bnb-int8, whose outlier count is data-dependent, is always timed so). Each call
reads a different copy of the layer's weights, enough copies (>= 256 MB in all) that L2 cannot serve
them, so the weight bytes really come from HBM. "GB/s" is the layer's stored weight bytes (packed
weights, zeros, scales, g_idx) over the time: at batch 1 the matmuls are bound by these reads, so it
compares against the device's HBM bandwidth (~3 TB/s copy on the lent H100); at 256 they are bound by
compute and the number is only relative.

`--tiles` runs the Triton kernels once per named table of `ops.triton_quant.CANDIDATE_TILES` and ends
with the tables ranked per (kernel, batch), by their time summed over the layers. `--planar-sweep` adds
tables that differ from the default only in its one-row planar entry (columns and warps a program,
pipeline stages, programs an SM, K ranges at most; `planar_sweep_tables`), named after those values.

- bf16:          F.linear with a bf16 weight [N, K] (cuBLAS), the unquantized baseline
- bf16-lt:       the same through cuBLASLt (torch.backends.cuda.preferred_blas_library("cublaslt") around the call)
- awq-g128:      AWQ GEMM layout, group 128
- awq-gptq-g128: the same weights repacked into GPTQ's layout (ops.quant_ref.awq_to_gptq), as the engine
                 runs AWQ checkpoints: the planar kernel at 1..2 rows
- gluon-gptq-g128: the awq-gptq-g128 weights through the Gluon kernel (ops.gluon_quant: Triton 3.6, sm_90,
                 bf16/fp16 x; dequant overlapped with async wgmma), whatever the batch (256x128 tiles), split-K as
                 ops.gluon_quant.split_for picks it (70B at 256 rows: qkv 3, o and down 2, gate_up 1)
- gluon-gptq-g128-s1: the same without split-K (one program a tile, as awq-gptq-g128's 256-row entry)
- gluon-swapab-gptq-g128: the same weights, qweight repacked once by ops.gluon_swapab.repack_swapab (not timed),
                 through the swap-AB Gluon kernel (W dequantized into wgmma's register A operand, x by TMA;
                 128 x BLOCK_M tiles of y^T, BLOCK_M 64 / 128 / 256 by rows (block_m_for), split-K as
                 ops.gluon_swapab.split_k_for picks it, or the persistent stream-K kernel where
                 ops.gluon_swapab.use_stream_k says: 70B gate_up and qkv at 129-256 rows)
- gluon-swapab-gptq-g128-dp: the same without stream-K (one program a tile or a K range of a tile)
- gluon-swapab-gptq-g128-s1: the same without split-K or stream-K
- swapab-op-g128: the same weights through engine::swapab_matmul, as ENGINE_SWAPAB_GEMM=1's layers run: the swap-AB
                 kernel, or from ENGINE_DEQUANT_GEMM_ROWS rows (where set) dequantize_swapab + cuBLAS
- gptq-g128:     GPTQ v1, group 128, no act-order (group of a K-tile from its index)
- gptq-act-g128: GPTQ v1, group 128, act-order (zeros and scales gathered per input row via g_idx)
- gptq-act-sorted-g128: the same weights sorted by group (ops.quant_ref.sort_by_group), as the engine
                 runs act-order checkpoints: x gathered in that order, then the kernels without act-order
- int8:          weight-only int8 with per-output-channel scales
- bnb-int8:      bitsandbytes LLM.int8() (threshold 6.0), if bitsandbytes is installed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, no install needed

import ops.quant_matmul  # noqa: E402,F401  (registers torch.ops.engine.bnb_int8_matmul)
from tests.test_triton_quant import LLAMA_8B_SHAPES, LLAMA_70B_SHAPES, TOLERANCE, random_layer  # noqa: E402

SHAPE_NAMES = ["qkv", "o", "gate_up", "down"]  # the order of LLAMA_8B_SHAPES and LLAMA_70B_SHAPES
QWEN3_06B_SHAPES = [(1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024)]
SHAPES = {"8b": LLAMA_8B_SHAPES, "70b": LLAMA_70B_SHAPES, "qwen3-0.6b": QWEN3_06B_SHAPES}  # one rank's (K, N), unsharded
BATCHES = (1, 2, 4, 16, 256)
L2_DEFEAT_BYTES = 256 << 20
KERNELS = ["bf16", "bf16-lt", "awq-g128", "awq-gptq-g128", "gluon-gptq-g128", "gluon-gptq-g128-s1", "gluon-swapab-gptq-g128", "gluon-swapab-gptq-g128-dp", "gluon-swapab-gptq-g128-s1", "swapab-op-g128", "gptq-g128", "gptq-act-g128", "gptq-act-sorted-g128", "int8", "bnb-int8"]
VARIANT_OF = {"awq-g128": "awq-g128", "awq-gptq-g128": "awq-g128", "gluon-gptq-g128": "awq-g128", "gluon-gptq-g128-s1": "awq-g128", "gluon-swapab-gptq-g128": "awq-g128", "gluon-swapab-gptq-g128-dp": "awq-g128", "gluon-swapab-gptq-g128-s1": "awq-g128", "swapab-op-g128": "awq-g128", "gptq-g128": "gptq-v1-g128", "gptq-act-g128": "gptq-act-order-g128",
              "gptq-act-sorted-g128": "gptq-act-order-g128", "int8": "int8"}


def layer_copies(kernel: str, K: int, N: int) -> tuple[list[dict], torch.Tensor | None]:
    """Enough copies of one layer's stored tensors that cycling through them defeats L2, and the float
    weight [K, N] the first copy stands for (None for the unquantized and bitsandbytes baselines)."""
    copies, weight = [], None
    while not copies or sum(tensor_bytes(c) for c in copies) < L2_DEFEAT_BYTES:
        layer, layer_weight = make_layer(kernel, K, N)
        copies.append(layer)
        weight = layer_weight if weight is None else weight
    return copies, weight


def make_layer(kernel: str, K: int, N: int) -> tuple[dict, torch.Tensor | None]:
    if kernel in ("bf16", "bf16-lt"):
        return {"weight": torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02}, None
    if kernel == "bnb-int8":
        from engine.quantization.bnb import quantize_llm_int8

        weight, scb = quantize_llm_int8(torch.randn(N, K, device="cuda") * 0.02)
        return {"weight": weight, "SCB": scb}, None
    layer, weight = random_layer(VARIANT_OF[kernel], K, N, torch.bfloat16, "cuda")
    if kernel in ("awq-gptq-g128", "gluon-gptq-g128", "gluon-gptq-g128-s1", "gluon-swapab-gptq-g128",
                  "gluon-swapab-gptq-g128-dp", "gluon-swapab-gptq-g128-s1", "swapab-op-g128"):
        from ops.quant_ref import awq_to_gptq

        qweight, qzeros = awq_to_gptq(layer["qweight"], layer["qzeros"])
        g_idx = torch.arange(K, dtype=torch.int32, device="cuda") // layer["group_size"]
        layer = dict(qweight=qweight, qzeros=qzeros, scales=layer["scales"], g_idx=g_idx,
                     group_size=layer["group_size"], act_order=False, zeros_minus_one=False)
        if kernel.startswith(("gluon-swapab-gptq-g128", "swapab-op")):  # repacked once, as a loader would
            from ops.gluon_swapab import repack_swapab

            layer = dict(packed=repack_swapab(qweight), qzeros=qzeros, scales=layer["scales"],
                         group_size=layer["group_size"])
    if kernel == "gptq-act-sorted-g128":
        from ops.quant_ref import sort_by_group

        qweight, g_idx, order = sort_by_group(layer["qweight"], layer["g_idx"], layer["group_size"])
        layer = {**layer, "qweight": qweight, "g_idx": g_idx, "act_order": False, "input_order": order}
    return layer, weight


def tensor_bytes(layer: dict) -> int:
    return sum(t.numel() * t.element_size() for t in layer.values() if isinstance(t, torch.Tensor))


def matmul_of(kernel: str) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    if kernel == "bf16":
        return lambda x, layer: F.linear(x, layer["weight"])
    if kernel == "bf16-lt":
        def linear_lt(x, layer):
            before = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                return F.linear(x, layer["weight"])
            finally:
                torch.backends.cuda.preferred_blas_library(before)

        return linear_lt

    if kernel == "bnb-int8":
        return lambda x, layer: torch.ops.engine.bnb_int8_matmul(x, layer["weight"], layer["SCB"], 6.0, None)
    if kernel == "swapab-op-g128":
        return lambda x, layer: torch.ops.engine.swapab_matmul(x, layer["packed"], layer["qzeros"], layer["scales"],
                                                               layer["group_size"], False, None)
    if kernel.startswith("gluon-swapab-gptq-g128"):
        from ops.gluon_swapab import swapab_gptq_matmul

        split_k = 1 if kernel.endswith("-s1") else None
        stream_k = False if kernel.endswith(("-s1", "-dp")) else None
        return lambda x, layer: swapab_gptq_matmul(x, layer["packed"], layer["qzeros"], layer["scales"],
                                                   layer["group_size"], zero_offset=0, split_k=split_k,
                                                   stream_k=stream_k)
    if kernel.startswith("gluon-gptq-g128"):  # GPTQ layout, zeros as stored (awq_to_gptq), no act-order
        from ops.gluon_quant import gluon_gptq_matmul

        split_k = 1 if kernel.endswith("-s1") else None
        return lambda x, layer: gluon_gptq_matmul(x, layer["qweight"], layer["qzeros"], layer["scales"],
                                                  layer["group_size"], zero_offset=0, split_k=split_k)
    from ops import triton_quant

    fmt = "gptq" if kernel == "awq-gptq-g128" else VARIANT_OF[kernel].split("-")[0]
    function = {"awq": triton_quant.awq_matmul, "gptq": triton_quant.gptq_matmul, "int8": triton_quant.int8_matmul}[fmt]
    if kernel == "gptq-act-sorted-g128":  # the engine's GPTQLinearMethod.apply on a sorted layer
        return lambda x, layer: function(x.index_select(-1, layer["input_order"]),
                                         **{k: v for k, v in layer.items() if k != "input_order"})
    return lambda x, layer: function(x, **layer)


def check(matmul: Callable, x: torch.Tensor, layer: dict, weight: torch.Tensor) -> None:
    """The kernel's output against x @ weight, as tests/test_triton_quant.py judges it."""
    want = x.float() @ weight
    error = (matmul(x, layer).float() - want).abs().max().item()
    if not error <= TOLERANCE[x.dtype] * want.abs().max().item():  # NaN fails too
        raise AssertionError(f"wrong result: max error {error}, largest output {want.abs().max().item()}")


def time_us(matmul: Callable, x: torch.Tensor, copies: list[dict], iters: int, repeats: int, eager: bool) -> float:
    """Microseconds per call, the best of `repeats` runs of `iters` calls cycling through `copies`."""
    calls = [lambda layer=copies[i % len(copies)]: matmul(x, layer) for i in range(iters)]
    with torch.cuda.stream(torch.cuda.Stream()):  # warm-up and capture off the default stream, as torch advises
        for call in calls[:3]:  # warm-up: compilation and first launches, outside the timer
            call()
        torch.cuda.synchronize()
        if eager:
            run = lambda: [call() for call in calls]  # noqa: E731
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for call in calls:
                    call()
            run = graph.replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(repeats):
            run()  # untimed: the first run after capture pays one-time costs
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) * 1000 / iters)
    return best


def planar_sweep_tables() -> dict[str, tuple]:
    """The default table with its one-row planar (WIDE2) entry replaced, one table per grid point around it
    (the default: 64 columns, 1 warp, 3 stages, 8 programs an SM since session 11, at most 16 K ranges).
    `quant_bench.py --planar-sweep` prints each layer's time too: the best table may differ by shape."""
    from ops import triton_quant

    default = triton_quant.CANDIDATE_TILES["default"]
    (max_m, first), rest = default[0], default[1:]
    assert first.planar and first.block_m == 1, "the default table no longer starts with the one-row planar entry"
    tables = {}
    # 2 warps (64 or 128 columns) measured slower at every point of session 11's first sweep: 1 warp only.
    for stages in (3, 4):
        # more programs (more K ranges, shorter each), then fewer (longer K loops: Llama-3.1-8B's qkv and o
        # took 11.0 / 8.9 us at 1.2 / 1.0 TB/s in session 11, two K-tiles a program under the default)
        for per_sm, max_split in ((12, 16), (16, 32), (24, 32), (8, 16), (8, 8), (6, 8), (6, 16), (4, 4)):
            tiles = triton_quant.Tiles(1, first.block_n, first.block_k, 1, stages, per_sm, planar=True, wide=True,
                                       wide2=True, max_split=max_split)
            if tiles != first:
                tables[f"n{first.block_n}w1s{stages}p{per_sm}m{max_split}"] = ((max_m, tiles), *rest)
    return tables


def tiles_label(M: int, kernel: str, N: int, K: int) -> str:
    from ops import triton_quant

    if kernel == "swapab-op-g128":
        from ops import gluon_swapab as gs

        if 0 < triton_quant.DEQUANT_GEMM_ROWS <= M:
            return "dequantize_swapab + cuBLAS"
        return f"gluon-swapab {gs.BLOCK_N}x{gs.block_m_for(M)}x{gs.MAX_BLOCK_K}/op"
    if kernel.startswith("gluon-swapab-gptq-g128"):
        from ops import gluon_swapab as gs

        auto_sk = gs.use_stream_k(M, N, K, 128, torch.cuda.get_device_properties(0).multi_processor_count)
        return (f"gluon-swapab {gs.BLOCK_N}x{gs.block_m_for(M)}x{gs.MAX_BLOCK_K}/w{gs.NUM_WARPS}x{gs.STAGES}"
                + ("/s1" if kernel.endswith("-s1") else "/split" if kernel.endswith("-dp") or not auto_sk
                   else "/stream-k"))
    if kernel.startswith("gluon-gptq-g128"):
        from ops import gluon_quant as gq

        return (f"gluon {gq.BLOCK_M}x{gq.BLOCK_N}x{gq.MAX_BLOCK_K}/w{gq.NUM_WARPS}"
                f"x{gq.X_STAGES}b{gq.B_STAGES}" + ("/s1" if kernel.endswith("-s1") else "/split"))

    gptq_layout = kernel in ("gptq-g128", "awq-gptq-g128", "gptq-act-sorted-g128")  # as gptq_matmul sees them
    t = triton_quant.tiles_for(M, planar_ok=gptq_layout, packed_ok=gptq_layout)  # bf16 x
    packed = t.packed
    return (f"{t.block_m}x{t.block_n}x{t.block_k}/w{t.num_warps}s{t.num_stages}p{t.programs_per_sm}"
            + ("/planar" if t.planar else "") + ("-wide2" if t.wide2 else "-wide" if t.wide else "")
            + ("/packed" if packed else "") + ("-b" if packed and t.w_as_b and t.block_m >= 64 else "")
            + (f"/m{t.max_split}" if t.max_split != 16 else ""))


def print_best_tiles(rows: list[dict]) -> None:
    """Per (kernel, batch): each tile table's time summed over the layers, fastest first."""
    totals: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        if row["tiles"]:
            totals[(row["kernel"], row["M"])][row["tiles"]] += row["us"]
    print(f"\n{'kernel':>14} {'M':>4}  tile tables, summed us over the layers (fastest first)")
    for (kernel, M), by_table in sorted(totals.items()):
        ranked = sorted(by_table.items(), key=lambda item: item[1])
        print(f"{kernel:>14} {M:>4}  " + "  ".join(f"{name} {us:.1f}" for name, us in ranked))


def main() -> None:
    from ops import triton_quant

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", default=[k for k in KERNELS if not k.startswith(("gluon", "swapab"))],
                        choices=KERNELS, help="default: all but the Gluon ones (Triton 3.6, sm_90 only)")
    parser.add_argument("--layers", nargs="+", default=SHAPE_NAMES, choices=SHAPE_NAMES)
    parser.add_argument("--shapes", default="8b", choices=list(SHAPES),
                        help="Llama-3.1-8B's or 70B's layer shapes (70b: qkv 8192->10240, o 8192->8192, "
                             "gate_up 8192->57344, down 28672->8192)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--tiles", nargs="+", default=["default"], choices=list(triton_quant.CANDIDATE_TILES),
                        help="tile tables of ops.triton_quant.CANDIDATE_TILES to run the Triton kernels with")
    parser.add_argument("--planar-sweep", action="store_true",
                        help="also run tables that differ from the default in the one-row planar entry only")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="time plain calls (host overhead included), no graph")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.planar_sweep:
        sweep = planar_sweep_tables()
        triton_quant.CANDIDATE_TILES.update(sweep)
        args.tiles = [*dict.fromkeys(["default", *args.tiles]), *sweep]
    if not torch.cuda.is_available():
        sys.exit("quant_bench needs a CUDA GPU")
    kernels = [k for k in args.kernels if k != "bnb-int8" or importlib.util.find_spec("bitsandbytes")]
    torch.manual_seed(0)
    rows = []
    print(f"{'layer':>8} {'K':>6} {'N':>6} {'M':>4} {'kernel':>14} {'tiles':>10} {'launch':>27} {'us':>9} {'GB/s':>7} "
          f"{'vs bf16':>8}")
    for name, (K, N) in zip(SHAPE_NAMES, SHAPES[args.shapes]):
        if name not in args.layers:
            continue
        for kernel in kernels:
            copies, weight = layer_copies(kernel, K, N)
            matmul = matmul_of(kernel)
            for tiles in args.tiles if kernel in VARIANT_OF else [""]:
                if tiles:
                    triton_quant.TILES = triton_quant.CANDIDATE_TILES[tiles]
                for M in args.batches:
                    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                    if weight is not None:
                        check(matmul, x, copies[0], weight)
                    eager = args.eager or kernel == "bnb-int8"  # bnb: host syncs, no graph capture
                    us = time_us(matmul, x, copies, args.iters, args.repeats, eager)
                    launch = tiles_label(M, kernel, N, K) if tiles else ""
                    row = dict(layer=name, K=K, N=N, M=M, kernel=kernel, tiles=tiles, launch=launch, eager=eager, us=us,
                               weight_bytes=tensor_bytes(copies[0]), gb_per_s=tensor_bytes(copies[0]) / us / 1e3)
                    rows.append(row)
                    baseline = next((r["us"] for r in rows if r["kernel"] == "bf16" and r["layer"] == name
                                     and r["M"] == M), None)
                    speedup = f"{baseline / us:7.2f}x" if baseline else ""
                    print(f"{name:>8} {K:>6} {N:>6} {M:>4} {kernel:>14} {tiles:>10} {launch:>27} {us:9.1f} "
                          f"{row['gb_per_s']:7.0f} {speedup:>8}", flush=True)
            triton_quant.TILES = triton_quant.CANDIDATE_TILES["default"]
            del copies, weight
            torch.cuda.empty_cache()
    if len(args.tiles) > 1:
        print_best_tiles(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "shapes": args.shapes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
