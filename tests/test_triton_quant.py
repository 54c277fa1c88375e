"""The Triton quantized matmuls (ops.triton_quant) against the pure-torch dequantize-then-matmul
reference (ops.quant_ref), on random packed weights: every nibble pattern, zero and group is valid.

On CPU they run under the Triton interpreter on tiny shapes: every batch-size class of every candidate
tile table (the GEMV, the split-K tl.dot decode path and the GEMM tiles, at each class's first and last
batch), with and without split-K and column masks, every group size, GPTQ v1/v2, act-order and one
group per channel, and K not a multiple of the K-tile. On a GPU (`-m gpu`) on the layer shapes of
Llama-3.1-8B and 70B, batches 1..512, fp16 and bf16, and replayed in CUDA graphs. Outputs start as
NaN, so an element no program writes shows.
"""

from __future__ import annotations

import pytest
import torch

import ops.quant_matmul  # noqa: F401  (registers the torch.ops.engine quantized matmuls)
from ops.quant_ref import dequantize_awq, dequantize_gptq
from tests.interpreter import run_under_the_interpreter

gpu = pytest.mark.gpu

# name -> (format, options); group_size -1 is one group over all inputs (GPTQ only).
VARIANTS = {
    "awq-g32": ("awq", dict(group_size=32)),
    "awq-g64": ("awq", dict(group_size=64)),
    "awq-g128": ("awq", dict(group_size=128)),
    "gptq-v1-g32": ("gptq", dict(group_size=32)),
    "gptq-v1-g64": ("gptq", dict(group_size=64)),
    "gptq-v1-g128": ("gptq", dict(group_size=128)),
    "gptq-v2-g128": ("gptq", dict(group_size=128, zeros_minus_one=False)),
    "gptq-act-order-g128": ("gptq", dict(group_size=128, act_order=True)),
    "gptq-act-order-g32": ("gptq", dict(group_size=32, act_order=True)),
    "gptq-per-channel": ("gptq", dict(group_size=-1)),
    "int8": ("int8", {}),
}
# Relative to the largest output: the output's rounding in its dtype, plus fp32 accumulation order.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_words(shape: tuple[int, ...], device) -> torch.Tensor:
    """int32 words of 8 random nibbles (the sign bit included)."""
    return torch.randint(-2**31, 2**31, shape, dtype=torch.int64, device=device).to(torch.int32)


