"""PTX of Triton kernels compiled for sm_90 (Hopper) with the ptxas Triton ships: no GPU needed. Tests use it
to check where a kernel's instructions fall (loads before a wait, a signal after it)."""

from __future__ import annotations

import re

import pytest


def sm90_ptx(fn, signature: dict[str, str], constexprs: dict[str, object], aligned: tuple[str, ...] = (),
             **options) -> str:
    """PTX of `fn` for sm_90; pointers, and the integers named in `aligned`, specialized as multiples of 16
    the way a launch with such values specializes them (so loads vectorize as they do on the GPU)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    signature = {name: signature[name] for name in fn.arg_names}  # in the kernel's order
    divisible = [name for name, kind in signature.items() if kind.startswith("*") or name in aligned]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def ptx_lines(ptx: str, pattern: str) -> list[int]:
    """Line numbers of the PTX lines matching `pattern`."""
    return [i for i, line in enumerate(ptx.splitlines()) if re.search(pattern, line)]
