"""sm_90 SASS of `ops.gluon_quant._gluon_gptq_kernel`, compiled offline (no GPU): resources, ptxas's warnings,
the PTX's wgmma waits, and the K loop's instruction mix and event order (as perf/quant_sass.py does for the tl
kernel), plus the checks that say the dequant overlaps the wgmma.

    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages python3 perf/gluon_sass.py --seq
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages python3 perf/gluon_sass.py --dtype fp16 --group 32 --json

Needs Triton 3.6's Gluon API (the GPU machine's; later Tritons renamed async_copy's functions). The overlap
checks, over the K loop (the largest backward branch holding an HGMMA): the loop's wgmma wait is
`WARPGROUP.DEPBAR.LE gsb0, 0x1` (never 0x0), and the W tile's STS come after the last HGMMA of the iteration
and before that wait, i.e. the dequantized tile k + 1 is written while wgmma k runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.quant_sass import resources, k_loop, opcode, sass_lines, sequence, summarize  # noqa: E402


def analyze(dtype: str = "bf16", group: int = 128, x_stages: int | None = None, split_k: bool = False) -> dict:
    import triton

    from ops import gluon_quant as gq

    kernel = gq.compile_sm90(dtype, group, x_stages=x_stages or gq.X_STAGES, split_k=split_k)
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    usage, spill_bytes, ptxas = resources(ptx, cubin)
    lines = sass_lines(cubin)
    body = k_loop(lines)
    ops = [opcode(s) for _, s in body]
    hgmma = [i for i, op in enumerate(ops) if op.startswith("HGMMA")]
    depbar = [(i, s) for i, (_, s) in enumerate(body) if opcode(s).startswith("WARPGROUP.DEPBAR")]
    sts = [i for i, op in enumerate(ops) if op.startswith("STS")]
    return dict(
        triton=triton.__version__, dtype=dtype, group=group, split_k=split_k, block_k=gq._block_k(group),
        registers=usage.get("REG"), stack=usage.get("STACK"), local=usage.get("LOCAL"),
        spill_bytes=spill_bytes, shared_bytes=kernel.metadata.shared,
        ptxas_warnings=[line.strip() for line in ptxas.splitlines() if "arning" in line or "C75" in line],
        ptx_wait_groups=re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx),
        loop_instructions=len(body), loop_mix=dict(Counter(op.split(".")[0] for op in ops).most_common()),
        loop_hgmma=len(hgmma), loop_bar_sync=sum(op.startswith("BAR.SYNC") for op in ops),
        loop_wgmma_waits=[s for _, s in depbar],
        loop_sts=len(sts),
        # the dequantized tile's stores between the iteration's last HGMMA and its wgmma wait
        sts_between_hgmma_and_wait=bool(hgmma and depbar and sts
                                        and all(hgmma[-1] < i < depbar[0][0] for i in sts)),
        _body=body,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--x-stages", type=int)
    p.add_argument("--split-k", action="store_true", help="the split-K form (partials + the last program's sum)")
    p.add_argument("--seq", action="store_true", help="print the K loop's event sequence")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--dump", help="path prefix for .sass")
    args = p.parse_args()
    from ops import gluon_quant as gq

    info = analyze(args.dtype, args.group, args.x_stages, args.split_k)
    body = info.pop("_body")
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if key != "loop_mix":
            print(f"{key}: {value}")
    print(summarize(body, gq.NUM_WARPS))
    if args.seq:
        print(sequence(body))
    if args.dump:
        Path(args.dump + ".sass").write_text("\n".join(f"/*{a:04x}*/ {s}" for a, s in body))


if __name__ == "__main__":
    main()
