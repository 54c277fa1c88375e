"""The Triton GEMV (ops.triton_gemv) and the dense linear op that sends decode's one- and two-row batches
to it (ops.linear), against an fp32 matmul on random weights. Outputs start as NaN, so an element no
program writes shows.

On CPU under the Triton interpreter, on tiny shapes: with and without split-K, N and K multiples of no
tile, bias, int8 weights with per-output scales, 16-bit and fp32, the SwiGLU activation made in the x
load; and the custom ops traced by torch.compile (one and two rows take the GEMV, three F.linear). On a GPU (`-m gpu`): Llama-3.1-8B's
and its TP=2 ranks' shapes and its LM head, bf16 and fp16, replayed in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_triton_quant import run_under_the_interpreter

gpu = pytest.mark.gpu
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float32, rounded once (what torch.compile makes of the model's activation)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def check_gemv(x: torch.Tensor, weight: torch.Tensor, bias=None, scales=None, tiles=None, silu_mul_x=False) -> None:
    """With silu_mul_x, against the activation as ops.triton_gemv.silu_mul makes it (checked against
    torch on its own: the interpreter rounds float32 to bf16 toward zero, a GPU to nearest)."""
    from ops.triton_gemv import gemv, silu_mul

    want = (silu_mul(x) if silu_mul_x else x).float() @ weight.float().T
    if scales is not None:
        want *= scales.float()
    if bias is not None:
        want += bias.float()
    out = torch.full((*x.shape[:-1], weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    got = gemv(x, weight, bias, scales, tiles, out=out, silu_mul_x=silu_mul_x)
    assert got is out
    assert not got.isnan().any(), f"unwritten (NaN) outputs: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    error = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= TOLERANCE[x.dtype] * scale, f"x {tuple(x.shape)} weight {tuple(weight.shape)} {x.dtype}: {error} vs {scale}"


# The interpreter has 2 "SMs": 24 outputs in tiles of 8 split K in 2 (programs_per_sm 4), 200 outputs
# do not; N = 21 and K = 70 are multiples of no tile.
_KERNEL_SCRIPT = """
import torch
from ops.triton_gemv import GemvTiles
from tests.test_triton_gemv import check_gemv

torch.manual_seed(0)
tiles = [GemvTiles(8, 32, 1, 1, 4), GemvTiles(4, 16, 1, 2, 8)]
for t in tiles:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for N, K in ((24, 64), (200, 64), (21, 70)):
            for M in (1, 2):
                w = torch.randn(N, K).to(dtype)
                check_gemv(torch.randn(M, K).to(dtype), w, tiles=t)
                check_gemv(torch.randn(M, K).to(dtype), w, bias=torch.randn(N).to(dtype), tiles=t)
                check_gemv(torch.randn(M, 2 * K).to(dtype), w, tiles=t, silu_mul_x=True)  # x = [gate, up]
    w8 = torch.randint(-127, 128, (24, 70), dtype=torch.int8)
    check_gemv(torch.randn(2, 70), w8, scales=torch.rand(24) + 0.5, bias=torch.randn(24), tiles=t)
check_gemv(torch.randn(1, 1, 2 * 64)[..., ::2], torch.randn(24, 64))  # batched and strided x
# The activation alone (for the rows the GEMV does not take): every output written, torch.compile's rounding.
from ops.triton_gemv import silu_mul
from tests.test_triton_gemv import silu_mul_reference
for shape in ((3, 2 * 70), (2, 5, 2 * 1100)):
    x = torch.randn(shape).bfloat16()
    got = silu_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, silu_mul_reference(x), rtol=1e-2, atol=1e-2)  # one bf16 ulp: 0.8%
print("ok")
"""

# torch.compile (aot_eager: no C++ compiler needed) traces ops.linear.dense_linear as the custom op, whose
# fake gives the shape; run, one and two rows take the GEMV (patched to count its calls), three F.linear.
_OP_SCRIPT = """
import torch
import torch.nn.functional as F
import ops.linear
from ops import triton_gemv

