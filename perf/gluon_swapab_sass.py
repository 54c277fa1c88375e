"""sm_90 SASS of `ops.gluon_swapab._swapab_kernel` (swap-AB, W as wgmma's register A operand), compiled offline
(no GPU): resources, ptxas's warnings, the TTGIR's shared-memory ops, the PTX's wgmma waits, and the K loop's
instruction mix and event order, plus the checks the design rests on:

- HGMMA takes A from registers: `HGMMA.64x256x16.F32.BF16 R.., R.., gdesc[..]` (one gdesc, not two)
- no STS / LDS / LDSM in the K loop (W never touches shared memory; x arrives by TMA: UTMALDG)
- the loop's wgmma wait is `WARPGROUP.DEPBAR.LE gsb0, 0x1` (never 0x0), and the BAR.SYNC count an iteration
- no `ttg.local_alloc` / `local_store` / `local_load` in the TTGIR besides x's ring, the mbarriers and the
  epilogue's transpose (the dequantized tile's convert_layout to the A-operand layout is a register renaming)

    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages python3 perf/gluon_swapab_sass.py --seq
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages python3 perf/gluon_swapab_sass.py --dtype fp16 --group 32 --json
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages python3 perf/gluon_swapab_sass.py --block-m 64 --split-k
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages python3 perf/gluon_swapab_sass.py --stream-k

Needs Triton 3.6's Gluon API (the GPU machine's).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.quant_sass import resources, opcode, sass_lines, sequence, summarize  # noqa: E402


def k_loop(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The K loop: the smallest backward-branch range holding an HGMMA and no EXIT. (perf.quant_sass's
    largest range would take the mbarrier try-wait's retry branch, placed after the epilogue's EXIT.)"""
    best = None
    for i, (addr, ins) in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins)
        if not m or int(m.group(1), 16) >= addr:
            continue
        body = [(a, s) for a, s in lines[:i + 1] if a >= int(m.group(1), 16)]
        if (any(opcode(s).startswith("HGMMA") for _, s in body) and not any(opcode(s) == "EXIT" for _, s in body)
                and (best is None or len(body) < len(best))):
            best = body
    return best or []


def _dests(ins: str) -> set[int]:
    """Registers an instruction writes (its first operand), for the non-store, non-uniform ALU / load forms."""
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    op = ins.split()[0] if ins else ""
    if op.startswith(("HGMMA", "ST", "BAR", "BRA", "WARPGROUP", "SYNCS", "UTMALDG", "NOP", "EXIT", "ISETP", "PLOP3",
                      "ELECT", "VOTEU", "U", "R2UR")):
        return set()
    m = re.match(r"\S+\s+R(\d+)\b", ins)
    if not m:
        return set()
    width = 4 if ".128" in op else 2 if (".64" in op or "WIDE" in op) else 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def a_register_hazards(body: list[tuple[int, str]]) -> list[str]:
    """Writes to an HGMMA's A registers before the wgmma wait that retires it (PTX: undefined behaviour). Each
    group of HGMMAs (one K-tile, ending with gsb0) is retired by the second `DEPBAR.LE gsb0, 0x1` after it (one
    more group issued in between), counting around the loop's back edge."""
    lines = [s for _, s in body]
    n = len(lines)
    hgmma = [i for i, s in enumerate(lines) if opcode(s).startswith("HGMMA")]
    waits = [i for i, s in enumerate(lines) if opcode(s).startswith("WARPGROUP.DEPBAR")]
    groups, current = [], []
    for i in hgmma:
        current.append(i)
        if "gsb0" in lines[i]:
            groups.append(current)
            current = []
    out = []
    for group in groups:
        regs = set()
        for i in group:
            a = int(re.search(r"HGMMA\S+\s+R\d+,\s+R(\d+)", lines[i]).group(1))
            regs |= set(range(a, a + 4))
        later = [w for w in waits if w > group[-1]] + [w + n for w in waits]
        retire = later[1] if len(later) > 1 else later[0]
        out += [f"{j % n}: {lines[j % n]}" for j in range(group[0] + 1, retire) if _dests(lines[j % n]) & regs]
    return out


