"""List the compiled Triton kernels under a cache directory by the local memory (stack) they take a thread.

The CUDA driver reserves a kernel's per-thread stack for every thread that can be resident on the device
(2,048 an SM on Hopper) when the kernel is first launched, and keeps that reservation: a kernel with
30 KB of stack a thread takes ~8 GiB of an H100 outside PyTorch's allocator. Llama-3.1-8B AWQ ran out of
memory that way or otherwise right after its compiled warm-up (perf/RESULTS.md, session 18); this says
whether a kernel is the cause. Reads each .cubin with the cuobjdump Triton ships.

    python3 perf/lmem_scan.py DIR... [--top 20] [--sms 132]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess

_FUNCTION = re.compile(r"^\s*Function (\S+):")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: str, tool: str) -> list[tuple[str, int, int, int, int]]:
    """(function, registers, stack bytes, shared bytes, local bytes) of each function in a cubin."""
    text = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True).stdout
    rows, name = [], None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            name = m.group(1)
        elif name and (m := _USAGE.search(line)):
            rows.append((name, *map(int, m.groups())))
            name = None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--sms", type=int, default=132, help="SMs on the device (H100 SXM: 132)")
    args = parser.parse_args()
    tool = cuobjdump()
    rows = []
    for top in args.dirs:
        for root, _, files in os.walk(top):
            for f in files:
                if f.endswith(".cubin"):
                    path = os.path.join(root, f)
                    rows += [(*usage, path) for usage in resource_usage(path, tool)]
    rows.sort(key=lambda r: r[2] + r[4], reverse=True)
    print(f"{len(rows)} kernel functions; by stack + local bytes a thread "
          f"(device-wide reservation at 2,048 threads an SM x {args.sms} SMs):")
    for name, reg, stack, shared, local, path in rows[: args.top]:
        reserve = (stack + local) * 2048 * args.sms / 2**30
        print(f"  stack {stack:6d} local {local:6d} B  ~{reserve:6.2f} GiB  reg {reg:3d}  shared {shared:6d}  "
              f"{name[:60]}  {os.path.relpath(path, args.dirs[0])[:60]}")


if __name__ == "__main__":
    main()
