"""Serving benchmark: load on any OpenAI-compatible server, measured on the client.

Sends --num-warmups copies of the first request before the clock starts (default 1, as vLLM's
benchmark: the client's first connection and the server's first-request costs stay out of the
numbers), then exactly --num-prompts streamed requests to --base-url + --endpoint, and stops. Prompts are
token ids (the completions API takes a list of ints), so input lengths are exact whatever the
tokenizer; output tokens are counted from the server's usage (stream_options.include_usage).
TTFT, TPOT, ITL and E2EL are measured as vLLM's benchmark_serving measures them (see
perf/bench_metrics.py); the summary table has its layout and the JSON its key names.

Datasets:
  random  --input-len / --output-len per request, each drawn uniformly from [L(1-r), L(1+r)] with
          r = --range-ratio; token ids uniform in [0, --vocab-size), seeded by --seed
  fixed   perf/throughput.py's `fixed` workload: the same token ids, every request exactly
          --input-len in / --output-len out, so the server's figures compare with the offline ones
  nano    perf/throughput.py's `nano` workload (nano-vllm's bench.py); --num-prompts caps it

    python -m engine.serve --model qwen3-ckpt &
    python perf/serve_bench.py --dataset random --input-len 1024 --output-len 128 --num-prompts 200 \\
        --request-rate 4 --ignore-eos --goodput ttft:200 tpot:20 --result-json results/rate4.json
    python perf/serve_bench.py --endpoint /v1/chat/completions --max-concurrency 1 --num-prompts 20

Chat prompts are text: the token ids are turned into text with --tokenizer, or the server's
/detokenize, before the clock starts; the chat template then adds a few tokens (prompt lengths come
from the server's usage).

The client is aiohttp, as in vLLM's benchmark: at 256 streams on the H100 host, an httpx client's
one thread was 93% busy over the run (client CPU seconds over the duration, in the summary), so it,
not the server, set the pace; aiohttp takes about half the CPU per streamed chunk (CPU, loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import msgspec
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf.bench_metrics import (  # noqa: E402
    METRIC_NAMES,
    METRICS,
    PERCENTILES,
    ChunkClock,
    RequestResult,
    arrival_offsets,
    parse_goodput,
    summarize,
)

CHAT_ENDPOINT = "/v1/chat/completions"


class SetupError(RuntimeError):
    """A call made before the clock starts (/v1/models, /detokenize) failed."""


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


# ---- datasets ---------------------------------------------------------------------------------------


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int) -> list[BenchRequest]:
    """vLLM's random dataset: lengths uniform in [L(1-r), L(1+r)], token ids uniform in the vocabulary."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=num)

    input_lens, output_lens = lengths(input_len), lengths(output_len)
    return [
        BenchRequest(rng.integers(0, vocab_size, size=int(n_in)).tolist(), int(n_in), int(n_out))
        for n_in, n_out in zip(input_lens, output_lens)
    ]


def make_requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                               args.vocab_size, args.seed)
    from perf.throughput import fixed_workload, nano_workload  # imports torch: only for these two

    if args.dataset == "fixed":
        prompts, max_tokens = fixed_workload(args.num_prompts, args.input_len, args.output_len, vocab=args.vocab_size)
    else:
        prompts, max_tokens = nano_workload()
        if max(max(p) for p in prompts) >= args.vocab_size:
            raise ValueError(f"the nano workload has token ids up to 10000, over --vocab-size {args.vocab_size}")
    return [BenchRequest(p, len(p), m) for p, m in zip(prompts[: args.num_prompts], max_tokens[: args.num_prompts])]


async def prompts_as_text(client: Client, requests: list[BenchRequest], tokenizer: str | None) -> None:
    """Chat takes text: decode each prompt with the local tokenizer, or ask the server's /detokenize."""
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        for r in requests:
            r.prompt = tok.decode(r.prompt)
        return
    for r in requests:
        async with client.session.post(client.url("/detokenize"), json={"tokens": r.prompt}) as response:
            if response.status != 200:
                text = await response.text()
                raise SetupError(f"/detokenize answered {response.status}: {text[:300]} (pass --tokenizer)")
            r.prompt = (await response.json())["prompt"]


