"""What completions and chat share between an HTTP request and the engine: the sampling parameters
a request asks for, its engine requests (one per prompt) merged into one stream, the cursor of what
each choice has been sent so far, and the usage they add up to."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from api.errors import APIError
from api.metrics import ServerMetrics
from api.protocol import PromptTokensDetails, SamplingRequest, Usage
from api.server import Server
from engine.async_engine import AsyncLLMEngine, RequestStream
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger("api")

# Prompts up to this many characters are tokenized on the event loop (well under a millisecond, less
# than a hop to a worker thread); longer ones in a worker thread, so a huge one holds up no one.
INLINE_TOKENIZE_CHARS = 8192

# ---- sampling parameters ----------------------------------------------------------------------------

_OPTIONAL_SAMPLING_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty")


def refuse_unsupported(req: SamplingRequest) -> None:
    """A 400 naming a field we do not implement, rather than an answer that silently ignores it."""
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (use n)", param="best_of")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise APIError(400, "structured output is not supported: response_format must be {\"type\": \"text\"}",
                       param="response_format")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if getattr(req, name) is not None:
            raise APIError(400, f"structured output is not supported: {name} cannot be honoured", param=name)
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix is not supported", param="suffix")
    if getattr(req, "tools", None) and req.tool_choice != "none":
        raise APIError(400, "tool calling is not supported; send no tools, or tool_choice \"none\"", param="tools")


def sampling_params(req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    refuse_unsupported(req)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    kwargs = {name: getattr(req, name) for name in _OPTIONAL_SAMPLING_FIELDS if getattr(req, name) is not None}
    if req.top_k is not None:
        kwargs["top_k"] = -1 if req.top_k == 0 else req.top_k  # vLLM's API takes 0 or -1 for "disabled"
    if req.logit_bias:
        try:
            kwargs["logit_bias"] = {int(token): bias for token, bias in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    return SamplingParams(
        n=req.n, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, max_tokens=max_tokens, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, **kwargs,
    )


def truncated(prompt, req: SamplingRequest, tokenizer, max_model_len: int):
    """vLLM's truncate_prompt_tokens: a tokenized prompt ({"prompt", "prompt_token_ids"} or token
    ids) cut to its last k tokens (k = -1: max_model_len); the text of a cut one decoded from what is left."""
    k = req.truncate_prompt_tokens
    if k is None:
        return prompt
    if k == -1:
        k = max_model_len
    if k < 1:
        raise APIError(400, f"truncate_prompt_tokens must be at least 1, or -1 for max_model_len; got {k}",
                       param="truncate_prompt_tokens")
    if isinstance(prompt, dict) and len(prompt["prompt_token_ids"]) > k:
        ids = prompt["prompt_token_ids"][-k:]
        return {"prompt": tokenizer.decode(ids), "prompt_token_ids": ids}
    if isinstance(prompt, list) and len(prompt) > k:
        return prompt[-k:]
    return prompt


def include_usage(req: SamplingRequest) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


def continuous_usage(req: SamplingRequest) -> bool:
    """vLLM's stream_options.continuous_usage_stats (with include_usage): the usage so far in every chunk."""
    return include_usage(req) and req.stream_options.continuous_usage_stats


# ---- engine requests behind one HTTP request ----------------------------------------------------------


class Generation:
    """The engine requests of one HTTP request (one per prompt); their outputs merged into one
    stream of (prompt index, output). `close()` (sync, so safe under cancellation) aborts the
    unfinished ones and records how each ended."""

    def __init__(self, streams: list[RequestStream], metrics: ServerMetrics):
        self.streams = streams
        self.trackers = [metrics.tracker() for _ in streams]

    @classmethod
    async def start(cls, server: Server, engine: AsyncLLMEngine, request_id: str,
                    prompts: list, params: SamplingParams) -> "Generation":
        """Add every prompt; if the engine refuses any, abort the others and raise its error."""
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        now = time.time()
        streams: list[RequestStream] = []
        try:
            for rid, prompt in zip(ids, prompts):
                streams.append(engine.submit(rid, prompt, params, arrival_time=now))
            for stream in streams:
                await stream.accepted()
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        # With the engine's per-step lines (debug too), a request's timeline: accepted, steps, first output.
        logger.debug("%s: %d prompt(s) accepted by the engine in %.2f ms", request_id, len(prompts), 1e3 * (time.time() - now))
        return cls(streams, server.metrics)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self.streams) == 1:  # the common case, without a task per output
            first = logger.isEnabledFor(logging.DEBUG)
            async for output in self.streams[0]:
                if first:
                    logger.debug("%s: first output", output.request_id)
                    first = False
                self.trackers[0].observe(output)
                yield 0, output
            return
        pending = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(self.streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    try:
                        output = task.result()
                    except StopAsyncIteration:
                        continue
                    self.trackers[i].observe(output)
                    pending[asyncio.ensure_future(anext(self.streams[i]))] = i
                    yield i, output
        finally:
            for task in pending:
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: no "exception never retrieved" warning

    async def final_outputs(self) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(self.streams)
        async for i, output in self.outputs():
            finals[i] = output
        return finals  # type: ignore[return-value]

    def close(self) -> None:
        for stream, tracker in zip(self.streams, self.trackers):
            stream.abort()
            tracker.end()


def usage(finals: Iterable[RequestOutput | None], generated: bool = True) -> Usage:
    """Tokens in and out (`generated` False: none out, for an answer that leaves its generated tokens out)."""
    finals = [f for f in finals if f is not None]
    prompt_tokens = sum(len(f.prompt_token_ids) for f in finals)
    completion_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs) if generated else 0
    cached = sum(f.num_cached_tokens for f in finals)
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, PromptTokensDetails(cached))


# ---- what each streamed choice has been sent ----------------------------------------------------------


@dataclass
class Cursor:
    """How much of one choice the client has been sent."""

    text_len: int = 0
    num_tokens: int = 0
    done: bool = False


def new_parts(cursor: Cursor, completion: CompletionOutput, with_tokens: bool) -> tuple[str, slice] | None:
    """What changed in `completion` since the last event: (new text, new tokens' slice), or None if
    nothing worth an event did (new tokens without text count only when logprobs are streamed)."""
    if cursor.done:
        return None
    text = completion.text[cursor.text_len :]
    tokens = slice(cursor.num_tokens, len(completion.token_ids))
    finished = completion.finish_reason is not None
    if not (text or finished or (with_tokens and tokens.stop > tokens.start)):
        return None
    cursor.text_len = max(cursor.text_len, len(completion.text))
    cursor.num_tokens, cursor.done = tokens.stop, finished
    return text, tokens
