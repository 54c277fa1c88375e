"""Qwen3's q/k RMSNorm + rotation as one kernel (`engine::qk_norm_rope`, ops/triton_qk_norm.py) against the
torch arithmetic the model uses without it. On the CPU the Triton kernel runs under the interpreter (a fresh
process: TRITON_INTERPRET is read when a kernel is decorated); on the GPU (`pytest -m gpu`) at nano's shapes,
and through the engine against eager."""

from __future__ import annotations

import pytest
import torch

from engine.models.qwen3 import qk_norm_rope_reference
from tests.interpreter import run_under_the_interpreter

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(num_tokens: int, q_heads: int, k_heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int):
    """qk as the qkv projection leaves it (a strided view: v's columns follow each row), weights, cos / sin."""
    from engine.models.layers import RotaryEmbedding

    g = torch.Generator().manual_seed(seed)
    heads = q_heads + k_heads
    qkv = (3 * torch.randn(num_tokens, (heads + k_heads) * head_dim, generator=g)).to(dtype).to(device)
    qk = qkv[:, : heads * head_dim].unflatten(-1, (heads, head_dim))
    q_weight = (1 + 0.5 * torch.randn(head_dim, generator=g)).to(dtype).to(device)
    k_weight = (1 + 0.5 * torch.randn(head_dim, generator=g)).to(dtype).to(device)
    rope = RotaryEmbedding(head_dim, 4096, {"rope_theta": 1e6, "rope_type": "default"}).to(device)
    cos, sin = rope(torch.randint(0, 4096, (num_tokens,), generator=g).to(device))
    return qk, q_weight, k_weight, cos, sin, q_heads


def check_kernel_matches_reference(device: str, num_tokens: int, q_heads: int, k_heads: int, head_dim: int,
                                   dtype: torch.dtype) -> None:
    from ops.triton_qk_norm import qk_norm_rope

    args = inputs(num_tokens, q_heads, k_heads, head_dim, dtype, device, seed=num_tokens + head_dim)
    want = qk_norm_rope_reference(*args, eps=1e-6)
    out = torch.full_like(want, float("nan"))  # poisoned: every element must be written
    got = qk_norm_rope(*args, eps=1e-6, out=out)
    assert got.data_ptr() == out.data_ptr() and got.is_contiguous()
    # bf16: a few roundings apart where the reference rounds between its ops and the kernel once at the end
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.0625, rtol=0.016)
    torch.testing.assert_close(got, want, **tol)


_INTERPRETER_SCRIPT = """
import torch
import tests.test_qk_norm as t
t.check_kernel_matches_reference("cpu", 3, 4, 2, 64, torch.float32)   # 6 heads: the second block half masked
t.check_kernel_matches_reference("cpu", 2, 8, 4, 128, torch.float32)
t.check_kernel_matches_reference("cpu", 2, 4, 2, 64, torch.bfloat16)
print("ok")
"""


def test_kernel_under_the_interpreter():
    run_under_the_interpreter(_INTERPRETER_SCRIPT)


def test_the_op_on_the_cpu_is_the_reference():
    args = inputs(5, 4, 2, 32, torch.float32, "cpu", seed=0)
    got = torch.ops.engine.qk_norm_rope(*args, 1e-6)
    assert got.is_contiguous()
    torch.testing.assert_close(got, qk_norm_rope_reference(*args, eps=1e-6), atol=0, rtol=0)
    torch.library.opcheck(torch.ops.engine.qk_norm_rope.default, (*args, 1e-6))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, 7, 256])
def test_kernel_matches_reference_on_gpu(num_tokens, dtype):
    check_kernel_matches_reference("cuda", num_tokens, 16, 8, 128, dtype)  # Qwen3-0.6B's heads
    check_kernel_matches_reference("cuda", num_tokens, 4, 2, 64, dtype)


@gpu
@needs_cuda
def test_engine_with_the_kernel_gives_eager_tokens(tmp_path, monkeypatch):
    """ENGINE_QK_NORM_KERNEL (read as engine.models.qwen3.QK_NORM_KERNEL) through torch.compile and the CUDA graphs:
    float32 greedy tokens equal the eager engine's (which never takes the kernel) but for float32 ties."""
    import engine.models.qwen3 as qwen3
    from engine import LLM, SamplingParams
    from engine.demo_model import build_tiny_checkpoint
    from tests.test_gpu_engine import assert_same_greedy_but_ties, prompts_for

    path = build_tiny_checkpoint(str(tmp_path), "Qwen3ForCausalLM", seed=5, hidden_size=256, intermediate_size=512,
                                 num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    prompts = prompts_for(9, seed=4)
    eager = LLM(path, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=16)
    want = [o.outputs[0] for o in eager.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(qwen3, "QK_NORM_KERNEL", True)
    torch._dynamo.reset()  # the forward's code object keeps graphs traced without the kernel otherwise
    fused = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=16, cuda_graph_sizes=[1, 2, 4, 8, 16])
    got = [o.outputs[0] for o in fused.generate(prompts, params, use_tqdm=False)]
    assert_same_greedy_but_ties(want, got)