# ---- one streamed request ---------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # completions
    delta: _Delta | None = None  # chat
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    """The fields of a streamed chunk the benchmark reads; the rest is skipped unparsed."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict | str | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _carries_content(choice: _Choice) -> bool:
    # A chat stream opens with a role-only delta sent before any token exists: not a token.
    text = choice.text if choice.delta is None else choice.delta.content
    return bool(text) or choice.finish_reason is not None


def request_body(args: argparse.Namespace, request: BenchRequest) -> dict:
    body = {"model": args.model, "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == CHAT_ENDPOINT:
        body["messages"] = [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = request.output_len
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = request.output_len
    body["temperature"] = args.temperature
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; only sent when asked for
    return body


_JSON_HEADERS = {"Content-Type": "application/json"}


async def send_request(client: Client, endpoint: str, body: bytes, prompt_len: int) -> RequestResult:
    """Stream one request (its JSON body encoded before the clock: at 256 requests sent at once the
    client's own encoding delayed the later sends); the result's times are from the moment it was sent."""
    result = RequestResult(prompt_len=prompt_len)
    sent_at = time.perf_counter()
    clock = ChunkClock(result, sent_at)
    chunks_with_content = 0
    usage = None
    try:
        async with client.session.post(client.url(endpoint), data=body, headers=_JSON_HEADERS) as response:
            if response.status != 200:
                text = await response.text()
                result.error = f"HTTP {response.status}: {text[:300]}"
                return result
            done = False
            async for line in response.content:  # server-sent events: one "data: ..." line each
                if done or not line.startswith(b"data:"):
                    continue  # read to the end of the body: aiohttp reuses a connection only then
                now = time.perf_counter()
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                chunk = _decode_chunk(data)
                if chunk.error is not None:
                    result.error = f"error event: {json.dumps(chunk.error)[:300]}"
                    return result
                if any(_carries_content(c) for c in chunk.choices):
                    clock.chunk(now)
                    chunks_with_content += 1
                if chunk.usage is not None:
                    usage = chunk.usage
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # msgspec.DecodeError is a ValueError
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if not clock.started:
        result.error = "the stream ended without any content"
        return result
    if usage is not None:
        result.output_tokens, result.prompt_len = usage.completion_tokens, usage.prompt_tokens or prompt_len
    else:
        result.output_tokens = chunks_with_content  # a server without include_usage: one token per chunk
    result.success = True
    return result


# ---- the run ----------------------------------------------------------------------------------------


def _raise_open_file_limit() -> None:
    """One socket per request in flight: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Client:
    """One aiohttp session for the whole run, and the server's base URL."""

    session: aiohttp.ClientSession
    base_url: str

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


def http_client(args: argparse.Namespace) -> Client:
    # No connection cap beyond --max-concurrency (0: none; aiohttp's default is 100): a client-side
    # queue would count as server latency.
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=args.timeout)
    # read_bufsize: a streamed line (a chunk with logprobs) may be long; aiohttp refuses lines over it
    session = aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout, read_bufsize=1 << 20)
    return Client(session, args.base_url)


async def resolve_model(client: Client, model: str | None) -> str:
    """The model to ask for: `model`, or the first the server lists. Asked before the clock even when
    `model` is given, so the first timed request finds its connection open: a fresh client's first
    connection cost ~25 ms of the first request's TTFT on a CPU (loopback), nothing of the server's."""
    try:
        async with client.session.get(client.url("/v1/models")) as response:
            response.raise_for_status()
            served = [m["id"] for m in (await response.json())["data"]]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
        if model is None:
            raise SetupError(f"/v1/models failed ({exc}): pass --model") from exc
        return model  # a server without the listing: the requests will tell
    if model is None:
        if not served:
            raise SetupError("the server lists no models at /v1/models: pass --model")
        return served[0]
    if model not in served:
        print(f"warning: --model {model!r} is not among the models the server lists ({', '.join(served)})",
              file=sys.stderr)
    return model


