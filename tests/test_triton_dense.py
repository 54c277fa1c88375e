"""The Triton GEMM for decode batches of dense 16-bit weights (ops.triton_dense) against an fp32 matmul on random
weights. Outputs start as NaN, so an element no program writes shows.

On CPU under the Triton interpreter, on tiny shapes: every candidate tile table, rows in each of its classes, with and
without split-K, N and K multiples of no tile, bias. On a GPU (`-m gpu`): Qwen3-0.6B's and Llama-3.1-8B's projection
shapes at 3-256 rows, bf16 and fp16, and replays of a CUDA graph with new inputs.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_triton_gemv import TOLERANCE
from tests.test_triton_quant import run_under_the_interpreter

gpu = pytest.mark.gpu


def check_dense(x: torch.Tensor, weight: torch.Tensor, bias=None) -> None:
    from ops.triton_dense import dense_matmul

    want = x.float() @ weight.float().T + (bias.float() if bias is not None else 0)
    out = torch.full((*x.shape[:-1], weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    got = dense_matmul(x, weight, bias, out=out)
    assert got is out
    assert not got.isnan().any(), f"unwritten (NaN) outputs: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    error = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= TOLERANCE[x.dtype] * scale, f"x {tuple(x.shape)} weight {tuple(weight.shape)} {x.dtype}: {error} vs {scale}"


# The interpreter has 2 "SMs": 64 outputs in one 128-wide tile split K (programs_per_sm >= 2); 300 outputs in 3 tiles
# split less or not; N = 300 and K = 200 are multiples of no tile. fp32 and fp16 (the interpreter's tl.dot mis-handles bf16).
_KERNEL_SCRIPT = """
import torch
from ops import triton_dense
from tests.test_triton_dense import check_dense

torch.manual_seed(0)
for table in triton_dense.CANDIDATE_TILES.values():
    triton_dense.TILES = table
    rows = sorted({min(m, 300) for m, _ in table} | {3})
    for dtype in (torch.float32, torch.float16):
        for N, K in ((64, 256), (300, 200)):
            for M in rows:
                w = (torch.randn(N, K) * 0.1).to(dtype)
                check_dense(torch.randn(M, K).to(dtype), w)
            check_dense(torch.randn(2, 5, K).to(dtype), w, bias=torch.randn(N).to(dtype))  # batched x, bias
check_dense(torch.randn(4, 2 * 64)[:, ::2], torch.randn(24, 64))  # strided x
try:
    triton_dense.dense_matmul(torch.randn(4, 64), torch.randn(24, 64).half())
except ValueError as exc:
    assert "one dtype" in str(exc)
else:
    raise AssertionError("mixed dtypes were accepted")
print("ok")
"""


def test_dense_matmul_matches_the_reference_under_the_interpreter():
    run_under_the_interpreter(_KERNEL_SCRIPT)


# ---------------------------------------------------------------------------------------------
# GPU

# (N, K): Qwen3-0.6B's qkv, o, gate_up, down; Llama-3.1-8B's qkv, o, down; an odd one.
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (6144, 4096), (4096, 4096), (4096, 14336), (1000, 1000)]


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_matmul_matches_the_reference_on_gpu(shape, dtype):
    torch.manual_seed(0)
    N, K = shape
    w = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
    for M in (3, 16, 17, 33, 64, 100, 128, 200, 256):
        check_dense(torch.randn(M, K, device="cuda").to(dtype), w)
    check_dense(torch.randn(40, K, device="cuda").to(dtype), w, bias=torch.randn(N, device="cuda").to(dtype))


@gpu
def test_dense_matmul_in_a_cuda_graph_matches_eager():
    """Split-K and not, replayed with new inputs (the split-K counters reset themselves)."""
    from ops.triton_dense import dense_matmul

    torch.manual_seed(0)
    for M, N, K in ((64, 1024, 3072), (256, 6144, 1024)):
        w = (torch.randn(N, K, device="cuda") * 0.02).bfloat16()
        x = torch.randn(M, K, device="cuda").bfloat16()
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        dense_matmul(x, w, out=out)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dense_matmul(x, w, out=out)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            out.fill_(float("nan"))
            graph.replay()
            torch.testing.assert_close(out, dense_matmul(x, w), rtol=0, atol=0)
