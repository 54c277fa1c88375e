"""sm_90 SASS of `ops.triton_quant._quant_matmul_kernel` for one tile entry, compiled offline (no GPU): the K loop's
instruction mix per warp and K-tile, and where its barriers, wgmma issues and wgmma waits fall.

    python3 perf/quant_sass.py --table default --batch 256            # the entry a 256-row batch takes
    python3 perf/quant_sass.py --table default --batch 256 --seq --dump /tmp/sass/d   # the event order; .ptx/.sass/.ttgir

GPTQ layout (as the engine runs AWQ), bf16 x, group 128, no bias, EVEN_K/EVEN_N, no split-K. The K loop is the
largest backward branch whose body holds HGMMA; with `k_unroll` tiles it covers that many K-tiles (the per-K-tile
count divides by it). `--tiles "Tiles(...)"` compiles an entry no table holds. Runs with whichever Triton imports
first (PYTHONPATH=<a Triton 3.6 site-packages> for the GPU machine's). A ptxas line "(C75xx) ... serialized" means
ptxas made every wgmma wait for itself whatever the PTX's wait_group says.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compile_entry(tiles, block_k: int = 64, dtype: str = "bf16"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ops import triton_quant as tq

    fn = tq._quant_matmul_kernel
    ptr = "*" + dtype
    signature = dict(x_ptr=ptr, w_ptr="*i32", zeros_ptr="*i32", scales_ptr="*fp16", g_idx_ptr="*fp16",
                     bias_ptr="*fp16", out_ptr=ptr, partial_ptr=ptr, counter_ptr=ptr,
                     M="i32", N="i32", K="i32", stride_xm="i32", stride_w="i32", group_size="i32",
                     k_per_split="i32", split="i32", exponent_bits="i32")
    constexprs = dict(FORMAT=1, ZERO_OFFSET=0, ACT_ORDER=False, HAS_BIAS=False, SPLIT_K=False, EVEN_K=True,
                      EVEN_N=True, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k,
                      NUM_STAGES=tiles.num_stages, PACKED=False, W_AS_B=False)
    if tiles.packed:  # as ops.triton_quant._quant_matmul launches a packed entry
        constexprs.update(PACKED=True, W_AS_B=tiles.w_as_b and tiles.block_m >= 64)
    names = fn.arg_names
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    sig = {**signature, **{n: "constexpr" for n in constexprs}}
    sig = {n: sig[n] for n in names if n in sig}
    aligned = ("N", "K", "stride_xm", "stride_w", "group_size", "k_per_split", "exponent_bits")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, kind in sig.items()
             if kind.startswith("*") or n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if tiles.max_registers:
        options["maxnreg"] = tiles.max_registers
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def bin_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*(?:/\*.*)?$")


def sass_lines(cubin: bytes) -> list[tuple[int, str]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([bin_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip().rstrip(";").strip()))
    return out


def resources(ptx: str, cubin: bytes) -> tuple[dict[str, int], int, str]:
    """A compiled kernel's cuobjdump -res-usage counts (REG / STACK / LOCAL), the spill bytes ptxas -v reports when
    it assembles the PTX again for sm_90a, and that ptxas output (its warnings)."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "k.cubin").write_bytes(cubin)
        res = subprocess.run([bin_tool("cuobjdump"), "-res-usage", str(Path(d, "k.cubin"))], capture_output=True,
                             text=True).stdout
        Path(d, "k.ptx").write_text(ptx)
        ptxas = subprocess.run([bin_tool("ptxas"), "-arch=sm_90a", "-v", str(Path(d, "k.ptx")), "-o",
                                str(Path(d, "k2.cubin"))], capture_output=True, text=True).stderr
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", res)}
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas))
    return usage, spills, ptxas


def opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0] if ins else ""