ops.linear.GEMV_DEVICES = ("cpu",)
calls = []
gemv = triton_gemv.gemv
triton_gemv.gemv = lambda *args, **kwargs: calls.append(1) or gemv(*args, **kwargs)
torch.manual_seed(0)
w, b = torch.randn(24, 64, dtype=torch.float16), torch.randn(24, dtype=torch.float16)
f = torch.compile(lambda x: ops.linear.dense_linear(x, w, b) * 2, backend="aot_eager", fullgraph=True, dynamic=True)
for rows, gemv_calls in ((1, 1), (2, 2), (3, 2), (2, 3)):
    x = torch.randn(rows, 64, dtype=torch.float16)
    got = f(x)
    want = (x.float() @ w.float().T + b.float()) * 2
    assert (got.float() - want).abs().max() <= 2e-3 * want.abs().max(), rows
    assert len(calls) == gemv_calls, (rows, calls)
assert ops.linear.dense_linear(torch.randn(1, 64), w.float()).shape == (1, 24)  # fp32: F.linear
assert len(calls) == 3
# The MLP's down projection with the activation: one and two rows through the GEMV (silu_mul_x), three not.
g = torch.compile(lambda x: ops.linear.silu_mul_dense_linear(x, w, b), backend="aot_eager", fullgraph=True, dynamic=True)
for rows, gemv_calls in ((1, 4), (2, 5), (3, 5)):
    x = torch.randn(rows, 128, dtype=torch.float16)
    gate, up = x.float().chunk(2, dim=-1)
    want = (F.silu(gate) * up).half().float() @ w.float().T + b.float()
    got = g(x)
    assert (got.float() - want).abs().max() <= 2e-3 * want.abs().max(), rows
    assert len(calls) == gemv_calls, (rows, calls)
print("ok")
"""


def test_gemv_matches_the_reference_under_the_interpreter():
    run_under_the_interpreter(_KERNEL_SCRIPT)


def test_dense_linear_op_sends_one_and_two_rows_to_the_gemv_under_the_interpreter():
    run_under_the_interpreter(_OP_SCRIPT)


def test_dense_linear_on_cpu_is_f_linear():
    from ops.linear import dense_linear

    x, w, b = torch.randn(2, 3, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.equal(dense_linear(x, w, b), torch.nn.functional.linear(x, w, b))


# ---------------------------------------------------------------------------------------------
# GPU

# (N, K): Llama-3.1-8B's qkv, o, gate_up, down, LM head; then a TP=2 rank's qkv, o, gate_up, down.
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
          (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168), (1000, 1000)]


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_the_reference_on_gpu(shape, dtype):
    torch.manual_seed(0)
    N, K = shape
    w = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
    for M in (1, 2):
        check_gemv(torch.randn(M, K, device="cuda").to(dtype), w)
        check_gemv(torch.randn(M, 2 * K, device="cuda").to(dtype), w, silu_mul_x=True)  # the down projection's form
    check_gemv(torch.randn(1, K, device="cuda").to(dtype), w, bias=torch.randn(N, device="cuda").to(dtype))


@gpu
def test_silu_mul_matches_torch_on_gpu():
    """The activation the GEMV makes in its x load, alone: as torch.compile rounds it (once, to nearest)."""
    from ops.triton_gemv import silu_mul

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(37, 2 * 7168, device="cuda").to(dtype)
        want = silu_mul_reference(x)
        got = silu_mul(x)
        torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])  # a last bit
        if dtype != torch.float32:  # in 16 bits the rounding hides float32's last-bit differences
            assert (got != want).float().mean() < 0.01, "more than the odd last bit differs"


@gpu
def test_gemv_int8_weights_on_gpu():
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, device="cuda")
    scales = (torch.rand(4096, device="cuda") * 0.01).bfloat16()
    for M in (1, 2):
        check_gemv(torch.randn(M, 4096, device="cuda").bfloat16(), w, scales=scales)


@gpu
def test_gemv_in_a_cuda_graph_matches_eager():
    """Split-K (1000 outputs: too few tiles alone) and not, replayed with new inputs."""
    from ops.triton_gemv import gemv

    torch.manual_seed(0)
    for N, K in ((1000, 4096), (28672, 4096)):
        w = (torch.randn(N, K, device="cuda") * 0.02).bfloat16()
        x = torch.randn(2, K, device="cuda").bfloat16()
        gemv(x, w)  # compile, and make the split-K counters, before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = gemv(x, w)
        for _ in range(3):
            x.copy_(torch.randn(2, K, device="cuda").bfloat16())
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, gemv(x, w))
