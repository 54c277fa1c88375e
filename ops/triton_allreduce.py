"""One kernel for what follows every row-parallel layer under tensor parallelism: the all-reduce of its
partial sums, the residual add and the next RMSNorm. The engine uses the Lamport variant wherever the
custom all-reduce is on (`ENGINE_FUSED_ALLREDUCE=flags` picks the barrier-based one, `=0` neither).
Session 16's Lamport kernel summed wrong on the GPUs: Triton 3.6 compiles -tl.zeros() and
tl.full(-0.0) to +0.0, so it never marked a slot empty again; the marks are made from their bits
since session 17 (perf/RESULTS.md), checked by perf/fused_allreduce_check.py and the GPU tests.

Why: at batch 1 a decode step of Llama-3.1-8B at TP=2 all-reduces 65 tensors of 8 KiB, each followed
by an add and a norm that torch.compile fuses into a kernel of its own. Both kernels are all latency
(session 15: ~8.5 us for the all-reduce in a graph, a few more for the norm and the gap between them).
One kernel does both here.

Every rank launches the same grid of GRID programs (the Lamport kernel: one a row, up to GRID);
program p owns rows p, p + GRID, ... Each row's values are summed in float32 in rank order (every
rank gets the same bits), rounded to the model's dtype (the all-reduce's output), the residual
added, then RMSNorm'd exactly as
`engine.models.layers.RMSNorm` rounds. Two ways to get the peers' values
(`torch.distributed._symmetric_memory`: every rank maps every rank's buffer, `buffer_ptrs`):

"flags" (`_flags_kernel`): stage this rank's rows in its own buffer; for each peer set our flag in
its signal pad (compare-and-swap 0 -> 1, release, system scope), then wait for its flag in ours
(1 -> 0, acquire) -- PyTorch's own one-shot kernel's layout (program p's flag from rank r at
p * WORLD + r) and protocol, so the host-side stand-in for a failed rank (`engine.communication`)
releases it too; then read the peers' staged rows over NVLink. One meeting is enough: the buffer has
two halves and program p alternates between them (its own parity counter). A rank can overwrite a
half only two calls later, by which time it has met every peer again in the call between, after they
finished reading (their next kernel cannot start before this one ends); GRID is fixed, so a half's
rows are always read by the same program.

"lamport" (`_lamport_kernel`): no meeting. Push this rank's rows into its region of every peer's
buffer, then read the peers' regions of our own buffer until none of their values is -0.0, the mark
of "not written yet" (a rank sends -0.0 as +0.0). Three slots in rotation, a counter a row: a row's
use j reads slot j % 3 and marks slot (j + 2) % 3 empty again, which the peers write only at use
j + 2, and they cannot get there before this use is done (they need our values of use j + 1 first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops import pdl

GRID = 64  # programs of every call (the stand-in releases up to 256); rows beyond it loop
MAX_HIDDEN = 16384  # one row in registers of one program
SLOTS = 3  # the Lamport kernel's rotation: written, being read, being emptied
PROTOCOLS = ("lamport", "flags")
FOREVER = 2**31 - 1  # polls of a row before the Lamport kernel gives up: hours


@triton.jit
def _unwritten(v):
    """-0.0: the Lamport kernel's mark for a value not written yet (a rank sends -0.0 as +0.0), read
    from the bits: a float compare need not keep the sign (the Triton interpreter's does not)."""
    if v.dtype.primitive_bitwidth == 16:
        return v.to(tl.int16, bitcast=True) == -32768
    else:
        return v.to(tl.int32, bitcast=True) == -2147483648


@triton.jit
def _marks(BLOCK: tl.constexpr, dtype: tl.constexpr):
    """BLOCK values of -0.0, made from their bits. Session 17: on Triton 3.6 both -tl.zeros() and
    tl.full(-0.0) compile to +0.0, so the kernel never marked a slot empty again and read whatever
    its last use had left there when the peer's values were late (the wrong rows of session 16)."""
    if dtype.primitive_bitwidth == 16:
        return tl.full([BLOCK], -32768, tl.int16).to(dtype, bitcast=True)
    else:
        return tl.full([BLOCK], -2147483648, tl.int32).to(dtype, bitcast=True)


@triton.jit
def _add_norm_store(acc, residual, w, out_ptr, residual_out_ptr, offs, mask, hidden, eps, HAS_RESIDUAL: tl.constexpr):
    """From the float32 sum of a row: round it as the all-reduce's output, add the row's residual, store
    that, then RMSNorm it with the weight w exactly as engine.models.layers.RMSNorm rounds. (The residual
    and weight come loaded: the Lamport kernel loads them before it waits for its peers.)"""
    dtype = out_ptr.dtype.element_ty
    h = acc.to(dtype)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + residual.to(tl.float32)).to(dtype)
    tl.store(residual_out_ptr + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
    normed = (hf * inv).to(dtype)
    tl.store(out_ptr + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)


# The rank is an argument, not a constant: every rank runs the same binary, so the norm's float32
# arithmetic (its reduction order, what the compiler contracts into FMAs) is the same on all of them.
@triton.jit(do_not_specialize=["n_rows", "rank", "spin_limit"])  # one variant for every row count and rank
def _lamport_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, buffer_ptrs, slot_ptr, status_ptr,
    n_rows, hidden, region, eps, rank, spin_limit,
    WORLD: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SLOTS: tl.constexpr, PDL_SIGNAL: tl.constexpr = False,
):
    if PDL_SIGNAL:  # the next kernel (a GEMV) may start loading its weights while this one waits (ops.pdl)
        tl.extra.cuda.gdc_launch_dependents()
    # Each row keeps its own slot counter (slot_ptr[row]): a row's regions are in step with its own
    # uses, whichever calls took it (a counter a program would keep for all its rows goes out of step
    # for a row the program skipped in calls with fewer rows).
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    slot_size = region.to(tl.int64) * WORLD
    own = tl.multiple_of(tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype)), 16)
    # 1. push: our rows into every peer's buffer, in our region of the row's slot (+0.0 for -0.0: the
    # mark of "not yet")
    for row in range(pid, n_rows, GRID):
        offs = tl.cast(row, tl.int64) * hidden + cols
        ours = tl.load(slot_ptr + row).to(tl.int64) * slot_size + rank * region
        v = tl.load(x_ptr + offs, mask=mask)
        v = tl.where(v == 0, tl.zeros_like(v), v)
        for r in tl.static_range(WORLD):
            if r != rank:
                peer = tl.multiple_of(tl.load(buffer_ptrs + r).to(tl.pointer_type(dtype)), 16)
                tl.store(peer + ours + offs, v, mask=mask)
    # The pushes are plain stores into the peers' memory, with no fence after them: a peer waits for each
    # value itself (the marks), so it needs no order between them. (Session 16 put a fence.acq_rel.sys
    # here while the marks were broken; it fixed nothing, and session 17 took it out.)
    # 2. sum, in rank order, each peer's row once all of it has landed in our buffer; then empty our
    # regions of the row's slot that the peers write two uses from now (they cannot get there before
    # this one is done: they need our values of the next use first), and move the row's counter on
    # Everything a row needs besides the peers' values is loaded before waiting for them, so those loads'
    # latency hides in the wait instead of following it (two dependent round trips less a call)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    for row in range(pid, n_rows, GRID):
        offs = tl.cast(row, tl.int64) * hidden + cols
        slot = tl.load(slot_ptr + row)
        here = own + slot.to(tl.int64) * slot_size + offs
        mine = tl.load(x_ptr + offs, mask=mask, other=0.0)
        mine = tl.where(mine == 0, tl.zeros_like(mine), mine)  # as the peers got it
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + offs, mask=mask, other=0.0)
        else:
            residual = mine  # (not read)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == rank:
                part = mine
            else:
                src = here + r * region
                part = tl.load(src, mask=mask, other=0.0, volatile=True)
                missing = tl.sum(_unwritten(part).to(tl.int32), axis=0)
                spins = 0
                while (missing > 0) & (spins < spin_limit):
                    part = tl.load(src, mask=mask, other=0.0, volatile=True)
                    missing = tl.sum(_unwritten(part).to(tl.int32), axis=0)
                    spins += 1
                if missing > 0:  # gave up (tests bound the wait; the engine waits for ever): say where
                    tl.atomic_add(status_ptr, 1)
                    tl.store(status_ptr + 1, row)
                    tl.store(status_ptr + 2, slot)
                    tl.store(status_ptr + 3, r)
                    tl.store(status_ptr + 4, missing)
            acc += part.to(tl.float32)
        _add_norm_store(acc, residual, w, out_ptr, residual_out_ptr, offs, mask, hidden, eps, HAS_RESIDUAL)
        empty = own + ((slot + 2) % SLOTS).to(tl.int64) * slot_size + offs
        unwritten = _marks(BLOCK, dtype)
        for r in tl.static_range(WORLD):
            if r != rank:
                tl.store(empty + r * region, unwritten, mask=mask)
        tl.store(slot_ptr + row, (slot + 1) % SLOTS)


