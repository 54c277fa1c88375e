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

import bisect
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
        self.step_labels: list[str] = []  # each profiled step's phase (see `_phase`), in order

    def __enter__(self) -> "StepWindow":
        step = self.engine.step

        def profiled_step(*args, **kwargs):
            self.calls += 1
            if self.calls == self.first:
                self._start()
            if self.profiler is None or self.wall_s:
                return step(*args, **kwargs)
            self.step_labels.append(_phase(getattr(self.engine, "scheduler", None)))
            try:
                with torch.profiler.record_function(STEP_EVENT):
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
        # (the step's record_function shows on the device too, spanning its GPU work: not an op of its own)
        device = [e for e in events if e.device_type == DeviceType.CUDA and e.name != STEP_EVENT]
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

        intervals = [(e.time_range.start, e.time_range.end) for e in device]
        busy_ms = _union_us(intervals) / 1e3
        wall_ms = 1e3 * self.wall_s
        step_ranges = sorted((e.time_range.start, e.time_range.end) for e in events
                             if e.device_type == DeviceType.CPU and e.name == STEP_EVENT)
        return {
            "first_step": self.first,
            "steps": steps,
            "wall_ms_per_step": wall_ms / steps,
            "gpu_busy_ms_per_step": busy_ms / steps,
            "gpu_busy_fraction": busy_ms / wall_ms if wall_ms else 0.0,
            "gpu_ops_per_step": len(device) / steps,
            "top_gpu_ops": table(kernel_us),
            "top_cuda_host_calls": table(host_us),
            "phases": _phases(step_ranges, self.step_labels, intervals),
            "idle_gaps": _idle_gaps(step_ranges, self.step_labels, device, self.first),
        }


STEP_EVENT = "engine_step"
PHASES = ("prompts waiting", "1-15 seqs", "16-63 seqs", "64-127 seqs", "128-191 seqs", "192+ seqs")


def _phase(scheduler) -> str:
    """A step's class, read before it runs: prompts still waiting to be admitted (prefill steps), else the
    running batch's size; a tensor-parallel worker (no scheduler) has one class."""
    if scheduler is None:
        return "worker steps"
    if scheduler.waiting:
        return PHASES[0]
    n = len(scheduler.running)
    return next(label for label, low in zip(PHASES[:0:-1], (192, 128, 64, 16, 1)) if n >= low) if n else "0 seqs"


def _phases(step_ranges: list[tuple[float, float]], labels: list[str],
            intervals: list[tuple[float, float]]) -> list[dict]:
    """Where the GPU sat idle: the window's time from one step's start to the next's, split by the step's
    phase into GPU-busy and idle time (each device interval and each gap between them counted in the step
    during whose host time it began; a profile covering the whole run says what its wall time is made of)."""
    if not step_ranges or not intervals or len(step_ranges) != len(labels):
        return []
    starts = [start for start, _ in step_ranges]
    ends = starts[1:] + [max(step_ranges[-1][1], max(stop for _, stop in intervals))]
    rows = {label: {"phase": label, "steps": 0, "wall_ms": 0.0, "gpu_busy_ms": 0.0, "gpu_idle_ms": 0.0}
            for label in dict.fromkeys(labels)}
    for label, start, end in zip(labels, starts, ends):
        rows[label]["steps"] += 1
        rows[label]["wall_ms"] += (end - start) / 1e3
    merged: list[list[float]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    for i, (start, stop) in enumerate(merged):
        step = max(0, bisect.bisect_right(starts, start) - 1)
        rows[labels[step]]["gpu_busy_ms"] += (stop - start) / 1e3
        gap_end = merged[i + 1][0] if i + 1 < len(merged) else ends[-1]
        if gap_end > stop and stop >= starts[0]:
            rows[labels[max(0, bisect.bisect_right(starts, stop) - 1)]]["gpu_idle_ms"] += (gap_end - stop) / 1e3
    return list(rows.values())


def _idle_gaps(step_ranges: list[tuple[float, float]], labels: list[str], device: list, first_step: int,
               top: int = 15) -> list[dict]:
    """The largest stretches with nothing on the GPU: in which step (number and phase) each began, how far into
    that step's host time, and the device ops on either side (what the GPU finished, what it then waited for)."""
    if not step_ranges or not device or len(step_ranges) != len(labels):
        return []
    starts = [start for start, _ in step_ranges]
    ops = sorted(((e.time_range.start, e.time_range.end, e.name) for e in device), key=lambda op: op[0])
    gaps, busy_until, last = [], ops[0][1], ops[0][2]
    for start, stop, name in ops[1:]:
        if start > busy_until and busy_until >= starts[0]:
            step = bisect.bisect_right(starts, busy_until) - 1
            gaps.append({"idle_ms": (start - busy_until) / 1e3, "step": first_step + step, "phase": labels[step],
                         "into_step_ms": (busy_until - starts[step]) / 1e3, "after": last[:60], "before": name[:60]})
        if stop > busy_until:
            busy_until, last = stop, name
    return sorted(gaps, key=lambda g: -g["idle_ms"])[:top]


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
    if s.get("phases"):
        print("  by phase (ms a step: wall from one step's start to the next, GPU busy, GPU idle; seconds idle in all):")
        for row in s["phases"]:
            n = row["steps"]
            print(f"    {row['phase']:>16}: {n:5d} steps, {row['wall_ms'] / n:7.3f} wall, {row['gpu_busy_ms'] / n:7.3f} busy, "
                  f"{row['gpu_idle_ms'] / n:7.3f} idle ({row['gpu_idle_ms'] / 1e3:.3f} s)")
    if s.get("idle_gaps"):
        print("  largest GPU idle gaps (ms; the step it began in, ms into that step's host time; the ops on either side):")
        for g in s["idle_gaps"]:
            print(f"    {g['idle_ms']:7.3f}  step {g['step']:5d} ({g['phase']}), {g['into_step_ms']:6.3f} in: "
                  f"{g['after']} -> {g['before']}")
