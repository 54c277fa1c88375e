"""How many Triton kernels inductor makes of one residual add + RMSNorm feeding a linear, on the GPU, with the
token dimension marked the ways a compile can mark it: unbacked (graphs.compile's default), backed
(ENGINE_TOKEN_DIM=backed), static.

    python3 perf/fusion_probe.py                 # hidden 1,024 (Qwen3-0.6B) and 4,096 (Llama-3.1-8B)
    python3 perf/fusion_probe.py --hidden 1024 --show

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


def probe(hidden: int, mark: str, tokens: int, show: bool) -> list[str]:
    torch._dynamo.reset()
    weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    proj = torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16)

    def layer(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + residual
        return rms_norm(h, weight, 1e-6) @ proj, h

    compiled = torch.compile(layer, fullgraph=True, dynamic=mark != "static")
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    if mark == "unbacked":
        mark_unbacked(x, 0)
        mark_unbacked(residual, 0)
    elif mark == "backed":
        mark_dynamic(x, 0)
        mark_dynamic(residual, 0)
    with torch.no_grad():
        (out, h), codes = run_and_get_code(compiled, x, residual)
        want = layer(x, residual)
    torch.testing.assert_close(out, want[0], rtol=2e-2, atol=2e-1)
    code = "\n".join(codes)
    if show:
        print(code)
    return re.findall(r"^def (triton_\w+)\(", code, re.M)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--marks", nargs="+", default=["unbacked", "backed", "static"],
                        choices=["unbacked", "backed", "static"])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--show", action="store_true", help="print the output code")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fusion_probe needs a CUDA GPU (inductor's Triton code for CUDA)")
    for hidden in args.hidden:
        for mark in args.marks:
            kernels = probe(hidden, mark, args.tokens, args.show)
            print(f"hidden {hidden:5d}, token dimension {mark:>8}: {len(kernels)} Triton kernels: {', '.join(kernels)}")


if __name__ == "__main__":
    main()