def analyze(dtype: str = "bf16", group: int = 128, stages: int | None = None, block_m: int | None = None,
            split_k: bool = False, stream_k: bool = False) -> dict:
    import triton

    from ops import gluon_swapab as gs

    block_m = block_m or gs.BLOCK_M
    kernel = gs.compile_sm90(dtype, group, stages=stages or gs.STAGES, block_m=block_m, split_k=split_k,
                             stream_k=stream_k)
    ttgir, ptx, cubin = kernel.asm["ttgir"], kernel.asm["ptx"], kernel.asm["cubin"]
    usage, spill_bytes, ptxas = resources(ptx, cubin)
    lines = sass_lines(cubin)
    body = k_loop(lines)
    ops = [opcode(s) for _, s in body]
    hgmma = [s for _, s in body if opcode(s).startswith("HGMMA")]
    depbar = [s for _, s in body if opcode(s).startswith("WARPGROUP.DEPBAR")]
    return dict(
        triton=triton.__version__, dtype=dtype, group=group, block_m=block_m, split_k=split_k, stream_k=stream_k,
        block_k=gs._block_k(group),
        registers=usage.get("REG"), stack=usage.get("STACK"), local=usage.get("LOCAL"),
        spill_bytes=spill_bytes, shared_bytes=kernel.metadata.shared,
        ptxas_warnings=[line.strip() for line in ptxas.splitlines() if "arning" in line or "C75" in line],
        ttgir_local_ops=dict(Counter(re.findall(r"ttg\.(local_alloc|local_store|local_load)", ttgir))),
        ttgir_convert_layouts=len(re.findall(r"ttg\.convert_layout", ttgir)),
        programs_per_sm=min(65536 // (usage.get("REG", 255) * 32 * gs.NUM_WARPS),
                            (228 * 1024) // (kernel.metadata.shared + 1024)),
        ptx_wait_groups=re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx),
        loop_instructions=len(body), loop_k_tiles=len(hgmma) // (gs._block_k(group) // 16), loop_mix=dict(Counter(op.split(".")[0] for op in ops).most_common()),
        loop_hgmma=len(hgmma), hgmma_forms=sorted(set(re.sub(r"\s+", " ", s) for s in hgmma))[:2],
        hgmma_a_from_registers=bool(hgmma) and all(s.count("gdesc") == 1 for s in hgmma),
        loop_bar_sync=sum(op.startswith("BAR.SYNC") for op in ops),
        loop_wgmma_waits=depbar,
        loop_shared_ld_st=sum(op.split(".")[0] in ("STS", "LDS", "LDSM", "STSM") for op in ops),
        loop_tma=sum(op.startswith("UTMALDG") for op in ops),
        loop_mbarrier_waits=sum("TRYWAIT" in op for op in ops),
        loop_a_register_hazards=a_register_hazards(body),
        loop_fences=sum(op.split(".")[0] in ("FENCE", "MEMBAR") for op in ops),
        _body=body,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--stages", type=int)
    p.add_argument("--block-m", type=int, choices=[64, 128, 256])
    p.add_argument("--split-k", action="store_true", help="the split-K epilogue (SPLIT_K=True)")
    p.add_argument("--stream-k", action="store_true", help="the persistent stream-K kernel")
    p.add_argument("--seq", action="store_true", help="print the K loop's event sequence")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--dump", help="path prefix for .sass")
    args = p.parse_args()
    from ops import gluon_swapab as gs

    info = analyze(args.dtype, args.group, args.stages, args.block_m, args.split_k, args.stream_k)
    body = info.pop("_body")
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if key != "loop_mix":
            print(f"{key}: {value}")
    print(summarize(body, gs.NUM_WARPS, per=info["loop_hgmma"] // (info["block_k"] // 16)))
    if args.seq:
        print(sequence(body))
    if args.dump:
        Path(args.dump + ".sass").write_text("\n".join(f"/*{a:04x}*/ {s}" for a, s in body))


if __name__ == "__main__":
    main()
