"""The decode-size GEMV (ops.triton_linear) against F.linear, and the `engine::linear` op that picks it.

On CPU the kernel runs under the Triton interpreter on small odd shapes (outputs not a multiple of
the tile, K not a multiple of the K step, 1 to 4 rows, with and without bias); on a GPU (`-m gpu`)
on Llama-3.1-8B's layer shapes in bf16. Outputs start as NaN, so an element no program writes shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ops.linear  # noqa: F401  (registers torch.ops.engine.linear)

gpu = pytest.mark.gpu
LLAMA_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate_up, down


def check_gemv(M: int, K: int, N: int, dtype: torch.dtype, device: str, bias: bool, tolerance: float) -> None:
    from ops.triton_linear import small_m_linear

    x = torch.randn(M, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) * 0.05).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    small_m_linear(x, weight, b, out=out)
    want = F.linear(x.float(), weight.float(), b.float() if bias else None)
    assert not out.isnan().any(), "unwritten outputs"
    error = (out.float() - want).abs().max().item() / want.abs().max().item()
    assert error < tolerance, (M, K, N, dtype, bias, error)


_INTERPRETER_SCRIPT = """
import torch
from tests.test_triton_linear import check_gemv
torch.manual_seed(0)
for M in (1, 2, 3, 4):
    for K, N in ((96, 42), (64, 24), (1040, 16)):
        check_gemv(M, K, N, torch.float32, "cpu", bias=M % 2 == 1, tolerance=1e-5)
check_gemv(2, 256, 48, torch.bfloat16, "cpu", bias=True, tolerance=1e-2)
print("ok")
"""


def test_gemv_matches_f_linear_under_the_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_linear_op_is_f_linear_off_the_gpu_and_traces_under_compile():
    x, weight, bias = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.equal(torch.ops.engine.linear(x, weight, bias), F.linear(x, weight, bias))
    compiled = torch.compile(lambda a: torch.ops.engine.linear(a, weight, None) * 2, fullgraph=True)
    assert torch.allclose(compiled(x), F.linear(x, weight) * 2)


def test_gemv_refuses_more_rows_than_it_serves():
    pytest.importorskip("triton")
    from ops.triton_linear import small_m_linear

    with pytest.raises(ValueError, match="small_m_linear takes"):
        small_m_linear(torch.randn(5, 8), torch.randn(4, 8))


@gpu
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("K, N", LLAMA_8B_SHAPES + [(4000, 1000), (128, 12)])
def test_gpu_gemv_matches_f_linear(M, K, N):
    check_gemv(M, K, N, torch.bfloat16, "cuda", bias=N == 1000, tolerance=1e-2)


@gpu
def test_gpu_linear_op_takes_the_gemv_only_at_decode_sizes(monkeypatch):
    import ops.triton_linear

    calls = []
    gemv = ops.triton_linear.small_m_linear
    monkeypatch.setattr(ops.triton_linear, "small_m_linear", lambda *a, **k: calls.append(a[0].shape[0]) or gemv(*a, **k))
    weight = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for M in (1, 4, 5, 64):
        x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(torch.ops.engine.linear(x, weight, None), F.linear(x, weight), rtol=2e-2, atol=2e-2)
    assert calls == [1, 4]
