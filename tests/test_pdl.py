"""Programmatic dependent launch (ops.pdl): when it is on, and that the kernels' PDL variants compile for
sm_90 with their instructions where ops.pdl's rules put them. Compiled here with the ptxas Triton ships (no
GPU needed); the timing and the GPU run are perf/gpu_check.sh's `pdl-ab`."""

from __future__ import annotations

import re

import pytest
import torch

from ops import pdl
from tests.ptx import ptx_lines, sm90_ptx


def test_pdl_is_on_only_when_asked_on_a_cuda_device_of_capability_9(monkeypatch):
    monkeypatch.setattr(pdl, "_capable", lambda index: index != 7)  # device 7: an Ampere card
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.enabled(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.enabled(torch.device("cuda", 0))
    assert not pdl.enabled(torch.device("cuda", 7))
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))


def _gemv_ptx(use_pdl: bool, **extra) -> str:
    from ops.triton_gemv import _gemv_kernel

    pointers = ["x_ptr", "w_ptr", "scales_ptr", "bias_ptr", "out_ptr", "partial_ptr", "counter_ptr"]
    signature = {**{p: "*bf16" for p in pointers}, "partial_ptr": "*fp32", "counter_ptr": "*i32",
                 **{i: "i32" for i in ["M", "N", "K", "stride_xm", "stride_w", "k_per_split", "split"]}}
    constexprs = dict(HAS_SCALES=False, HAS_BIAS=False, SPLIT_K=False, EVEN_K=True, BLOCK_M=1, BLOCK_N=8,
                      BLOCK_K=512, NUM_STAGES=3, SILU_MUL_X=False, USE_PDL=use_pdl)
    constexprs.update(extra)
    return sm90_ptx(_gemv_kernel, signature, constexprs, ("N", "K", "stride_xm", "stride_w", "k_per_split"),
                num_warps=4, num_stages=3, launch_pdl=use_pdl)


@pytest.mark.parametrize("extra", [{}, {"BLOCK_M": 2, "SPLIT_K": True, "EVEN_K": False, "SILU_MUL_X": True}],
                         ids=["one-row", "two-rows-split-k-silu"])
def test_gemv_loads_a_weight_tile_before_waiting_and_signals_after(extra):
    ptx = _gemv_ptx(True, **extra)
    (wait,) = ptx_lines(ptx, r"griddepcontrol\.wait")
    (signal,) = ptx_lines(ptx, r"griddepcontrol\.launch_dependents")
    loads = ptx_lines(ptx, r"ld\.global|cp\.async")
    stores_and_atomics = ptx_lines(ptx, r"st\.global|atom\.global|red\.global")
    assert signal > wait
    # Before the wait: the weight tile only (8 rows x 512 bf16 over 128 threads: 32 values a thread, in
    # 16-byte loads), none of x's; every store and atomic (output, split-K workspace, counters) after it.
    before = [i for i in loads if i < wait]
    assert len(before) == 4, before
    assert stores_and_atomics and min(stores_and_atomics) > wait
    assert len(loads) > len(before)  # x, and the pipelined loop's loads, come after


def test_gemv_without_pdl_has_no_grid_dependency_control():
    assert not ptx_lines(_gemv_ptx(False), r"griddepcontrol")


def test_decode_reduce_signals_first_when_asked():
    from ops.triton_attention import _decode_reduce_kernel

    signature = {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                 "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
                 **{i: "i32" for i in ["stride_ot", "stride_oh", "head_dim", "partition_size", "num_heads"]}}
    for signal in (True, False):
        ptx = sm90_ptx(_decode_reduce_kernel, signature, dict(NUM_PARTITIONS=64, P_PAD=64, D_PAD=128, H_BLOCK=1, PDL_SIGNAL=signal),
                   num_warps=4)
        found = ptx_lines(ptx, r"griddepcontrol\.launch_dependents")
        assert len(found) == signal and not ptx_lines(ptx, r"griddepcontrol\.wait")
        if signal:
            assert found[0] < min(ptx_lines(ptx, r"ld\.global"))


def test_lamport_all_reduce_signals_first_when_asked():
    from ops.triton_allreduce import _lamport_kernel
    from tests.test_triton_allreduce import LAMPORT_SIGNATURE as signature

    for signal in (True, False):
        ptx = sm90_ptx(_lamport_kernel, signature, dict(WORLD=2, GRID=64, BLOCK=4096, HAS_RESIDUAL=True, SLOTS=3,
                                                     PDL_SIGNAL=signal), num_warps=4)
        found = ptx_lines(ptx, r"griddepcontrol\.launch_dependents")
        assert len(found) == signal and not ptx_lines(ptx, r"griddepcontrol\.wait")
        if signal:
            assert found[0] < min(ptx_lines(ptx, r"ld\.global"))
