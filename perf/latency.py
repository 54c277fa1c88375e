"""Where the time goes inside the engine, offline: prefill time against prompt length, decode step
time against batch size and context length, and each step split into its phases:

  schedule      Scheduler.schedule
  prepare       ModelRunner._prepare: flattening the batch, block tables, host-to-device copies
  forward       the model (compiled / CUDA graph / eager), without the LM head
  lm_head       the LM head on the rows that sample
  sample        the sampler (and logprobs), reading the sampled ids back
  detokenize    incremental detokenization of every new token
  outputs       building the RequestOutputs handed to the caller (output delivery)
  update_other  the rest of the engine's update: stop checks, block bookkeeping
  other         what is left of the step's wall time

The engine's `StepTimings` has schedule / execute / update (kept in the JSON as `engine_ms`); the
finer phases are measured here by wrapping the engine's methods from the outside, each timed
exclusive of the others it calls. On CUDA the wrappers synchronize at the phase edges, so GPU work
is charged to the phase that queued it (a step syncs once anyway, to read the sampled ids).
`--server` also measures the same requests through the async front and through HTTP (the real app
on uvicorn on a loopback port, driven by perf/serve_bench.py in another process), against the
engine driven directly: what the API server costs; with `--engine-process` too, the same through
HTTP with the engine in its own process (layer `http-ep`, run first). `--trace DIR` writes a chrome trace (torch
profiler) of one extra run per sweep point, with the phases as named ranges.

Models: a checkpoint directory, or `qwen3-0.6b` / `llama-3.1-8b` / `llama-3.1-70b` (random weights,
bf16, as perf/throughput.py). Engine flags are python -m engine.serve's.

    python perf/latency.py --model qwen3-0.6b --out results/latency-qwen3.json
    python perf/latency.py --model llama-3.1-8b --batch-sizes 1 16 64 256 --context-lens 128 2048 --trace traces/
    python perf/latency.py --model llama-3.1-8b --server --input-len 128 --output-len 256 --skip-sweeps
    python perf/latency.py --stub-model --server --skip-sweeps --server-requests 128 --input-len 64 --output-len 128

`--stub-model --stub-step-ms 10` adds an emulated device that takes 10 ms a step: reading a step's
tokens sleeps (GIL released) until it is done, and with async scheduling the next step's host work
overlaps it, as beside a GPU. The server's threads then contend for the GIL as they do there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import EngineArgs, SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.outputs import RequestOutput  # noqa: E402
from engine.serve import _add_engine_flags  # noqa: E402
from perf.bench_metrics import ChunkClock, RequestResult, summarize  # noqa: E402
from perf.serve_bench import BenchRequest, random_requests  # noqa: E402
from perf.throughput import CONFIGS, synthetic_model_dir  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "lm_head", "sample", "detokenize", "outputs", "update_other", "other")
SERVE_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_bench.py")


# ---- timing the phases of a step --------------------------------------------------------------------


class PhaseTimer:
    """Wraps the engine's methods (instance attributes over the class's) to sum the time spent in
    each, exclusive of the wrapped methods it calls: so the phases add up to the step whichever
    method calls which. `__exit__` removes the wrappers."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.totals: dict[str, float] = {}
        self.annotate = False  # torch.profiler.record_function ranges, while tracing
        self._sync = torch.cuda.synchronize if engine.device.type == "cuda" else None
        self._stack: list[float] = []  # per open wrapped call: time spent in the wrapped calls inside it
        self._wrapped: list[tuple[object, str]] = []

    def __enter__(self) -> "PhaseTimer":
        engine, runner = self.engine, self.engine.runner
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(runner, "execute", "forward")  # what is left of it once the others are out
        self._wrap(runner, "_prepare", "prepare", sync_after=True)
        # Synchronizing before the LM head and the sampler charges the forward's GPU work to the forward.
        self._wrap(runner.model, "compute_logits", "lm_head", sync_before=True, sync_after=True)
        self._wrap(runner, "_sample", "sample", sync_before=True)
        self._wrap(runner, "_prompt_logprobs", "sample")
        self._wrap(engine, "_advance", "update_other")
        self._wrap(engine, "_apply_tokens", "update_other")
        self._wrap(engine.detokenizer, "step", "detokenize")
        self._wrap(engine, "_request_output", "outputs")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name in reversed(self._wrapped):
            delattr(owner, name)  # the class's method shows through again
        self._wrapped.clear()

    def _wrap(self, owner: object, name: str, phase: str, sync_before: bool = False, sync_after: bool = False) -> None:
        original = getattr(owner, name)
        sync, totals, stack = self._sync, self.totals, self._stack
        totals[phase] = 0.0

        def timed(*args, **kwargs):
            if sync_before and sync:
                sync()
            start = time.perf_counter()
            stack.append(0.0)
            try:
                if self.annotate:
                    with torch.profiler.record_function(phase):
                        return original(*args, **kwargs)
                return original(*args, **kwargs)
            finally:
                if sync_after and sync:
                    sync()
                elapsed = time.perf_counter() - start
                totals[phase] += elapsed - stack.pop()
                if stack:
                    stack[-1] += elapsed

        setattr(owner, name, timed)
        self._wrapped.append((owner, name))

    def snapshot(self) -> dict[str, float]:
        return {**self.totals, **{f"engine_{k}": v for k, v in self.engine.timings.as_dict().items()}}

    @staticmethod
    def phases(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
        """Seconds per phase between two snapshots, given the wall time they spanned."""
        spent = {phase: after[phase] - before[phase] for phase in PHASES if phase != "other"}
        return {**spent, "other": wall_s - sum(spent.values())}

    @staticmethod
    def engine_timings(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """The engine's own StepTimings (schedule, execute, update; device_wait, the part of execute spent
        waiting for sampled ids) summed over the span, in seconds."""
        keys = [k for k in after if k.startswith("engine_") and k.endswith("_s")]
        return {k[len("engine_"):-len("_s")]: after[k] - before[k] for k in keys}


def _per(values: dict[str, float], count: int) -> dict[str, float]:
    """Seconds summed over `count` runs -> ms per run."""
    return {k: 1e3 * v / count for k, v in values.items()}


class Tracer:
    """`--trace DIR`: chrome traces of extra, unmeasured runs, the phases as named ranges."""

    def __init__(self, trace_dir: str | None, timer: PhaseTimer):
        self.trace_dir = trace_dir
        self.timer = timer
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.timer.annotate = True
        try:
            with profile(activities=activities) as prof:
                yield
        finally:
            self.timer.annotate = False
        path = os.path.join(self.trace_dir, f"{name}.json")
        prof.export_chrome_trace(path)
        # The same run as a table: the ops and kernels that took the most device time.
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(os.path.join(self.trace_dir, f"{name}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90))
        logging.getLogger("perf").info("wrote %s (and the table in .txt)", path)


# ---- the sweeps -------------------------------------------------------------------------------------


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _random_prompt(engine: LLMEngine, rng: np.random.Generator, length: int) -> dict:
    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer))
    return {"prompt_token_ids": rng.integers(0, vocab, size=length).tolist()}


def _run_to_end(engine: LLMEngine) -> int:
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps


def prefill_point(engine: LLMEngine, timer: PhaseTimer, tracer: Tracer, prompt_len: int, iters: int,
                  rng: np.random.Generator) -> dict:
    """One prompt of `prompt_len` tokens, max_tokens 1, on an idle engine: the time to its first
    token. One warm-up run first; every run has new token ids (no prefix-cache hits)."""
    def add() -> None:
        engine.add_request(f"prefill-{prompt_len}", _random_prompt(engine, rng, prompt_len), _greedy(1))

    add()
    _run_to_end(engine)
    times = []
    before = timer.snapshot()
    for _ in range(iters):
        add()
        start = time.perf_counter()
        steps = _run_to_end(engine)
        times.append(time.perf_counter() - start)
    after = timer.snapshot()
    if tracer.trace_dir:
        add()
        with tracer(f"prefill_{prompt_len}"):
            _run_to_end(engine)
    return {
        "prompt_len": prompt_len,
        "steps": steps,
        "time_ms": 1e3 * float(np.median(times)),
        "times_ms": [1e3 * t for t in times],
        "phases_ms": _per(timer.phases(before, after, sum(times)), iters),
        "engine_ms": _per(timer.engine_timings(before, after), iters),
    }


def decode_point(engine: LLMEngine, timer: PhaseTimer, tracer: Tracer, batch_size: int, context_len: int,
                 steps: int, warmup_steps: int, trace_steps: int, rng: np.random.Generator) -> dict:
    """`batch_size` sequences with `context_len`-token prompts, all past their prefill: the time of
    one pure decode step (every sequence one token)."""
    point = {"batch_size": batch_size, "context_len": context_len}
    budget = engine.args.max_num_batched_tokens
    fill_steps = math.ceil(batch_size * context_len / max(1, budget - batch_size)) + 2
    max_tokens = fill_steps + warmup_steps + steps + trace_steps + 2
    bs = engine.args.block_size
    blocks = batch_size * math.ceil((context_len + max_tokens) / bs)
    if blocks > engine.block_manager.num_blocks:
        return {**point, "skipped": f"needs {blocks} KV blocks; the cache has {engine.block_manager.num_blocks}"}
    if context_len + max_tokens > engine.model_config.max_model_len:
        return {**point, "skipped": f"needs {context_len + max_tokens} tokens; "
                                    f"max_model_len is {engine.model_config.max_model_len}"}
    ids = [f"decode-{batch_size}-{context_len}-{i}" for i in range(batch_size)]
    try:
        for rid in ids:
            engine.add_request(rid, _random_prompt(engine, rng, context_len), _greedy(max_tokens))
        started: set[str] = set()
        while len(started) < batch_size:
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        for _ in range(warmup_steps):
            engine.step()
        stats_before, before = engine.get_stats(), timer.snapshot()
        walls = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
        after, stats_after = timer.snapshot(), engine.get_stats()
        generated = stats_after.generation_tokens_total - stats_before.generation_tokens_total
        if generated != batch_size * steps or stats_after.prompt_tokens_total != stats_before.prompt_tokens_total:
            raise RuntimeError(f"decode batch {batch_size} x {context_len} was not a pure decode of every sequence "
                               f"({generated} tokens in {steps} steps)")
        if tracer.trace_dir and trace_steps:
            with tracer(f"decode_b{batch_size}_c{context_len}"):
                for _ in range(trace_steps):
                    engine.step()
    finally:
        engine.abort_request(ids)
    step_s = float(np.median(walls))
    return {
        **point,
        "steps": steps,
        "step_ms": 1e3 * step_s,
        "step_ms_mean": 1e3 * float(np.mean(walls)),
        "step_ms_p90": 1e3 * float(np.percentile(walls, 90)),
        "tokens_per_s": batch_size / step_s,
        "phases_ms": _per(timer.phases(before, after, sum(walls)), steps),
        "engine_ms": _per(timer.engine_timings(before, after), steps),
    }


# ---- the same requests through the engine, the async front and HTTP ---------------------------------


def _observe(clock: ChunkClock, seen: int, output: RequestOutput, now: float) -> int:
    """Book a cumulative output like a streamed chunk; returns the tokens seen so far."""
    completion = output.outputs[0]
    if len(completion.token_ids) > seen:
        clock.chunk(now)
        seen = len(completion.token_ids)
    if output.finished:
        clock.result.output_tokens = seen
        clock.result.success = completion.finish_reason == "length"
    return seen


def run_engine(engine: LLMEngine, requests: list[BenchRequest], concurrent: bool) -> tuple[list[RequestResult], float]:
    """Drive `LLMEngine.add_request` / `step` directly: all requests at once, or one after another."""
    results = [RequestResult(prompt_len=r.prompt_len) for r in requests]
    groups = [list(range(len(requests)))] if concurrent else [[i] for i in range(len(requests))]
    start = time.perf_counter()
    for group in groups:
        clocks, seen = {}, {}
        for i in group:
            rid = f"engine-{i}"
            clocks[rid] = ChunkClock(results[i], time.perf_counter())
            results[i].start = clocks[rid].sent_at - start
            seen[rid] = 0
            engine.add_request(rid, {"prompt_token_ids": requests[i].prompt}, _greedy(requests[i].output_len))
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for output in outputs:
                seen[output.request_id] = _observe(clocks[output.request_id], seen[output.request_id], output, now)
    return results, time.perf_counter() - start


async def run_async(async_engine, requests: list[BenchRequest], concurrent: bool) -> tuple[list[RequestResult], float]:
    """The same through `AsyncLLMEngine.generate` (its step-loop thread, queues, event loop)."""
    results = [RequestResult(prompt_len=r.prompt_len) for r in requests]
    start = time.perf_counter()

    async def one(i: int) -> None:
        clock = ChunkClock(results[i], time.perf_counter())
        results[i].start = clock.sent_at - start
        seen = 0
        prompt = {"prompt_token_ids": requests[i].prompt}
        async for output in async_engine.generate(prompt, _greedy(requests[i].output_len), f"async-{i}-{concurrent}"):
            seen = _observe(clock, seen, output, time.perf_counter())

    if concurrent:
        await asyncio.gather(*(one(i) for i in range(len(requests))))
    else:
        for i in range(len(requests)):
            await one(i)
    return results, time.perf_counter() - start


@contextlib.contextmanager
def http_server(async_engine) -> Iterator[str]:
    """The real app on uvicorn, on a free loopback port, in a thread of this process; yields its URL.
    The app owns the engine: leaving shuts both down."""
    import uvicorn

    from api.app import build_app

    server = uvicorn.Server(uvicorn.Config(build_app(async_engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="latency-http-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the in-process server failed to start")
        time.sleep(0.01)
    try:
        yield "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def run_http(url: str, args: argparse.Namespace, vocab: int, seed: int, concurrent: bool) -> dict:
    """perf/serve_bench.py in its own process (its own GIL), on the same requests."""
    num = args.server_requests if concurrent else args.sequential_requests
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [
            sys.executable, SERVE_BENCH, "--base-url", url, "--dataset", "random", "--num-prompts",
            str(num), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--vocab-size", str(vocab), "--seed", str(seed), "--ignore-eos", "--disable-tqdm",
            "--result-json", out,
        ] + ([] if concurrent else ["--max-concurrency", "1"])
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            record = json.load(f)
    return {k: v for k, v in record.items() if not isinstance(v, list)}


def engine_process_layer(engine_args: EngineArgs, args: argparse.Namespace) -> dict[str, dict]:
    """`--server --engine-process`: the same requests through HTTP with the engine in its own process
    (python -m engine.serve --engine-process). Run before the in-process engine exists: on a GPU
    each would want the memory the other holds, and a process that exits gives all of it back."""
    from engine.async_engine import AsyncLLMEngine
    from engine.engine_process import RemoteEngine

    on_start = functools.partial(stub_model, step_ms=args.stub_step_ms) if args.stub_model else None
    async_engine = AsyncLLMEngine(RemoteEngine(engine_args, on_start=on_start))
    try:
        vocab = min(async_engine.model_config.vocab_size, len(async_engine.tokenizer))
        with http_server(async_engine) as url:
            return {mode: run_http(url, args, vocab, engine_args.seed, concurrent)
                    for mode, concurrent in (("sequential", False), ("concurrent", True))}
    finally:
        async_engine.shutdown()


def server_comparison(engine: LLMEngine, args: argparse.Namespace, engine_process: dict | None = None) -> dict:
    """The same requests (serve_bench's random dataset, same seed) one at a time and all at once,
    through each layer; summaries under serve_bench's names."""
    from engine.async_engine import AsyncLLMEngine

    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer))
    seed = engine.args.seed
    # One at a time, every request costs its whole decode: a few of them measure the latencies.
    requests = {concurrent: random_requests(num, args.input_len, args.output_len, 0.0, vocab, seed)
                for concurrent, num in ((False, args.sequential_requests), (True, args.server_requests))}
    layers: dict[str, dict[str, dict]] = {"engine": {}, "async": {}, "http": {}}
    modes = {"sequential": False, "concurrent": True}
    # The heap is not frozen here (engine.serve freezes its own after start-up; LLM.generate does not).
    # Unfrozen, full collections pause the in-process front's event loop at times (up to ~190 ms on the
    # CPU stub). The engine layer's own figure was unsteady on the H100 (17.1-20.5k out tok/s in session
    # 11, frozen or not; cause not found): `gpu_check.sh serve-offline` sets the server against
    # perf/throughput.py's LLM.generate instead.
    for mode, concurrent in modes.items():
        layers["engine"][mode] = summarize(*run_engine(engine, requests[concurrent], concurrent))
    async_engine = AsyncLLMEngine(engine)
    for mode, concurrent in modes.items():
        layers["async"][mode] = summarize(*asyncio.run(run_async(async_engine, requests[concurrent], concurrent)))
    with http_server(async_engine) as url:
        for mode, concurrent in modes.items():
            layers["http"][mode] = run_http(url, args, vocab, seed, concurrent)
    if engine_process is not None:
        layers["http-ep"] = engine_process

    def versus(layer: str) -> dict:
        overhead = {}
        for mode in modes:
            direct, http = layers["engine"][mode], layers[layer][mode]
            overhead[mode] = {
                "ttft_ms": http["median_ttft_ms"] - direct["median_ttft_ms"],
                "tpot_ms": http["median_tpot_ms"] - direct["median_tpot_ms"],
                "e2el_ms": http["median_e2el_ms"] - direct["median_e2el_ms"],
                "output_throughput_ratio": http["output_throughput"] / direct["output_throughput"],
            }
        return overhead

    record = {"num_requests": args.server_requests, "sequential_requests": args.sequential_requests,
              "input_len": args.input_len, "output_len": args.output_len, "layers": layers,
              "http_vs_engine": versus("http")}
    if engine_process is not None:
        record["http_ep_vs_engine"] = versus("http-ep")
    return record


# ---- reporting --------------------------------------------------------------------------------------


def print_report(record: dict) -> None:
    header = "  ".join(f"{p:>12}" for p in PHASES)
    if record["prefill"]:
        print(f"\nprefill (ms to the first token of one prompt; phases are means)\n"
              f"{'prompt_len':>10} {'steps':>5} {'median':>9}  {header}")
        for p in record["prefill"]:
            phases = "  ".join(f"{p['phases_ms'][k]:12.3f}" for k in PHASES)
            print(f"{p['prompt_len']:>10} {p['steps']:>5} {p['time_ms']:9.2f}  {phases}")
    if record["decode"]:
        print(f"\ndecode (ms per step; phases are means)\n"
              f"{'batch':>6} {'context':>7} {'median':>9} {'mean':>9} {'tok/s':>10}  {header}")
        for d in record["decode"]:
            if "skipped" in d:
                print(f"{d['batch_size']:>6} {d['context_len']:>7}  skipped: {d['skipped']}")
                continue
            phases = "  ".join(f"{d['phases_ms'][k]:12.3f}" for k in PHASES)
            print(f"{d['batch_size']:>6} {d['context_len']:>7} {d['step_ms']:9.3f} {d['step_ms_mean']:9.3f} "
                  f"{d['tokens_per_s']:10.1f}  {phases}")
    server = record.get("server")
    if server:
        print(f"\n{server['sequential_requests']} requests one at a time, then {server['num_requests']} at once; "
              f"{server['input_len']} in / {server['output_len']} out, medians in ms")
        note = "   (http-ep: the engine in its own process)" if "http-ep" in server["layers"] else ""
        print(f"{'layer':>7} {'mode':>11} {'TTFT':>9} {'TPOT':>9} {'E2EL':>9} {'out tok/s':>10}{note}")
        for mode in ("sequential", "concurrent"):
            for layer, results in server["layers"].items():
                s = results[mode]
                print(f"{layer:>7} {mode:>11} {s['median_ttft_ms']:9.2f} {s['median_tpot_ms']:9.3f} "
                      f"{s['median_e2el_ms']:9.2f} {s['output_throughput']:10.1f}")
        for key, name in (("http_vs_engine", "HTTP"), ("http_ep_vs_engine", "HTTP, engine process,")):
            for mode, o in server.get(key, {}).items():
                print(f"{name} vs engine, {mode}: TTFT {o['ttft_ms']:+.2f} ms, TPOT {o['tpot_ms']:+.3f} ms, "
                      f"E2EL {o['e2el_ms']:+.2f} ms, output throughput x{o['output_throughput_ratio']:.3f}")


# ---- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench = p.add_argument_group("latency")
    bench.add_argument("--prefill-lens", type=int, nargs="*", default=[128, 256, 512, 1024, 2048, 4096])
    bench.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    bench.add_argument("--context-lens", type=int, nargs="*", default=[128, 1024, 4096])
    bench.add_argument("--iters", type=int, default=5, help="measured prefills per prompt length (median)")
    bench.add_argument("--decode-steps", type=int, default=20, help="measured decode steps per point (median)")
    bench.add_argument("--warmup-steps", type=int, default=3, help="decode steps before measuring, per point")
    bench.add_argument("--skip-sweeps", action="store_true", help="only the --server comparison")
    bench.add_argument("--server", action="store_true",
                       help="also time the same requests through the async front and the HTTP server")
    bench.add_argument("--server-requests", type=int, default=16, help="--server: requests sent all at once")
    bench.add_argument("--sequential-requests", type=int, default=4, help="--server: requests sent one at a time")
    bench.add_argument("--input-len", type=int, default=128, help="--server: prompt tokens per request")
    bench.add_argument("--output-len", type=int, default=128, help="--server: output tokens per request")
    bench.add_argument("--trace", metavar="DIR", default=None, help="write chrome traces (torch profiler) here")
    bench.add_argument("--trace-steps", type=int, default=3, help="decode steps per trace")
    bench.add_argument("--stub-model", action="store_true",
                       help="replace the model by random logits: time the engine's (and with --server the "
                            "server's) own host work, with no GPU and no model cost")
    bench.add_argument("--stub-step-ms", type=float, default=0.0,
                       help="--stub-model: an emulated device takes this long a step (reading its tokens "
                            "waits with the GIL released), so the server's and the engine's host work contend as on a GPU")
    bench.add_argument("--out", default=None, help="write the results here (JSON)")
    bench.add_argument("--label", default=None, help="a name for this run in plots")
    _add_engine_flags(p)
    return p


def stub_model(engine: LLMEngine, step_ms: float = 0.0) -> None:
    """`--stub-model`: the runner's forward returns random logits at once, so a step costs only the
    engine's host work (scheduling, inputs, sampling, detokenization, outputs). The server's cost
    per streamed token shows against it without a GPU (it found the stats read that counted every
    free block each step).

    `step_ms` adds an emulated device: each forward occupies it for `step_ms` from when it is free,
    and the step's tokens can be read only once it is done; reading them sleeps (GIL released) until
    then. Launched asynchronously (async scheduling), the next step's host work overlaps the device
    time as on a GPU; a synchronous step waits at once."""
    runner = engine.runner
    vocab, device = engine.model_config.vocab_size, engine.device
    clock = {"free_at": 0.0, "ready_at": 0.0}  # the emulated device: busy until, and the last step's end

    def execute_model(input_ids, positions, meta, logits_rows, block_copies=None):
        if step_ms:
            clock["free_at"] = clock["ready_at"] = max(time.perf_counter(), clock["free_at"]) + step_ms / 1000
        return None if logits_rows is None else torch.randn(logits_rows.shape[0], vocab, device=device)

    def wait_for(ready_at: float) -> None:
        time.sleep(max(0.0, ready_at - time.perf_counter()))

    runner.execute_model = execute_model
    if not step_ms:
        return
    execute, launch, collect = runner.execute, runner.launch, runner.collect

    def execute_and_wait(*args, **kwargs):
        out = execute(*args, **kwargs)
        wait_for(clock["ready_at"])
        return out

    def launch_with_deadline(*args, **kwargs):
        sampled = launch(*args, **kwargs)
        if sampled is not None:
            sampled.emulated_ready_at = clock["ready_at"]
        return sampled

    def collect_when_ready(sampled):
        if sampled is not None:
            wait_for(sampled.emulated_ready_at)
        return collect(sampled)

    runner.execute, runner.launch, runner.collect = execute_and_wait, launch_with_deadline, collect_when_ready


def engine_args_from(args: argparse.Namespace) -> tuple[EngineArgs, Callable[[], None]]:
    """EngineArgs from the engine flags; a published config name becomes a random-weight bf16 model.
    Returns the args and a cleanup for the synthetic checkpoint."""
    from engine.demo_model import demo_model_path

    kwargs = {name: value for name, value in vars(args).items() if name in EngineArgs.field_names()}
    model = kwargs.get("model") or demo_model_path()
    cleanup = lambda: None  # noqa: E731
    if not os.path.isdir(model) and os.path.isfile(os.path.join(CONFIGS, f"{model}.json")):
        model = synthetic_model_dir(model)
        cleanup = lambda: shutil.rmtree(model, ignore_errors=True)  # noqa: E731
        kwargs.setdefault("load_format", "dummy")
        kwargs.setdefault("dtype", "bfloat16")
    kwargs["model"] = model
    if args.batch_sizes:
        kwargs.setdefault("max_num_seqs", max(256, max(args.batch_sizes)))
    return EngineArgs(**kwargs), cleanup


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        engine_args, cleanup = engine_args_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    if min(args.iters, args.decode_steps) < 1 or (args.server and args.output_len < 2):
        parser.error("--iters and --decode-steps must be at least 1, and --output-len at least 2 (TPOT)")
    if args.batch_sizes and max(args.batch_sizes) > engine_args.max_num_seqs:
        parser.error(f"--batch-sizes up to {max(args.batch_sizes)} needs --max-num-seqs of at least that")
    if args.stub_step_ms and not args.stub_model:
        parser.error("--stub-step-ms needs --stub-model")
    if args.stub_model and engine_args.tensor_parallel_size > 1:
        parser.error("--stub-model runs one rank (the workers would still run the model)")
    try:
        engine_process = engine_process_layer(engine_args, args) if args.server and engine_args.engine_process else None
        engine = LLMEngine(engine_args)
        if args.stub_model:
            stub_model(engine, args.stub_step_ms)
        rng = np.random.default_rng(engine_args.seed)
        device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
        record = {
            "tool": "latency",
            "label": args.label,
            "model": getattr(args, "model", None) or "demo",
            "device": device,
            "dtype": str(engine.model_config.dtype).removeprefix("torch."),
            "engine_args": dataclasses.asdict(engine_args),
            "kv_blocks": engine.block_manager.num_blocks,
            "stub_model": args.stub_model,
            "stub_step_ms": args.stub_step_ms,
            "prefill": [],
            "decode": [],
        }
        if not args.skip_sweeps:
            # A phase breakdown needs each step whole (launched and read back in the same call): the
            # sweeps run one step at a time; the --server comparison below uses the engine's setting.
            async_scheduling, engine.args.async_scheduling = engine.args.async_scheduling, False
            with PhaseTimer(engine) as timer:
                tracer = Tracer(args.trace, timer)
                for length in args.prefill_lens:
                    record["prefill"].append(prefill_point(engine, timer, tracer, length, args.iters, rng))
                for context in args.context_lens:
                    for batch in args.batch_sizes:
                        record["decode"].append(decode_point(engine, timer, tracer, batch, context, args.decode_steps,
                                                             args.warmup_steps, args.trace_steps, rng))
            engine.args.async_scheduling = async_scheduling
        if args.server:
            record["server"] = server_comparison(engine, args, engine_process)
    finally:
        cleanup()
    print_report(record)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
