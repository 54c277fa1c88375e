"""Running Triton kernels on the CPU under Triton's interpreter, for the kernel tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_under_the_interpreter(script: str, timeout: float = 300) -> None:
    """Run `script` (Python source that prints "ok" last) in a fresh process with TRITON_INTERPRET=1: the
    variable is read when a kernel is decorated, so an already imported kernel cannot switch to it."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-4000:]