@triton.jit(do_not_specialize=["n_rows", "rank"])
def _flags_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, buffer_ptrs, signal_pad_ptrs, parity_ptr,
    n_rows, hidden, half, eps, rank,
    WORLD: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_rows:
        dtype = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        parity = tl.load(parity_ptr + pid)
        tl.store(parity_ptr + pid, 1 - parity)
        stage = parity.to(tl.int64) * half
        # The buffers are 16-byte aligned (and hidden a multiple of 8 in every model): vector loads and stores.
        own = tl.multiple_of(tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype)), 16)
        for row in range(pid, n_rows, GRID):
            offs = tl.cast(row, tl.int64) * hidden + cols
            tl.store(own + stage + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
        tl.debug_barrier()  # every thread's staged values before the flag that releases them
        own_pad = tl.load(signal_pad_ptrs + rank).to(tl.pointer_type(tl.int32))
        for r in tl.static_range(WORLD):
            if r != rank:
                peer_pad = tl.load(signal_pad_ptrs + r).to(tl.pointer_type(tl.int32))
                while tl.atomic_cas(peer_pad + pid * WORLD + rank, 0, 1, sem="release", scope="sys") != 0:
                    pass
        for r in tl.static_range(WORLD):
            if r != rank:
                while tl.atomic_cas(own_pad + pid * WORLD + r, 1, 0, sem="acquire", scope="sys") != 1:
                    pass
        tl.debug_barrier()
        for row in range(pid, n_rows, GRID):
            offs = tl.cast(row, tl.int64) * hidden + cols
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WORLD):
                if r == rank:
                    part = tl.load(x_ptr + offs, mask=mask, other=0.0)
                else:
                    peer = tl.multiple_of(tl.load(buffer_ptrs + r).to(tl.pointer_type(dtype)), 16)
                    part = tl.load(peer + stage + offs, mask=mask, other=0.0, cache_modifier=".cv")
                acc += part.to(tl.float32)
            residual = tl.load(residual_ptr + offs, mask=mask, other=0.0)  # (x itself without a residual: not read)
            w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
            _add_norm_store(acc, residual, w, out_ptr, residual_out_ptr, offs, mask, hidden, eps, HAS_RESIDUAL)