async def run_benchmark(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[list[RequestResult], float, float]:
    """Send every request on the arrival schedule (at most --max-concurrency at once); returns the
    results in request order, the run's duration in seconds and the CPU seconds this process used in it
    (its event loop is one Python thread: near the duration, the client itself set the pace)."""
    offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(requests), desc="requests", disable=args.disable_tqdm, dynamic_ncols=True)
    client = http_client(args)
    async with client.session:
        args.model = await resolve_model(client, args.model)
        if args.endpoint == CHAT_ENDPOINT:
            await prompts_as_text(client, requests, args.tokenizer)
        bodies = [msgspec.json.encode(request_body(args, r)) for r in requests]
        for _ in range(args.num_warmups if requests else 0):  # as vLLM's benchmark: the first request, untimed, uncounted
            warmup = await send_request(client, args.endpoint, bodies[0], requests[0].prompt_len)
            if not warmup.success:
                raise SetupError(f"the warm-up request failed ({warmup.error}); check the benchmark's arguments, "
                                 "or pass --num-warmups 0 to count such failures in the run")
        start, cpu_start = time.perf_counter(), time.process_time()

        async def one(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            if limit is None:
                result = await send_one(i)
            else:
                async with limit:
                    result = await send_one(i)
            bar.update(1)
            return result

        async def send_one(i: int) -> RequestResult:
            sent = time.perf_counter() - start
            result = await send_request(client, args.endpoint, bodies[i], requests[i].prompt_len)
            result.start = sent
            return result

        results = await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    bar.close()
    return list(results), duration, cpu


# ---- reporting --------------------------------------------------------------------------------------


def _rate_label(rate: float) -> str | float:
    return "inf" if math.isinf(rate) else rate


def result_record(args: argparse.Namespace, results: list[RequestResult], duration: float, slos: dict,
                  client_cpu_s: float | None = None) -> dict:
    """The JSON for machines: the setup, the summary under vLLM's names, and per-request arrays."""
    errors = [r.error for r in results]
    return {
        "tool": "serve_bench",
        "date": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "label": args.label,
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": args.model,
        "dataset": args.dataset,
        "num_prompts": len(results),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "request_rate": _rate_label(args.request_rate),
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "num_warmups": args.num_warmups,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "goodput_slos_ms": slos or None,
        **summarize(results, duration, slos),
        "client_cpu_s": client_cpu_s,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "start_times": [r.start for r in results],
        "ttfts": [r.ttft for r in results],
        "e2els": [r.latency for r in results],
        "itls": [r.itl for r in results],
        "errors": errors if any(errors) else [],
    }


def format_table(record: dict) -> str:
    def row(name: str, value) -> str:
        if value is None:
            text = "-"
        elif isinstance(value, float):
            text = f"{value:.2f}"
        else:
            text = str(value)
        return f"{name:<40} {text:<10}"

    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        row("Successful requests:", record["completed"]),
        row("Failed requests:", record["failed"]),
        row("Request rate (req/s):", record["request_rate"]),
        row("Maximum request concurrency:", record["max_concurrency"]),
        row("Benchmark duration (s):", record["duration"]),
        row("Total input tokens:", record["total_input_tokens"]),
        row("Total generated tokens:", record["total_output_tokens"]),
        row("Request throughput (req/s):", record["request_throughput"]),
    ]
    if record["goodput_slos_ms"]:
        lines.append(row("Request goodput (req/s):", record["request_goodput"]))
    lines += [
        row("Output token throughput (tok/s):", record["output_throughput"]),
        row("Total Token throughput (tok/s):", record["total_token_throughput"]),
    ]
    if record.get("client_cpu_s") is not None and record["duration"]:
        # Not in vLLM's table: this client's CPU time over the run (its event loop is one thread: near 100%,
        # it, not the server, set the pace)
        lines.append(row("Client CPU busy (%):", 100 * record["client_cpu_s"] / record["duration"]))
    for metric in METRICS:
        lines.append("{s:{c}^{n}}".format(s=METRIC_NAMES[metric], n=50, c="-"))
        short = metric.upper()
        lines.append(row(f"Mean {short} (ms):", record[f"mean_{metric}_ms"]))
        lines.append(row(f"Median {short} (ms):", record[f"median_{metric}_ms"]))
        lines.append(row(f"Std {short} (ms):", record[f"std_{metric}_ms"]))
        for p in PERCENTILES:
            lines.append(row(f"P{p} {short} (ms):", record[f"p{p}_{metric}_ms"]))
    lines.append("=" * 50)
    distinct = list(dict.fromkeys(e for e in record["errors"] if e))
    lines += [f"error: {error}" for error in distinct[:3]]
    if len(distinct) > 3:
        lines.append(f"... and {len(distinct) - 3} more distinct errors")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1 (default: %(default)s)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", CHAT_ENDPOINT])
    p.add_argument("--model", default=None, help="the served model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset", choices=["random", "fixed", "nano"], default="random")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths vary by this fraction either way")
    p.add_argument("--vocab-size", type=int, default=10000,
                   help="token ids are drawn from [0, this); the default fits every real tokenizer (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="chat only: decode prompts locally instead of via /detokenize")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, or inf to send all at once (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals: 1 is Poisson, lower is burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length (vLLM's ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0, help="sent with every request (default: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random dataset and the arrival times")
    p.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:200 tpot:20 e2el:5000 (milliseconds)")
    p.add_argument("--num-warmups", type=int, default=1,
                   help="send the first request this many times before the clock starts, not counted: the client's "
                        "first connection and the server's first-request costs stay out of the numbers (default: 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for any one read (default: %(default)s)")
    p.add_argument("--label", default=None, help="a name for this run in plots")
    p.add_argument("--result-json", default=None, help="write the results here")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        slos = parse_goodput(args.goodput)
        requests = make_requests(args)
        arrival_offsets(0, args.request_rate, args.burstiness)  # validates both
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if args.num_warmups < 0:
        parser.error("--num-warmups must be non-negative")
    _raise_open_file_limit()
    try:
        results, duration, client_cpu_s = asyncio.run(run_benchmark(args, requests))
    except (aiohttp.ClientError, asyncio.TimeoutError, SetupError) as exc:  # the calls before the clock starts
        sys.exit(f"serve_bench: {args.base_url}: {type(exc).__name__}: {exc}")
    record = result_record(args, results, duration, slos, client_cpu_s)
    print(format_table(record))
    if args.result_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.result_json)), exist_ok=True)
        with open(args.result_json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["completed"] else 1)
