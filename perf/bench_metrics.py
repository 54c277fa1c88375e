"""The arithmetic of a serving benchmark, as vLLM's benchmark_serving defines it.

Per request, measured on the client from the moment the request is sent:
  TTFT   time to the first content chunk
  ITL    every gap between consecutive content chunks
  E2EL   time to the last content chunk
  TPOT   (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token
Over a run: mean, median, std, p90 and p99 of each (in ms), request / output-token / total-token
throughput, and goodput: requests per second that met every SLO given (vLLM counts a one-token
request's TPOT as 0 there). Only numpy is needed, so any client machine can run it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
PERCENTILES = (90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds from when it was sent."""

    success: bool = False
    prompt_len: int = 0  # prompt tokens (the server's usage when it reports it, else as sent)
    output_tokens: int = 0  # completion tokens (the server's usage when it reports it, else content chunks)
    ttft: float = 0.0
    latency: float = 0.0  # E2EL
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # when it was sent, from the start of the run
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


class ChunkClock:
    """Turns the arrival times of one request's content into TTFT, ITL and E2EL."""

    def __init__(self, result: RequestResult, sent_at: float):
        self.result = result
        self.sent_at = sent_at
        self.last: float | None = None

    def chunk(self, now: float) -> None:
        """A content chunk (one or more new tokens) arrived at `now` (same clock as `sent_at`)."""
        if self.last is None:
            self.result.ttft = now - self.sent_at
        else:
            self.result.itl.append(now - self.last)
        self.last = now
        self.result.latency = now - self.sent_at

    @property
    def started(self) -> bool:
        return self.last is not None


def distribution(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std and percentiles of `values_s` (seconds), in ms; None for no values."""
    keys = ["mean", "median", "std"] + [f"p{p}" for p in PERCENTILES]
    if len(values_s) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    stats = [ms.mean(), np.median(ms), ms.std()] + [np.percentile(ms, p) for p in PERCENTILES]
    return {k: float(v) for k, v in zip(keys, stats)}


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"a goodput SLO is NAME:MILLISECONDS with NAME one of {', '.join(SLO_METRICS)}; got {spec!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"the SLO {spec!r} needs a number of milliseconds") from None
        if slos[name] <= 0:
            raise ValueError(f"the SLO {spec!r} must be positive")
    return slos


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    if not result.success:
        return False
    values = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.latency}
    return all(values[name] * 1e3 <= limit for name, limit in slos_ms.items())


def summarize(results: Sequence[RequestResult], duration_s: float, slos_ms: dict[str, float] | None = None) -> dict:
    """The run's figures under vLLM's names (completed, request_throughput, mean_ttft_ms, p99_itl_ms, ...)."""
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "request_goodput": None,
    }
    if slos_ms:
        summary["request_goodput"] = sum(meets_slos(r, slos_ms) for r in results) / duration_s
    values = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    for metric in METRICS:
        for stat, value in distribution(values[metric]).items():
            summary[f"{stat}_{metric}_ms"] = value
    return summary


def arrival_offsets(num: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """When each request is sent, in seconds from the start. Gaps are gamma-distributed with mean
    1 / request_rate and shape `burstiness` (1: a Poisson process; below 1 burstier, above 1
    steadier), as vLLM's benchmark draws them; an infinite rate sends everything at once."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if request_rate <= 0:
        raise ValueError(f"the request rate must be positive, got {request_rate}")
    if math.isinf(request_rate) or num == 0:
        return np.zeros(num)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
