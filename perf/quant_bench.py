"""Quantized-matmul benchmark: the Triton AWQ / GPTQ / int8 kernels (ops.triton_quant) vs a bf16
torch matmul, on Llama-3.1-8B's projection shapes at batch 1, 16 and 256.

    python perf/quant_bench.py --out perf/quant_bench.json

Each kernel is warmed up (Triton compiles) outside the timer, then `--iters` back-to-back calls are
timed with CUDA events and averaged. Each call reads a different copy of the layer's weights, enough
copies (>= 256 MB in all) that L2 cannot serve them, so the weight bytes really come from HBM.
"GB/s" is the layer's stored weight bytes (packed weights, zeros, scales, g_idx) over the time: at
batch 1 the matmuls are bound by these reads, so it compares against the device's HBM bandwidth
(~3 TB/s copy on the lent H100); at 256 they are bound by compute and the number is only relative.

- bf16:          F.linear with a bf16 weight [N, K] (cuBLAS), the unquantized baseline
- awq-g128:      AWQ GEMM layout, group 128
- gptq-g128:     GPTQ v1, group 128, no act-order (group of a K-tile from its index)
- gptq-act-g128: GPTQ v1, group 128, act-order (zeros and scales gathered per input row via g_idx)
- int8:          weight-only int8 with per-output-channel scales
- bnb-int8:      bitsandbytes LLM.int8() (threshold 6.0), if bitsandbytes is installed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, no install needed

import ops.quant_matmul  # noqa: E402,F401  (registers torch.ops.engine.bnb_int8_matmul)
from tests.test_triton_quant import LLAMA_8B_SHAPES, random_layer  # noqa: E402

SHAPE_NAMES = ["qkv", "o", "gate_up", "down"]  # the order of LLAMA_8B_SHAPES
BATCHES = (1, 16, 256)
L2_DEFEAT_BYTES = 256 << 20
KERNELS = ["bf16", "awq-g128", "gptq-g128", "gptq-act-g128", "int8", "bnb-int8"]
VARIANT_OF = {"awq-g128": "awq-g128", "gptq-g128": "gptq-v1-g128", "gptq-act-g128": "gptq-act-order-g128",
              "int8": "int8"}


def layer_copies(kernel: str, K: int, N: int) -> list[dict]:
    """Enough copies of one layer's stored tensors that cycling through them defeats L2."""
    copies = []
    while not copies or sum(tensor_bytes(c) for c in copies) < L2_DEFEAT_BYTES:
        copies.append(make_layer(kernel, K, N))
    return copies


def make_layer(kernel: str, K: int, N: int) -> dict:
    if kernel == "bf16":
        return {"weight": torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02}
    if kernel == "bnb-int8":
        from engine.quantization.bnb import quantize_llm_int8

        weight, scb = quantize_llm_int8(torch.randn(N, K, device="cuda") * 0.02)
        return {"weight": weight, "SCB": scb}
    tensors, _ = random_layer(VARIANT_OF[kernel], K, N, torch.bfloat16, "cuda")
    return tensors


def tensor_bytes(layer: dict) -> int:
    return sum(t.numel() * t.element_size() for t in layer.values() if isinstance(t, torch.Tensor))


def matmul_of(kernel: str) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    if kernel == "bf16":
        return lambda x, layer: F.linear(x, layer["weight"])
    if kernel == "bnb-int8":
        return lambda x, layer: torch.ops.engine.bnb_int8_matmul(x, layer["weight"], layer["SCB"], 6.0, None)
    from ops import triton_quant

    fmt = VARIANT_OF[kernel].split("-")[0]
    function = {"awq": triton_quant.awq_matmul, "gptq": triton_quant.gptq_matmul, "int8": triton_quant.int8_matmul}[fmt]
    return lambda x, layer: function(x, **layer)


def time_us(matmul: Callable, x: torch.Tensor, copies: list[dict], iters: int) -> float:
    for layer in copies[:3]:  # warm-up: compilation and first launches, outside the timer
        matmul(x, layer)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        matmul(x, copies[i % len(copies)])
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("quant_bench needs a CUDA GPU")
    kernels = [k for k in args.kernels if k != "bnb-int8" or importlib.util.find_spec("bitsandbytes")]
    torch.manual_seed(0)
    rows = []
    print(f"{'layer':>8} {'K':>6} {'N':>6} {'M':>4} {'kernel':>14} {'us':>9} {'GB/s':>7} {'vs bf16':>8}")
    for name, (K, N) in zip(SHAPE_NAMES, LLAMA_8B_SHAPES):
        for kernel in kernels:
            copies = layer_copies(kernel, K, N)
            matmul = matmul_of(kernel)
            for M in args.batches:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                us = time_us(matmul, x, copies, args.iters)
                row = dict(layer=name, K=K, N=N, M=M, kernel=kernel, us=us,
                           weight_bytes=tensor_bytes(copies[0]), gb_per_s=tensor_bytes(copies[0]) / us / 1e3)
                rows.append(row)
                baseline = next((r["us"] for r in rows if r["kernel"] == "bf16" and r["layer"] == name
                                 and r["M"] == M), None)
                speedup = f"{baseline / us:7.2f}x" if baseline else ""
                print(f"{name:>8} {K:>6} {N:>6} {M:>4} {kernel:>14} {us:9.1f} {row['gb_per_s']:7.0f} {speedup:>8}")
            del copies
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
