"""How many Triton kernels inductor makes of one residual add + RMSNorm feeding a linear, on the GPU, with the
token dimension marked the ways a compile can mark it: unbacked (graphs.compile's default), backed
(ENGINE_TOKEN_DIM=backed), static.

    python3 perf/fusion_probe.py                 # hidden 1,024 (Qwen3-0.6B) and 4,096 (Llama-3.1-8B)
    python3 perf/fusion_probe.py --hidden 1024 --show
    python3 perf/fusion_probe.py --pattern qwen3-qk     # Qwen3's per-head q/k norms and rotation (three kernels a layer)

Why: the GPU profiles of session 20 show every RMSNorm as two kernels (a reduction, then a pointwise pass that
recomputes the add and applies the norm), even at hidden 1,024, where the row fits one persistent reduction.
If only the unbacked mark splits them, a backed dimension would give one kernel a norm (about 56 launches a
step less on Qwen3-0.6B), at the price of a second graph for one token (graphs.compile). Prints, per (hidden, mark), the Triton kernels of the output code and
their names; --show prints the output code itself.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch._dynamo.decorators import mark_dynamic, mark_unbacked
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.communication import rms_norm  # noqa: E402  (the models' own RMSNorm)
from engine.models.layers import RotaryEmbedding, apply_rotary_emb  # noqa: E402

DEVICE = "cuda"  # inductor's Triton code is what the probe counts (a CPU run only checks that it runs)


def probe(hidden: int, mark: str, tokens: int, show: bool) -> list[str]:
    torch._dynamo.reset()
    weight = torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16)
    proj = torch.randn(hidden, hidden, device=DEVICE, dtype=torch.bfloat16) / hidden**0.5  # outputs of order 1

    def layer(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + residual
        return rms_norm(h, weight, 1e-6) @ proj, h

    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    (out, _), want, kernels = compile_and_run(layer, mark, show, x, torch.randn_like(x))
    torch.testing.assert_close(out, want[0], rtol=2e-2, atol=2e-1)
    return kernels


def compile_and_run(fn, mark: str, show: bool, *inputs: torch.Tensor) -> tuple[object, object, list[str]]:
    """fn compiled with its inputs' first dimension marked `mark`, run once: (its result, eager fn's result, the
    Triton kernels of its output code)."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=mark != "static")
    for tensor in inputs:
        if mark == "unbacked":
            mark_unbacked(tensor, 0)
        elif mark == "backed":
            mark_dynamic(tensor, 0)
    with torch.no_grad():
        result, codes = run_and_get_code(compiled, *inputs)
        want = fn(*inputs)
    code = "\n".join(codes)
    if show:
        print(code)
    return result, want, re.findall(r"^def (triton_\w+)\(", code, re.M)


def probe_qwen3_qk(mark: str, tokens: int, show: bool) -> list[str]:
    """Qwen3-0.6B's q/k path as engine.models.qwen3 writes it: the qkv output's query and key heads (16 + 8 of
    128), each RMS-normed with its norm's weight, then rotated; the session-20 profile shows three kernels."""
    torch._dynamo.reset()
    q_heads, kv_heads, head_dim = 16, 8, 128
    rope = RotaryEmbedding(head_dim, 4096, {"rope_type": "default", "rope_theta": 1e6}).to(DEVICE)
    q_weight, k_weight = (torch.randn(head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))

    def qk_path(qkv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rope(positions)
        is_query = torch.arange(q_heads + kv_heads, device=qkv.device)[:, None] < q_heads
        weight = torch.where(is_query, q_weight, k_weight)
        qk = qkv[..., : (q_heads + kv_heads) * head_dim].unflatten(-1, (-1, head_dim))
        return apply_rotary_emb(rms_norm(qk, weight, 1e-6), cos, sin)

    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=torch.bfloat16)
    out, want, kernels = compile_and_run(qk_path, mark, show, qkv, torch.arange(tokens, device=DEVICE))
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    return kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--marks", nargs="+", default=["unbacked", "backed", "static"],
                        choices=["unbacked", "backed", "static"])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--pattern", nargs="+", default=["norm", "qwen3-qk"], choices=["norm", "qwen3-qk"],
                        help="norm: add + RMSNorm + linear; qwen3-qk: Qwen3's q/k norms and rotation")
    parser.add_argument("--show", action="store_true", help="print the output code")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fusion_probe needs a CUDA GPU (inductor's Triton code for CUDA)")
    for mark in args.marks:
        if "norm" in args.pattern:
            for hidden in args.hidden:
                kernels = probe(hidden, mark, args.tokens, args.show)
                print(f"add + RMSNorm, hidden {hidden:5d}, token dimension {mark:>8}: {len(kernels)} Triton kernels: "
                      f"{', '.join(kernels)}")
        if "qwen3-qk" in args.pattern:
            kernels = probe_qwen3_qk(mark, args.tokens, args.show)
            print(f"Qwen3 q/k norms + rotation, token dimension {mark:>8}: {len(kernels)} Triton kernels: "
                  f"{', '.join(kernels)}")


if __name__ == "__main__":
    main()