def random_layer(variant: str, K: int, N: int, dtype: torch.dtype, device) -> tuple[dict, torch.Tensor]:
    """(the tensors and settings the kernel's entry function takes, the weight [K, N] they stand for
    in float32, rounded to `dtype` as the kernel rounds it before its dot)."""
    fmt, options = VARIANTS[variant]
    if fmt == "int8":
        weight = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
        scale = (torch.rand(N, device=device) * 0.02 + 1e-3).to(dtype)
        # The kernel scales the fp32 accumulator: the weight itself enters the dot exactly.
        return dict(weight=weight, scale=scale), weight.float().T * scale.float()
    group_size = options["group_size"]
    groups = 1 if group_size == -1 else K // group_size
    scales = (torch.rand(groups, N, device=device) * 0.02 + 1e-3).half()
    qzeros = random_words((groups, N // 8), device)
    if fmt == "awq":
        qweight = random_words((K, N // 8), device)
        tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales, group_size=group_size)
        return tensors, dequantize_awq(qweight, qzeros, scales, group_size).to(dtype).float()
    qweight = random_words((K // 8, N), device)
    g_idx = torch.arange(K, device=device, dtype=torch.int32) // (K if group_size == -1 else group_size)
    act_order = options.get("act_order", False)
    if act_order:
        g_idx = g_idx[torch.randperm(K, device=device)]
    zeros_minus_one = options.get("zeros_minus_one", True)
    tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, group_size=group_size,
                   act_order=act_order, zeros_minus_one=zeros_minus_one)
    return tensors, dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_minus_one).to(dtype).float()


def check_kernel(variant: str, layer: tuple[dict, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Run the variant's Triton entry function on x [..., K] into a NaN-filled output; compare."""
    from ops import triton_quant

    tensors, weight = layer
    fmt = VARIANTS[variant][0]
    matmul = {"awq": triton_quant.awq_matmul, "gptq": triton_quant.gptq_matmul, "int8": triton_quant.int8_matmul}[fmt]
    out = torch.full((*x.shape[:-1], weight.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    got = matmul(x, **tensors, bias=bias, out=out)
    assert got is out
    want = x.float() @ weight
    if bias is not None:
        want += bias.float()
    assert not got.isnan().any(), f"{variant}: unwritten (NaN) outputs, M={x.shape[:-1]}"
    error = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= TOLERANCE[x.dtype] * scale, f"{variant} M={tuple(x.shape[:-1])} {x.dtype}: {error} vs {scale}"


# ---------------------------------------------------------------------------------------------
# CPU: the Triton interpreter (a fresh process: TRITON_INTERPRET is read when a kernel is decorated).
# fp32 and fp16 only: the interpreter's tl.dot mis-handles bf16.

# With the interpreter's 2 "SMs", N=96 (a multiple of no BLOCK_N: masked columns) has one output tile
# per batch-size class and splits K in all of them; N=384 (a multiple of every BLOCK_N) splits K only
# for decode batches. K=200 is a multiple of no BLOCK_K (for the formats that allow it).
_INTERPRETER_PRELUDE = """
import torch
from ops import triton_quant
from tests.test_triton_quant import VARIANTS, check_kernel, random_layer

def class_bounds(table):  # the first and the last batch of every batch-size class of a tile table
    lasts = [max_m for max_m, _ in table if max_m < 1 << 62]
    return sorted({1, *lasts, *(m + 1 for m in lasts)})

torch.manual_seed(0)
"""

_DEFAULT_TILES_SCRIPT = _INTERPRETER_PRELUDE + """
batches = class_bounds(triton_quant.TILES)
for variant in VARIANTS:
    for dtype in (torch.float32, torch.float16):
        layer = random_layer(variant, 256, 96, dtype, "cpu")
        for M in batches:
            check_kernel(variant, layer, torch.randn(M, 256).to(dtype))
    layer = random_layer(variant, 256, 384, torch.float16, "cpu")
    for M in batches:
        check_kernel(variant, layer, torch.randn(M, 256).half())
    x = torch.randn(2, 3, 2 * 256)[..., ::2]  # batched and strided: copied to rows of K
    check_kernel(variant, random_layer(variant, 256, 96, torch.float32, "cpu"), x, bias=torch.randn(96))
for variant in ("int8", "gptq-per-channel"):
    layer = random_layer(variant, 200, 96, torch.float32, "cpu")
    for M in batches:
        check_kernel(variant, layer, torch.randn(M, 200), bias=torch.randn(96))
print("ok")
"""

_CANDIDATE_TILES_SCRIPT = _INTERPRETER_PRELUDE + """
for table in triton_quant.CANDIDATE_TILES.values():
    if table == triton_quant.TILES:
        continue  # the default: tested above
    triton_quant.TILES = table
    for variant in ("awq-g128", "gptq-v1-g32", "gptq-act-order-g128", "gptq-per-channel", "int8"):
        for K, N in ((256, 96), (256, 384)):
            layer = random_layer(variant, K, N, torch.float16, "cpu")
            for M in class_bounds(table):
                check_kernel(variant, layer, torch.randn(M, K).half())
print("ok")
"""

# The planar kernel (1 and 2 rows of GPTQ's layout) in each planar tile table, in the three dtypes (its
# 16-bit forms read x differently from fp32; bf16 as the engine runs it), K-tiles that are and are not
# one group, v1 and v2 zeros, and rows that are not 8-byte aligned (bf16 x, copied for the WIDE form).
_PLANAR_SCRIPT = _INTERPRETER_PRELUDE + """
triton_quant.TILES = triton_quant.CANDIDATE_TILES[TABLE]
assert all(triton_quant.tiles_for(M, planar_ok=True).planar for M in (1, 2))
for variant in ("gptq-v1-g128", "gptq-v2-g128", "gptq-v1-g32", "gptq-per-channel"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        layer = random_layer(variant, 256, 96, dtype, "cpu")
        for M in (1, 2):
            check_kernel(variant, layer, torch.randn(M, 256).to(dtype))
x = torch.randn(2, 257)[:, 1:].bfloat16()  # rows 257 inputs apart
check_kernel("gptq-v1-g128", random_layer("gptq-v1-g128", 256, 96, torch.bfloat16, "cpu"), x,
             bias=torch.randn(96).bfloat16())
print("ok")
"""


# From DEQUANT_GEMM_ROWS rows, GPTQ's layout with 16-bit x dequantizes into a scratch (`_dequant_gptq_kernel`) and
# multiplies with torch: every zero format and group size, bf16 and fp16, a bias, rows below the bound (the tiles, fp16).
_DEQUANT_GEMM_SCRIPT = _INTERPRETER_PRELUDE + """
triton_quant.DEQUANT_GEMM_ROWS = 4
for variant in ("gptq-v1-g128", "gptq-v2-g128", "gptq-v1-g32", "gptq-per-channel"):  # AWQ runs repacked as v2
    for dtype in (torch.float16, torch.bfloat16):
        for K, N in ((256, 96), (256, 384)):
            layer = random_layer(variant, K, N, dtype, "cpu")
            for M in (3, 4, 37) if dtype == torch.float16 else (4, 37):  # 3 rows: the tiles (no interpreted bf16 dot)
                check_kernel(variant, layer, torch.randn(M, K).to(dtype), bias=torch.randn(N).to(dtype))
qweight, qzeros, scales = (random_layer("gptq-v1-g32", 256, 384, torch.float16, "cpu")[0][k] for k in ("qweight", "qzeros", "scales"))
from ops.quant_ref import dequantize_gptq
want = dequantize_gptq(qweight, qzeros, scales, torch.arange(256) // 32, True)
for dtype in (torch.float32, torch.float16):  # bit for bit (the interpreter truncates to bf16: the GPU test checks it)
    assert torch.equal(triton_quant.dequantize_gptq(qweight, qzeros, scales, 32, 1, dtype), want.to(dtype)), dtype
from ops.gluon_swapab import repack_swapab  # the same weight in the swap-AB GEMM's words (ENGINE_SWAPAB_GEMM=1)
for variant, group, zero_offset in (("gptq-v1-g32", 32, 1), ("gptq-v2-g128", 128, 0), ("gptq-per-channel", -1, 1)):
    layer = random_layer(variant, 256, 384, torch.float16, "cpu")[0]
    want = dequantize_gptq(layer["qweight"], layer["qzeros"], layer["scales"], torch.arange(256) // (256 if group == -1
                           else group), bool(zero_offset))
    for dtype in (torch.float32, torch.float16):
        got = triton_quant.dequantize_swapab(repack_swapab(layer["qweight"]), layer["qzeros"], layer["scales"], group,
                                             zero_offset, dtype)
        assert torch.equal(got, want.to(dtype)), (variant, dtype)
print("ok")
"""


def test_large_batches_dequantize_then_multiply_under_the_interpreter():
    run_under_the_interpreter(_DEQUANT_GEMM_SCRIPT, timeout=900)


def test_triton_quant_kernels_match_the_reference_under_the_interpreter():
    run_under_the_interpreter(_DEFAULT_TILES_SCRIPT, timeout=900)


@pytest.mark.slow
def test_every_candidate_tile_table_matches_the_reference_under_the_interpreter():
    run_under_the_interpreter(_CANDIDATE_TILES_SCRIPT, timeout=900)


@pytest.mark.parametrize("table", ["default", "session6", "planar-narrow"])
def test_planar_kernel_matches_the_reference_under_the_interpreter(table):
    run_under_the_interpreter(_PLANAR_SCRIPT.replace("TABLE", repr(table)), timeout=900)


# ---------------------------------------------------------------------------------------------
# GPU

# (K, N) of Llama-3.1-8B's qkv, o, gate_up, down projections, then 70B's (one rank each).
LLAMA_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
LLAMA_70B_SHAPES = [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]
BATCHES = (1, 2, 4, 7, 16, 64, 128, 512)  # every batch-size class of the default tiles


@gpu
@pytest.mark.parametrize("shape", LLAMA_8B_SHAPES + LLAMA_70B_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_quant_kernels_match_the_reference_on_llama_shapes(variant, shape):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    K, N = shape
    for dtype in (torch.float16, torch.bfloat16):
        layer = random_layer(variant, K, N, dtype, "cuda")
        for M in BATCHES:
            check_kernel(variant, layer, torch.randn(M, K, device="cuda").to(dtype))
        del layer
        torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("variant", ["gptq-v1-g128", "gptq-v2-g128", "gptq-per-channel"])
def test_large_batches_dequantize_then_multiply_on_llama_70b_shapes(variant, monkeypatch):
    """ENGINE_DEQUANT_GEMM_ROWS's path: the weight dequantized bit for bit as the reference does it (bf16 and
    fp16), the product within the kernels' tolerance, 70B's shapes, rows at and above the bound."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ops import triton_quant

    monkeypatch.setattr(triton_quant, "DEQUANT_GEMM_ROWS", 1024)
    torch.manual_seed(0)
    for K, N in LLAMA_70B_SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            layer = random_layer(variant, K, N, dtype, "cuda")
            tensors, weight = layer
            group_size = K if tensors["group_size"] == -1 else tensors["group_size"]
            got = triton_quant.dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size,
                                               int(tensors["zeros_minus_one"]), dtype)
            assert torch.equal(got.float(), weight), (variant, K, N, dtype)
            for M in (1024, 1500):
                check_kernel(variant, layer, torch.randn(M, K, device="cuda").to(dtype),
                             bias=torch.randn(N, device="cuda").to(dtype))
            del layer, got
            torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("variant", ["awq-g128", "gptq-act-order-g128", "int8"])
def test_quantized_matmul_ops_run_the_triton_kernels_and_replay_in_a_cuda_graph(variant):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    K, N = 4096, 6144
    tensors, weight = random_layer(variant, K, N, torch.bfloat16, "cuda")
    fmt = VARIANTS[variant][0]
    op = getattr(torch.ops.engine, f"{fmt}_matmul")
    args = {"awq": ("qweight", "qzeros", "scales", "group_size"), "int8": ("weight", "scale"),
            "gptq": ("qweight", "qzeros", "scales", "g_idx", "group_size", "act_order", "zeros_minus_one")}[fmt]
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    for M in (1, 16, 64):  # split-K decode and GEMM
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        op(x, *(tensors[a] for a in args), bias)  # warm-up: compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = op(x, *(tensors[a] for a in args), bias)
        for _ in range(2):  # the split-K counters are zero again after each replay
            x.copy_(torch.randn_like(x))
            out.fill_(float("nan"))
            graph.replay()
            want = x.float() @ weight + bias.float()
            assert (out.float() - want).abs().max() <= TOLERANCE[torch.bfloat16] * want.abs().max()


@gpu
@pytest.mark.parametrize("variant,dequant_rows", [("awq-g128", 0), ("gptq-v1-g64", 0), ("awq-g128", 256)])
def test_swapab_matmul_op_runs_the_swapab_gemm_and_replays_in_a_cuda_graph(variant, dequant_rows, monkeypatch):
    """engine::swapab_matmul (ENGINE_SWAPAB_GEMM=1's op) on CUDA: the swap-AB Gluon GEMM on the repacked weight
    (with DEQUANT_GEMM_ROWS set, from that many rows the weight dequantized by `dequantize_swapab` and cuBLAS),
    against the reference at every batch-size class, captured and replayed in a CUDA graph; and
    engine::dual_4bit_matmul (`auto`'s op) on both sides of its row switch."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    from ops import gluon_swapab
    from ops.quant_ref import awq_to_gptq

    if not gluon_swapab.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon")
    from ops import triton_quant

    monkeypatch.setattr(triton_quant, "DEQUANT_GEMM_ROWS", dequant_rows)
    torch.manual_seed(0)
    K, N = 4096, 6144
    tensors, weight = random_layer(variant, K, N, torch.bfloat16, "cuda")
    if VARIANTS[variant][0] == "awq":  # as the engine loads it: GPTQ's layout, zeros as stored
        qweight, qzeros = awq_to_gptq(tensors["qweight"], tensors["qzeros"])
        zeros_minus_one = False
    else:
        qweight, qzeros, zeros_minus_one = tensors["qweight"], tensors["qzeros"], tensors["zeros_minus_one"]
    packed = gluon_swapab.repack_swapab(qweight)
    group_size = tensors["group_size"]
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    for M, dual in ((1, False), (77, False), (256, False), (300, False), (1, True), (2, True), (3, True), (200, True)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        if dual:  # ENGINE_SWAPAB_GEMM=auto's op: 1-2 rows on qweight (the planar GEMV), more on the repacked copy
            op = lambda: torch.ops.engine.dual_4bit_matmul(x, qweight, packed, qzeros, tensors["scales"], group_size,
                                                           zeros_minus_one, bias)
        else:
            op = lambda: torch.ops.engine.swapab_matmul(x, packed, qzeros, tensors["scales"], group_size,
                                                        zeros_minus_one, bias)
        op()  # warm-up: compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = op()
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            out.fill_(float("nan"))
            graph.replay()
            want = x.float() @ weight + bias.float()
            assert (out.float() - want).abs().max() <= TOLERANCE[torch.bfloat16] * want.abs().max(), M


@gpu
def test_act_order_sorted_by_group_runs_the_kernels_without_act_order_and_gives_the_same_product():
    """What the engine does with a GPTQ act-order layer (`sort_by_group` at load, x gathered by the
    order each call), on CUDA: every batch class's kernel (planar, split-K, tiled) without act-order."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ops.quant_ref import sort_by_group

    torch.manual_seed(0)
    K, N = 4096, 6144
    tensors, weight = random_layer("gptq-act-order-g128", K, N, torch.bfloat16, "cuda")
    qweight, g_idx, order = sort_by_group(tensors["qweight"], tensors["g_idx"], tensors["group_size"])
    assert order is not None and torch.equal(g_idx.long(), torch.arange(K, device="cuda") // 128)
    sorted_layer = {**tensors, "qweight": qweight, "g_idx": g_idx, "act_order": False}
    for M in (1, 2, 16, 256):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        check_kernel("gptq-act-order-g128", (sorted_layer, weight[order]), x.index_select(-1, order))
