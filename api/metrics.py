"""Prometheus metrics of the server, in a registry of its own (several apps can share a process).

Load gauges and lifetime token counters are read from the engine's stats at scrape time; per-request
latencies (time to first token, inter-token latency, end-to-end, queue time) are observed from each
request's `RequestOutput.metrics` as its outputs pass (`ServerMetrics.tracker()`).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.llm_engine import EngineStats
from engine.outputs import RequestOutput

PREFIX = "engine_"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0)


class _EngineStatsCollector(Collector):
    """Gauges and counters straight from `EngineStats`, read when Prometheus scrapes."""

    def __init__(self, get_stats: Callable[[], EngineStats]):
        self._get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        s = self._get_stats()
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in the running batch.", s.num_running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
                                s.kv_cache_usage)
        yield GaugeMetricFamily(PREFIX + "kv_cache_used_blocks", "KV-cache blocks in use.", s.num_used_blocks)
        yield GaugeMetricFamily(PREFIX + "kv_cache_total_blocks", "KV-cache blocks in the pool.", s.num_total_blocks)
        yield GaugeMetricFamily(PREFIX + "kv_cache_cached_free_blocks", "Free KV-cache blocks still holding a reusable prefix.",
                                s.num_cached_free_blocks)
        yield GaugeMetricFamily(PREFIX + "kv_cache_waste_perc", "Reserved-but-empty KV slots over reserved slots, now (0 to 1).",
                                s.kv_waste_fraction)
        yield GaugeMetricFamily(PREFIX + "kv_cache_waste_mean_perc",
                                "Reserved-but-empty KV slots over reserved slots, averaged over all steps (0 to 1).",
                                s.kv_waste_fraction_mean)
        yield CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).",
                                  s.prompt_tokens_total)
        yield CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Requests preempted for lack of KV blocks.",
                                  s.num_preemptions_total)
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  s.prefix_cache_queries_total)
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  s.prefix_cache_hits_total)


class ServerMetrics:
    def __init__(self, get_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(get_stats))
        self.request_success = Counter(
            PREFIX + "request_success", "Finished completions by finish reason (abort: the client went away).",
            ["finished_reason"], registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Between consecutive generated tokens of a request.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "From arrival to the last token.",
            buckets=_REQUEST_BUCKETS, registry=self.registry,
        )
        self.request_queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "From arrival to first being scheduled.",
            buckets=_REQUEST_BUCKETS, registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> "RequestTracker":
        return RequestTracker(self)


class RequestTracker:
    """Observes one request's latencies as its outputs pass, and how it ended."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self._last: RequestOutput | None = None
        self._seen_tokens = 0
        self._last_token_time: float | None = None
        self._ended = False

    def observe(self, output: RequestOutput) -> None:
        self._last = output
        tokens = max(len(c.token_ids) for c in output.outputs)
        m = output.metrics
        if m is None or tokens <= self._seen_tokens or m.last_token_time is None:
            return
        # Several steps arrive as one output when the consumer lags (the first output may already
        # hold several tokens): spread the time since the last token seen over the new gaps.
        if self._last_token_time is None:
            since, gaps = m.first_token_time, tokens - 1
        else:
            since, gaps = self._last_token_time, tokens - self._seen_tokens
        if gaps > 0 and since is not None:
            for _ in range(gaps):
                self._metrics.inter_token_latency.observe((m.last_token_time - since) / gaps)
        self._seen_tokens, self._last_token_time = tokens, m.last_token_time

    def end(self) -> None:
        """Record how the request ended (idempotent); unfinished counts as aborted."""
        if self._ended:
            return
        self._ended = True
        metrics, last = self._metrics, self._last
        if last is None or not last.finished:
            metrics.request_success.labels(finished_reason="abort").inc()
            return
        for completion in last.outputs:
            metrics.request_success.labels(finished_reason=completion.finish_reason or "abort").inc()
        m = last.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            metrics.time_to_first_token.observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            metrics.request_queue_time.observe(m.first_scheduled_time - m.arrival_time)
        metrics.e2e_request_latency.observe((m.finished_time or time.time()) - m.arrival_time)
