"""A torch-profiler look at a window of engine steps: how busy the GPU is, and what runs.

The engine's `step` is wrapped so that the profiler records steps [first, first + count) of
whatever runs next (a `generate` call, the server's loop); the rest runs unprofiled. The summary
answers "is the GPU waiting for the host?": wall time a step against GPU time a step (the union of
kernel and copy intervals, so overlapping streams count once), and the largest kernels and host-side
CUDA calls (a long cudaEventSynchronize is the host waiting for the device: good when it overlaps,
bad when the GPU idles meanwhile).

    window = StepWindow(llm.llm_engine, first=200, count=20)
    with window:
        llm.generate(...)
    print_summary(window.summary())
"""

from __future__ import annotations

import collections
import os
import time

import torch
from torch.autograd import DeviceType


class StepWindow:
    def __init__(self, engine, first: int, count: int, trace_path: str | None = None):
        if first < 1 or count < 1:
            raise ValueError("the window needs first >= 1 and count >= 1")
        self.engine, self.first, self.count, self.trace_path = engine, first, count, trace_path
        self.calls = 0
        self.profiler: torch.profiler.profile | None = None
        self.wall_s = 0.0

    def __enter__(self) -> "StepWindow":
        step = self.engine.step

        def profiled_step(*args, **kwargs):
            self.calls += 1
            if self.calls == self.first:
                self._start()
            try:
                return step(*args, **kwargs)
            finally:
                if self.calls == self.first + self.count - 1:
                    self._stop()

        self.engine.step = profiled_step
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.step  # the instance attribute: the class's method shows again
        self._stop()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.start()
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        if self.profiler is None or self.wall_s:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window's last GPU work belongs to it
        self.wall_s = time.perf_counter() - self._t0
        self.profiler.stop()
        if self.trace_path:
            self.profiler.export_chrome_trace(self.trace_path)

    def summary(self, top: int = int(os.environ.get("STEP_PROFILE_TOP", 12))) -> dict:
        if self.profiler is None:
            raise RuntimeError(f"the run had {self.calls} steps, fewer than the window's first ({self.first})")
        steps = min(self.count, self.calls - self.first + 1)
        events = self.profiler.events()
        device = [e for e in events if e.device_type == DeviceType.CUDA]
        kernel_us: dict[str, list[float]] = collections.defaultdict(list)
        for e in device:
            kernel_us[e.name].append(e.time_range.end - e.time_range.start)
        host_us: dict[str, list[float]] = collections.defaultdict(list)
        for e in events:
            if e.device_type == DeviceType.CPU and e.name.startswith("cuda"):
                host_us[e.name].append(e.time_range.end - e.time_range.start)

        def table(groups: dict[str, list[float]]) -> list[dict]:
            rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
            return [{"name": name[:90], "calls": len(us), "ms_per_step": sum(us) / 1e3 / steps} for name, us in rows]

        busy_ms = _union_us([(e.time_range.start, e.time_range.end) for e in device]) / 1e3
        wall_ms = 1e3 * self.wall_s
        return {
            "first_step": self.first,
            "steps": steps,
            "wall_ms_per_step": wall_ms / steps,
            "gpu_busy_ms_per_step": busy_ms / steps,
            "gpu_busy_fraction": busy_ms / wall_ms if wall_ms else 0.0,
            "gpu_ops_per_step": len(device) / steps,
            "top_gpu_ops": table(kernel_us),
            "top_cuda_host_calls": table(host_us),
        }


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def print_summary(s: dict) -> None:
    print(f"  profiled steps {s['first_step']}..{s['first_step'] + s['steps'] - 1}: wall {s['wall_ms_per_step']:.3f} ms a step, "
          f"GPU busy {s['gpu_busy_ms_per_step']:.3f} ms ({100 * s['gpu_busy_fraction']:.1f}%), "
          f"{s['gpu_ops_per_step']:.0f} GPU ops a step")
    for title, key in (("GPU ops", "top_gpu_ops"), ("host CUDA calls", "top_cuda_host_calls")):
        print(f"  {title} (ms a step, calls in the window):")
        for row in s[key]:
            print(f"    {row['ms_per_step']:8.3f}  {row['calls']:6d}  {row['name']}")
