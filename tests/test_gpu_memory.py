"""GPU memory accounting on the CPU, with torch.cuda's memory (and graph) calls faked: the KV cache's sizing
hands back what its profile left cached; graphs.cuda_graph's capture loop captures largest first, hands back
cached memory before the first capture (and logs it), and turns an out-of-memory capture into an error that
names the flags. The real runs are on the GPU (tests/test_gpu_engine.py, perf/gpu_check.sh)."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from types import SimpleNamespace

from engine.model_runner import ModelRunner
from graphs.cuda_graph import CudaGraphRunner

GiB = 2**30


class FakeCuda:
    """The torch.cuda calls the capture loop makes, over a pretend 80 GiB device."""

    def __init__(self, fail_on_capture: int | None = None):
        self.events: list[str] = []
        self.reserved, self.allocated, self.peak = 78 * GiB, 69 * GiB, 0
        self.fail_on_capture = fail_on_capture
        self.captures = 0

    def install(self, monkeypatch) -> None:
        fake = self
        for name in ("memory_reserved", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats",
                     "empty_cache", "mem_get_info", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

        class Graph:
            def __init__(self):
                self.replays = 0

            def pool(self):
                return "pool"

            def replay(self):
                self.replays += 1

        @contextlib.contextmanager
        def graph(g, pool=None):
            fake.captures += 1
            fake.events.append(f"capture pool={pool}")
            if fake.captures == fake.fail_on_capture:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
            yield
            fake.reserved += GiB // 4  # what each graph's pool takes

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)

    def memory_reserved(self, device=None):
        return self.reserved

    def memory_allocated(self, device=None):
        return self.allocated

    def max_memory_allocated(self, device=None):
        return self.peak

    def reset_peak_memory_stats(self, device=None):
        self.events.append("reset peak")
        self.peak = self.allocated

    def empty_cache(self):
        self.events.append("empty_cache")
        self.reserved = self.allocated

    def mem_get_info(self, device=None):
        total = 80 * GiB
        return total - self.reserved - GiB // 2, total

    def synchronize(self, device=None):
        pass


def _runner(forward_calls: list[int]) -> CudaGraphRunner:
    def forward(ids, positions):
        forward_calls.append(ids.shape[0])
        return torch.zeros(ids.shape[0], 4)

    return CudaGraphRunner(forward, kv_caches=[], backend="torch", batch_sizes=[1, 2, 4], max_model_len=64,
                           block_size=16, device=torch.device("cpu"), mixed_sizes=[16, 32], max_num_seqs=4)


def test_capture_hands_cached_memory_back_before_the_first_graph_and_logs_it(monkeypatch, caplog):
    fake = FakeCuda()
    fake.install(monkeypatch)
    calls: list[int] = []
    runner = _runner(calls)
    with caplog.at_level(logging.INFO, logger="engine"):
        runner.capture()
    # Largest first (32 and 16 tokens, then 4, 2, 1 sequences), each warmed up, then captured: the first
    # capture into a new pool, the rest into it.
    assert calls == [32, 32, 16, 16, 4, 4, 2, 2, 1, 1]
    assert fake.events[:3] == ["reset peak", "empty_cache", "capture pool=None"]
    assert fake.events[3:] == ["capture pool=pool"] * 4
    assert set(runner.mixed_graphs) == {16, 32} and set(runner.graphs) == {1, 2, 4}
    assert all(g.replays == 1 for g in [*runner.mixed_graphs.values(), *runner.graphs.values()])
    before = next(r.getMessage() for r in caplog.records if "before the first CUDA-graph capture" in r.getMessage())
    assert "after returning 9.00 GiB cached by torch" in before and "torch: 69.00 GiB allocated" in before
    pool = next(r.getMessage() for r in caplog.records if "the graphs' shared pool" in r.getMessage())
    assert "1.25 GiB more" in pool  # five graphs of a quarter GiB each


def test_an_out_of_memory_capture_names_the_flags_to_lower(monkeypatch):
    fake = FakeCuda(fail_on_capture=2)
    fake.install(monkeypatch)
    runner = _runner([])
    with pytest.raises(RuntimeError, match=r"capturing the CUDA graph for 16 tokens ran out of GPU memory") as info:
        runner.capture()
    assert "--gpu-memory-utilization" in str(info.value) and "--enforce-eager" in str(info.value)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_other_capture_errors_are_not_reworded(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)

    @contextlib.contextmanager
    def broken(g, pool=None):
        raise torch.AcceleratorError("CUDA error: operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "graph", broken)
    with pytest.raises(torch.AcceleratorError, match="not permitted"):
        _runner([]).capture()


def test_an_out_of_memory_hidden_behind_the_capture_error_is_found(monkeypatch):
    """An out-of-memory inside the capture ends it with an error of its own, the OOM as its context."""
    fake = FakeCuda()
    fake.install(monkeypatch)

    @contextlib.contextmanager
    def oom_then_invalidated(g, pool=None):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise torch.AcceleratorError("CUDA error: operation failed due to a previous error during capture")
        yield

    monkeypatch.setattr(torch.cuda, "graph", oom_then_invalidated)
    with pytest.raises(RuntimeError, match="ran out of GPU memory"):
        _runner([]).capture()


def test_the_kv_sizing_hands_back_what_its_profile_left_cached(monkeypatch, caplog):
    """The profile's largest step leaves blocks cached in torch's allocator; the KV cache is sized from the
    peak, so that cache goes back to the driver before the KV cache is allocated, not on top of it."""
    fake = FakeCuda()
    fake.install(monkeypatch)
    weights, activations, fragments, outside = 15 * GiB, GiB + GiB // 2, 7 * GiB + GiB // 2, GiB // 2
    fake.allocated = fake.reserved = weights

    def mem_get_info(device=None):
        fake.events.append("mem_get_info")
        return 80 * GiB - fake.reserved - outside, 80 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)

    class Model:
        def __call__(self, ids, positions):
            fake.events.append("forward")
            fake.peak = weights + activations
            fake.reserved = weights + activations + fragments  # freed, still cached
            return torch.zeros(ids.shape[0], 4)

        def compute_logits(self, hidden):
            return hidden

    runner = SimpleNamespace(
        args=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=8, gpu_memory_utilization=0.9),
        device=torch.device("cpu"), attention_backend="torch", model=Model(),
        model_config=SimpleNamespace(max_model_len=32))
    with caplog.at_level(logging.INFO, logger="engine"):
        budget = ModelRunner._profile_free_gpu_memory(runner)
    assert fake.events == ["empty_cache", "reset peak", "forward", "empty_cache", "mem_get_info"]
    assert budget == int(80 * GiB * 0.9 - (weights + activations) - outside)
    assert fake.reserved == weights  # the KV cache is allocated into memory the driver has back
    assert "the profile left 9.00 GiB cached by torch (handed back)" in caplog.text