def lamport_buffer_numel(region: int, world_size: int) -> int:
    """Values of each rank's buffer the Lamport kernel uses: SLOTS slots of one region per rank."""
    return SLOTS * world_size * region


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                            out: torch.Tensor, residual_out: torch.Tensor, *, protocol: str, buffer_ptrs: torch.Tensor,
                            state: torch.Tensor, region: int, rank: int, world_size: int,
                            signal_pad_ptrs: torch.Tensor | None = None, status: torch.Tensor | None = None,
                            spin_limit: int = FOREVER) -> None:
    """residual_out = sum over ranks of x (+ residual); out = RMSNorm(residual_out) * weight. x, residual,
    weight and the outputs: contiguous, one dtype, [rows, hidden] ([hidden] for weight); rows * hidden
    <= region. Every rank must make the same calls in the same order.

    "lamport": buffer_ptrs, every rank's lamport_buffer_numel(region, world_size) values, filled with
    -0.0 on every rank before the first call; state: int32 zeros, one a row up to region // hidden
    (this rank's slot counters); status: int32 [8] zeros, where a kernel that gave up waiting for a peer
    after `spin_limit` polls of a row (tests bound the wait, the engine does not) counts that and notes
    the row, its slot, the peer and how many of its values had not come.
    "flags": buffer_ptrs, every rank's 2 * region values (two halves); signal_pad_ptrs, every rank's
    signal pad (zeros at start, shared with PyTorch's one-shot kernel); state: int32 [GRID] zeros."""
    hidden = x.shape[-1]
    n_rows = x.numel() // hidden
    assert x.numel() <= region and hidden <= MAX_HIDDEN
    block = triton.next_power_of_2(hidden)
    common = dict(WORLD=world_size, GRID=GRID, BLOCK=block, HAS_RESIDUAL=residual is not None,
                  num_warps=4 if block <= 4096 else 8)
    residual = x if residual is None else residual
    if protocol == "lamport":
        # A program a row up to GRID (its counters are a row's, so no program needs to run for rows it
        # does not have: at decode's one row, one program instead of GRID)
        grid = (max(1, min(GRID, n_rows)),)
        status = torch.zeros(8, dtype=torch.int32, device=x.device) if status is None else status
        _lamport_kernel[grid](x, residual, weight, out, residual_out, buffer_ptrs, state, status,
                              n_rows, hidden, region, eps, rank, spin_limit, SLOTS=SLOTS,
                              PDL_SIGNAL=pdl.enabled(x.device), **common)
    elif protocol == "flags":
        _flags_kernel[(GRID,)](x, residual, weight, out, residual_out, buffer_ptrs, signal_pad_ptrs, state,
                               n_rows, hidden, region, eps, rank, **common)
    else:
        raise ValueError(f"protocol {protocol!r}: one of {PROTOCOLS}")


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden, eps,
                         BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """One row: residual_out = x (+ residual), out = RMSNorm(residual_out) * weight, rounded as the fused
    all-reduce kernels round (`_add_norm_store`, the one rank's sum being x itself)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    offs = row * hidden + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    residual = tl.load(residual_ptr + offs, mask=mask, other=0.0) if HAS_RESIDUAL else x
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    _add_norm_store(x.to(tl.float32), residual, w, out_ptr, residual_out_ptr, offs, mask, hidden, eps, HAS_RESIDUAL)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor, residual_out: torch.Tensor) -> None:
    """Without tensor parallelism: residual_out = x (+ residual); out = RMSNorm(residual_out) * weight, in
    one kernel a call, one program a row (`engine.communication.add_rms_norm`). x, residual and the outputs:
    contiguous [rows, hidden] of one dtype."""
    hidden = x.shape[-1]
    n_rows = x.numel() // hidden
    if n_rows == 0:
        return
    assert hidden <= MAX_HIDDEN
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(n_rows,)](x, x if residual is None else residual, weight, out, residual_out, hidden, eps,
                                    BLOCK=block, HAS_RESIDUAL=residual is not None,
                                    num_warps=4 if block <= 4096 else 8)
