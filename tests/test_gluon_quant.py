"""The Gluon W4A16 GEMM (ops.gluon_quant) for GPTQ's layout.

CPU: compiled offline for sm_90 under Triton 3.6's Gluon (the local Triton if it is 3.6, else a side install
named by $GLUON_TRITON_SITE or found at /tmp/t36; skipped without one): the K loop waits for wgmma with
`wait_group 1` only, writes the next dequantized W tile between the current wgmmas and that wait, and neither
spills nor draws a ptxas serialization warning.

GPU (`-m gpu`, Hopper): against the dequantize-then-matmul reference (ops.quant_ref via random_layer) on the
Llama-3.1-70B shapes, bf16 and fp16, groups 32 (GPTQ v1 zeros) and 128 (v2 zeros, as AWQ repacked), rows 129,
256 and 300 (and a few off the 256-row grid), with and without split-K, into NaN-filled outputs so an unwritten
element shows; and replayed in a CUDA graph (the split-K counters reset themselves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_triton_quant import LLAMA_70B_SHAPES, TOLERANCE, random_layer

gpu = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


def _triton36_env() -> dict | None:
    """Environment for a Python whose `import triton` is 3.6 (None if there is none)."""
    try:
        import triton

        if triton.__version__.startswith("3.6."):
            return dict(os.environ)
    except ImportError:
        pass
    for site in (os.environ.get("GLUON_TRITON_SITE"), "/tmp/t36/lib/python3.11/site-packages"):
        if site and Path(site, "triton", "experimental", "gluon").is_dir():
            return {**os.environ, "PYTHONPATH": site}
    return None


@pytest.mark.parametrize("dtype,group,split_k", [("bf16", 128, False), ("fp16", 32, True)])
def test_gluon_kernel_compiles_for_sm90_with_the_dequant_under_an_async_wgmma(dtype, group, split_k):
    env = _triton36_env()
    if env is None:
        pytest.skip("needs Triton 3.6's Gluon (local triton, $GLUON_TRITON_SITE or /tmp/t36)")
    code = ("import json, sys; sys.path.insert(0, '.'); from perf.gluon_sass import analyze; "
            f"info = analyze({dtype!r}, {group}, split_k={split_k}); info.pop('_body'); print(json.dumps(info))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["triton"].startswith("3.6.")
    assert "1" in info["ptx_wait_groups"], info["ptx_wait_groups"]  # the loop's wait leaves one wgmma running
    assert info["loop_wgmma_waits"] == ["WARPGROUP.DEPBAR.LE gsb0, 0x1"], info["loop_wgmma_waits"]
    assert info["loop_hgmma"] == info["block_k"] // 16  # one K-tile an iteration, 16 deep an HGMMA
    assert info["sts_between_hgmma_and_wait"], info
    assert info["spill_bytes"] == 0 and info["local"] == 0 and info["stack"] == 0, info
    assert not [w for w in info["ptxas_warnings"] if "C75" in w], info["ptxas_warnings"]
    assert info["shared_bytes"] <= 227 * 1024


def test_split_for_fills_the_sms_of_an_h100_on_the_70b_layers_at_256_rows():
    gq = pytest.importorskip("ops.gluon_quant")
    sms = 132
    # (output tiles at 256 rows, 64-deep K-tiles) -> K ranges: qkv, o, gate_up, down
    assert [gq.split_for(n // 128, k // 64, sms) for k, n in LLAMA_70B_SHAPES] == [3, 2, 1, 2]
    assert gq.split_for(1000, 128, sms) == 1  # enough tiles: no split
    assert gq.split_for(1, 16, sms) == 1  # too few K-tiles to cut


def test_gluon_gptq_matmul_refuses_what_it_cannot_run():
    gq = pytest.importorskip("ops.gluon_quant")
    if not gq.HAVE_GLUON:
        pytest.skip("no Gluon")
    qweight = torch.zeros(1024 // 8, 384, dtype=torch.int32)
    qzeros, scales = torch.zeros(8, 384 // 8, dtype=torch.int32), torch.ones(8, 384, dtype=torch.float16)
    x = torch.zeros(4, 1024, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        gq.gluon_gptq_matmul(x.float(), qweight, qzeros, scales, 128, 0)
    with pytest.raises(ValueError, match="unsupported shape"):  # N not a multiple of 128
        gq.gluon_gptq_matmul(x, qweight[:, :200], qzeros[:, :25], scales[:, :200], 128, 0)
    with pytest.raises(ValueError, match="unsupported shape"):  # group 16
        gq.gluon_gptq_matmul(x, qweight, qzeros, scales, 16, 0)


def _check(layer, weight, x, bias=None, split_k=None):
    from ops.gluon_quant import gluon_gptq_matmul

    K, N = weight.shape
    out = torch.full((*x.shape[:-1], N), float("nan"), dtype=x.dtype, device=x.device)
    got = gluon_gptq_matmul(x, layer["qweight"], layer["qzeros"], layer["scales"], layer["group_size"],
                            zero_offset=int(layer["zeros_minus_one"]), bias=bias, out=out, split_k=split_k)
    assert got is out
    want = x.float() @ weight
    if bias is not None:
        want += bias.float()
    assert not got.isnan().any(), f"unwritten (NaN) outputs, M={x.shape[0]}"
    error = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= TOLERANCE[x.dtype] * scale, f"M={x.shape[0]} {x.dtype}: {error} vs {scale}"


def _needs_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs sm_90 (wgmma)")


@gpu
@pytest.mark.parametrize("shape", LLAMA_70B_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["gptq-v1-g32", "gptq-v2-g128"])
def test_gluon_gptq_matmul_matches_the_reference_on_70b_shapes(variant, shape):
    _needs_hopper()
    torch.manual_seed(0)
    K, N = shape
    for dtype in (torch.bfloat16, torch.float16):
        layer, weight = random_layer(variant, K, N, dtype, "cuda")
        for M in (129, 256, 300):
            _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype))  # split-K as split_for picks it
        _check(layer, weight, torch.randn(256, K, device="cuda").to(dtype), split_k=1)  # no split-K
        del layer, weight
        torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gluon_gptq_matmul_small_shapes_any_rows_and_bias(dtype):
    _needs_hopper()
    torch.manual_seed(0)
    K, N = 1024, 384
    for variant in ("gptq-v1-g32", "gptq-v1-g64", "gptq-v2-g128"):
        layer, weight = random_layer(variant, K, N, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        for M in (1, 7, 64, 255, 257, 512, 513):
            for split_k in (1, 3, 5):  # g32, 5: four ranges of 7 K-tiles and one of 4
                _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype), split_k=split_k)
            _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype), bias=bias)
            _check(layer, weight, torch.randn(M, K, device="cuda").to(dtype), bias=bias, split_k=2)
        _check(layer, weight, torch.randn(3, 50, K, device="cuda").to(dtype))  # [..., K]
        _check(layer, weight, torch.randn(100, K + 4, device="cuda").to(dtype)[:, :K])  # row stride not 16 bytes


@gpu
def test_gluon_gptq_matmul_replays_in_a_cuda_graph_with_split_k():
    _needs_hopper()
    torch.manual_seed(0)
    K, N = 8192, 8192  # 70B's o: 64 tiles at 256 rows, split in 2
    layer, weight = random_layer("gptq-v2-g128", K, N, torch.bfloat16, "cuda")
    from ops.gluon_quant import gluon_gptq_matmul

    x = torch.randn(256, K, device="cuda", dtype=torch.bfloat16)
    call = lambda: gluon_gptq_matmul(x, layer["qweight"], layer["qzeros"], layer["scales"], 128, 0)  # noqa: E731
    call()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        want = x.float() @ weight
        assert (out.float() - want).abs().max() <= TOLERANCE[torch.bfloat16] * want.abs().max()


def test_engine_sends_large_batches_to_the_gluon_gemm_only_when_asked_and_supported(monkeypatch):
    """ENGINE_GLUON_GEMM_ROWS's dispatch in ops.triton_quant: from that many rows, a 16-bit GPTQ-layout matmul
    goes to gluon_gptq_matmul (stood in for here: no GPU) with the layer's tensors and writes the caller's output;
    `supports` refuses CPU tensors, so CPU runs never get there."""
    pytest.importorskip("triton")
    gq = pytest.importorskip("ops.gluon_quant")
    from ops import triton_quant
    from ops.quant_ref import gptq_matmul_ref
    from tests.test_triton_quant import random_layer

    tensors, _ = random_layer("gptq-v2-g128", 256, 128, torch.float16, "cpu")
    x = torch.randn(5, 256).half()
    assert not gq.supports(x, tensors["qweight"], tensors["qzeros"], tensors["scales"], 128)
    calls = []

    def fake(x2, qweight, qzeros, scales, group_size, zero_offset, bias, out):
        calls.append((x2.shape, group_size, zero_offset))
        out.copy_(gptq_matmul_ref(x2, qweight, qzeros, scales, torch.arange(256) // group_size, bool(zero_offset), bias))
        return out

    monkeypatch.setattr(gq, "supports", lambda *args: True)
    monkeypatch.setattr(gq, "gluon_gptq_matmul", fake)
    monkeypatch.setattr(triton_quant, "GLUON_GEMM_ROWS", 4)
    out = torch.full((5, 128), float("nan"), dtype=torch.float16)
    got = triton_quant.gptq_matmul(x, **tensors, out=out)
    assert got is out and calls == [((5, 256), 128, 0)]
    want = gptq_matmul_ref(x, tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], False)
    torch.testing.assert_close(out, want)