def k_loop(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The largest backward-branch range holding an HGMMA."""
    best = []
    for i, (addr, ins) in enumerate(lines):
        if "BRA" not in opcode(ins):
            continue
        target = None
        hexm = re.search(r"0x([0-9a-f]+)", ins)
        if hexm:
            target = int(hexm.group(1), 16)
        if target is None or target >= addr:
            continue
        body = [(a, s) for a, s in lines if target <= a <= addr]
        if any(opcode(s).startswith("HGMMA") for _, s in body) and len(body) > len(best):
            best = body
    return best


def summarize(body: list[tuple[int, str]], warps: int, per: int = 1) -> str:
    ops = Counter(opcode(s).split(".")[0] for _, s in body)
    n = len(body)
    rows = [f"K-loop body: {n} instructions per warp ({n / per:.0f} a K-tile)"]
    rows.append("  " + " ".join(f"{k}:{v}" for k, v in ops.most_common()))
    dequant = sum(ops[k] for k in ("LOP3", "PRMT", "HADD2", "HFMA2", "HMUL2", "SHF", "F2F"))
    rows.append(f"  dequant-like ALU (LOP3 PRMT HADD2 HFMA2 HMUL2 SHF F2F): {dequant / per:.0f} a K-tile")
    rows.append(f"  issue clk a K-tile (all {warps} warps / 4 schedulers): {warps * n / per / 4:.0f}")
    return "\n".join(rows)


def sequence(body: list[tuple[int, str]]) -> str:
    """The K loop's ordering of the events that matter, each with how many other instructions lie between."""
    keys = ("HGMMA", "WARPGROUP", "BAR", "STS", "LDGSTS", "LDG", "LDS", "LDSM", "DEPBAR", "SYNCS", "FENCE",
            "WARPSYNC", "ARRIVES", "UTMALDG", "MEMBAR")
    out, gap = [], 0
    for _, s in body:
        op = opcode(s)
        if op.split(".")[0] in keys:
            if gap:
                out.append(f"    ... {gap} others")
            gap = 0
            out.append("  " + s)
        else:
            gap += 1
    if gap:
        out.append(f"    ... {gap} others")
    # collapse runs of identical lines
    collapsed, prev, count = [], None, 0
    for line in out + [None]:
        if line == prev:
            count += 1
            continue
        if prev is not None:
            collapsed.append(prev + (f"   x{count}" if count > 1 else ""))
        prev, count = line, 1
    return "\n".join(collapsed)


def main() -> None:
    from ops import triton_quant as tq

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", default="default")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tiles", help="a Tiles(...) expression instead of a table entry")
    p.add_argument("--dump", help="path prefix for .ttgir/.ptx/.sass")
    p.add_argument("--per-k", type=int, default=0, help="K-tiles a loop iteration (default: from the tiles)")
    p.add_argument("--seq", action="store_true", help="print the K loop's event sequence")
    args = p.parse_args()
    tq.TILES = tq.CANDIDATE_TILES[args.table]
    tiles = tq.tiles_for(args.batch, planar_ok=True, packed_ok=True)
    if args.tiles:
        tiles = eval(args.tiles, {"Tiles": tq.Tiles})
    print(tiles)
    k = compile_entry(tiles)
    meta = k.metadata
    lines = sass_lines(k.asm["cubin"])
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([bin_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    print(" ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+", res)), f"shared(meta)={meta.shared}")
    print("PTX: wgmma.mma_async", len(re.findall(r"wgmma.mma_async", ptx)),
          "wait_group", re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx),
          "bar.sync", len(re.findall(r"bar.sync|barrier.sync", ptx)))
    with tempfile.TemporaryDirectory() as d:  # ptxas's own word on the wgmma pipeline (warnings C75xx)
        Path(d, "k.ptx").write_text(ptx)
        cmd = [bin_tool("ptxas"), "-arch=sm_90a", "-v", str(Path(d, "k.ptx")), "-o", str(Path(d, "k.cubin"))]
        if tiles.max_registers:
            cmd[1:1] = ["-maxrregcount", str(tiles.max_registers)]
        warn = subprocess.run(cmd, capture_output=True, text=True).stderr
        print("ptxas:", " | ".join(l.strip() for l in warn.splitlines() if "arning" in l or "C75" in l)[:900])
    print("PTX setmaxnreg:", len(re.findall(r"setmaxnreg", ptx)))
    body = k_loop(lines)
    per = args.per_k or getattr(tiles, "k_unroll", 1)
    print(summarize(body, tiles.num_warps, per))
    if args.seq:
        print(sequence(body))
    if args.dump:
        Path(args.dump).parent.mkdir(parents=True, exist_ok=True)
        Path(args.dump + ".ptx").write_text(ptx)
        Path(args.dump + ".ttgir").write_text(k.asm["ttgir"])
        Path(args.dump + ".sass").write_text("\n".join(f"/*{a:04x}*/ {s}" for a, s in lines))


if __name__ == "__main__":
    main()
