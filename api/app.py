"""The OpenAI-compatible HTTP API: a Starlette app over `AsyncLLMEngine`.

One HTTP request becomes one engine request per prompt (n completions each, sampled by the engine).
Outputs are cumulative; streamed responses send what changed since the last event, as server-sent
events ending with `data: [DONE]`. A client that goes away, streaming or not, cancels the handler,
which aborts its engine requests and frees their KV blocks at once.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 bad input (msgspec's
message for wrong types, the engine's ValueError for bad values), 401 wrong API key, 404 unknown model
or path, 413 body over the limit, 503 not ready / shutting down / overloaded, 500 anything else (that
request only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterable, TypeVar

import jinja2
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.metrics import ServerMetrics
from api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatMessageParam,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
)
from engine.async_engine import (
    AsyncLLMEngine,
    EngineNotRunningError,
    EngineOverloadedError,
    RequestAbortedError,
    RequestStream,
)
from engine.config import EngineArgs
from engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger("api")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# Paths a probe or a metrics scraper must reach without the API key.
OPEN_PATHS = frozenset({"/health", "/metrics"})
_encoder = msgspec.json.Encoder()
T = TypeVar("T")


# ---- errors -----------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.code))

    def response(self) -> Response:
        return Response(_encoder.encode(self.body()), status_code=self.status, media_type="application/json")


_FIELD_AT = re.compile(r"at `\$\.(\w+)")


def as_api_error(exc: BaseException) -> APIError:
    """The OpenAI-style error a failed request answers with."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        field = _FIELD_AT.search(str(exc))
        return APIError(400, str(exc), param=field.group(1) if field else None)
    if isinstance(exc, msgspec.DecodeError):
        return APIError(400, f"the request body is not valid JSON: {exc}")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), type="server_error", code="overloaded")
    if isinstance(exc, (EngineNotRunningError, RequestAbortedError)):
        return APIError(503, str(exc), type="server_error", code="unavailable")
    logger.error("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# ---- server state -----------------------------------------------------------------------------------


@dataclass
class _Server:
    served_model_name: str | None
    chat_template: str | None
    max_body_bytes: int
    metrics: ServerMetrics
    engine: AsyncLLMEngine | None = None
    load_error: str | None = None
    draining: bool = False
    created: int = 0

    def ready_engine(self) -> AsyncLLMEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
        if self.engine is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, type="server_error", code="not_ready")
        if not self.engine.is_running:
            raise APIError(503, "the engine's step loop is not running", type="server_error", code="unavailable")
        return self.engine

    def attach(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.served_model_name = self.served_model_name or engine.model_config.model
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{self.served_model_name}`",
                           param="model", code="model_not_found")

    def begin_shutdown(self) -> None:
        """Refuse new requests and end those in flight (each client gets a 503 / error event)."""
        self.draining = True
        if self.engine is not None and self.engine.is_running:
            self.engine.abort_all("the server is shutting down")


def _server(request: Request) -> _Server:
    return request.app.state.server


def _endpoint(handler: Callable[[Request, _Server], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, _server(request))
        except Exception as exc:
            return as_api_error(exc).response()

    endpoint.__name__ = handler.__name__
    return endpoint


async def _read_json(request: Request, body_type: type[T], limit: int) -> T:
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        too_large = too_large or size > limit
        if too_large:
            # Read (and drop) the rest rather than close on an unread body: closing with unread data
            # makes the kernel reset the connection, and the client might never see the 413.
            if size > 16 * limit:
                break
            continue
        chunks.append(chunk)
    if too_large:
        raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    return msgspec.json.decode(b"".join(chunks), type=body_type)


class _APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every path but OPEN_PATHS, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                 type="authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- streaming and disconnects ----------------------------------------------------------------------


def _sse(body: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(body) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


class _EventStream(Response):
    """Server-sent events from an async iterator of encoded events.

    The status line waits for the first event, so an error raised before it (bad input, overload)
    is an ordinary JSON error response; one raised after it is sent as a last `data: {"error": ...}`
    event and the stream ends cleanly. A disconnect cancels the iterator, aborting its requests.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with _cancelled_on_disconnect(receive):
                await self._send_events(scope, receive, send)
        finally:
            await self.events.aclose()

    async def _send_events(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        while True:
            try:
                event = await anext(self.events)
            except StopAsyncIteration:
                break
            except Exception as exc:
                error = as_api_error(exc)
                if not started:
                    await error.response()(scope, receive, send)
                    return
                event = _sse(error.body()) + _SSE_DONE
                await send({"type": "http.response.body", "body": event, "more_body": True})
                break
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                started = True
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@contextlib.asynccontextmanager
async def _cancelled_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancel the block if the client disconnects meanwhile, and then end it quietly; the
    cancellation runs the block's finally clauses, which abort its engine requests."""
    task = asyncio.current_task()
    state = {"inside": True, "gone": False}

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if state["inside"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
    finally:
        state["inside"] = False
        watcher.cancel()


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
    """`work()`'s response, or (if the client went away first, cancelling it) a 499 nobody reads."""
    async with _cancelled_on_disconnect(request.receive):
        return await work()
    return Response(status_code=499)


# ---- engine requests behind one HTTP request ----------------------------------------------------------


class _Generation:
    """The engine requests of one HTTP request (one per prompt); their outputs merged into one
    stream of (prompt index, output). `close()` (sync, so safe under cancellation) aborts the
    unfinished ones and records how each ended."""

    def __init__(self, streams: list[RequestStream], metrics: ServerMetrics):
        self.streams = streams
        self.trackers = [metrics.tracker() for _ in streams]

    @classmethod
    async def start(cls, server: _Server, engine: AsyncLLMEngine, request_id: str,
                    prompts: list, params: SamplingParams) -> "_Generation":
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
        return cls(streams, server.metrics)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
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


def _usage(finals: Iterable[RequestOutput | None]) -> Usage:
    finals = [f for f in finals if f is not None]
    prompt_tokens = sum(len(f.prompt_token_ids) for f in finals)
    completion_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
    cached = sum(f.num_cached_tokens for f in finals)
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, PromptTokensDetails(cached))


@dataclass
class _Cursor:
    """How much of one choice the client has been sent."""

    text_len: int = 0
    num_tokens: int = 0
    done: bool = False


def _new_parts(cursor: _Cursor, completion: CompletionOutput, with_tokens: bool) -> tuple[str, slice] | None:
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


# ---- sampling parameters ----------------------------------------------------------------------------

_OPTIONAL_SAMPLING_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty")


def _sampling_params(req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                     prompt_logprobs: int | None = None) -> SamplingParams:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    kwargs = {name: getattr(req, name) for name in _OPTIONAL_SAMPLING_FIELDS if getattr(req, name) is not None}
    if req.top_k is not None:
        kwargs["top_k"] = -1 if req.top_k == 0 else req.top_k  # vLLM's API takes 0 or -1 for "disabled"
    return SamplingParams(
        n=req.n, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, max_tokens=max_tokens, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, **kwargs,
    )


def _include_usage(req: SamplingRequest) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


# ---- logprobs in OpenAI's shapes --------------------------------------------------------------------


def _token_text(token_id: int, position: PositionLogprobs | None, tokenizer) -> str:
    entry = position.get(token_id) if position else None
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def _completion_logprobs(entries: Iterable[tuple[int, PositionLogprobs | None]], offset: int,
                         tokenizer) -> CompletionLogprobs:
    """Completions' shape: parallel lists; top_logprobs maps token text to logprob (the sampled
    token always included, so up to logprobs + 1 entries)."""
    out = CompletionLogprobs([], [], [], [])
    for token_id, position in entries:
        text = _token_text(token_id, position, tokenizer)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if position is None:  # the first prompt token has nothing before it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(position[token_id].logprob)
        out.top_logprobs.append({_token_text(t, position, tokenizer): lp.logprob for t, lp in position.items()})
    return out


def _chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int, tokenizer) -> ChatLogprobs:
    """Chat's shape: one entry per token with its bytes and the top_k most likely alternatives."""
    content = []
    for token_id, position in zip(token_ids, positions):
        text = _token_text(token_id, position, tokenizer)
        best = sorted(position.items(), key=lambda item: -item[1].logprob)[:top_k]
        top = [TopLogprob(t_text, lp.logprob, list(t_text.encode()))
               for t_text, lp in ((_token_text(t, position, tokenizer), lp) for t, lp in best)]
        content.append(ChatTokenLogprob(text, position[token_id].logprob, list(text.encode()), top))
    return ChatLogprobs(content)


# ---- /v1/completions --------------------------------------------------------------------------------


def _completion_prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if prompt and all(isinstance(p, list) for p in prompt):
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                        "token-id lists, and not empty", param="prompt")


@dataclass
class _CompletionContext:
    req: CompletionRequest
    id: str
    model: str
    created: int
    tokenizer: object
    echo_texts: list[str]  # per prompt; empty strings without echo

    def choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput,
               text: str, tokens: slice, first: bool, text_offset: int = 0) -> CompletionChoice:
        """A choice carrying `text` and the logprobs of `tokens` (their text_offset counted from
        `text_offset`), with the echoed prompt in front of the choice's first part."""
        echo = first and self.req.echo
        logprobs = None
        if self.req.logprobs is not None:
            entries = list(zip(completion.token_ids[tokens], completion.logprobs[tokens]))
            if echo:
                prompt_positions = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
                entries = list(zip(output.prompt_token_ids, prompt_positions)) + entries
            logprobs = _completion_logprobs(entries, text_offset, self.tokenizer)
        if echo:
            text = self.echo_texts[prompt_index] + text
        return CompletionChoice(prompt_index * self.req.n + completion.index, text, logprobs,
                                completion.finish_reason, completion.stop_reason)


async def create_completion(request: Request, server: _Server) -> Response:
    req = await _read_json(request, CompletionRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    prompts = _completion_prompts(req.prompt)
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = _sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs=echo_logprobs)
    tokenizer = engine.tokenizer
    echo_texts = [(p if isinstance(p, str) else tokenizer.decode(p)) if req.echo else "" for p in prompts]
    ctx = _CompletionContext(req, f"cmpl-{uuid.uuid4().hex}", server.served_model_name, int(time.time()),
                             tokenizer, echo_texts)
    if req.stream:
        return _EventStream(_completion_events(server, engine, ctx, prompts, params))
    return await _unless_disconnected(request, lambda: _completion_response(server, engine, ctx, prompts, params))


async def _completion_response(server: _Server, engine: AsyncLLMEngine, ctx: _CompletionContext,
                               prompts: list, params: SamplingParams) -> Response:
    generation = await _Generation.start(server, engine, ctx.id, prompts, params)
    try:
        finals = await generation.final_outputs()
    finally:
        generation.close()
    choices = [
        ctx.choice(i, final, completion, completion.text, slice(0, len(completion.token_ids)), first=True)
        for i, final in enumerate(finals)
        for completion in final.outputs
    ]
    choices.sort(key=lambda c: c.index)
    body = CompletionResponse(ctx.id, ctx.created, ctx.model, choices, _usage(finals))
    return Response(_encoder.encode(body), media_type="application/json")


async def _completion_events(server: _Server, engine: AsyncLLMEngine, ctx: _CompletionContext,
                             prompts: list, params: SamplingParams) -> AsyncIterator[bytes]:
    generation = await _Generation.start(server, engine, ctx.id, prompts, params)
    try:
        cursors = [_Cursor() for _ in range(len(prompts) * params.n)]
        sent_text = [0] * len(cursors)  # characters sent per choice, for logprobs' text_offset
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for i, output in generation.outputs():
            finals[i] = output
            for completion in output.outputs:
                index = i * params.n + completion.index
                first = cursors[index].text_len == 0 and cursors[index].num_tokens == 0
                parts = _new_parts(cursors[index], completion, with_tokens=ctx.req.logprobs is not None)
                if parts is None:
                    continue
                choice = ctx.choice(i, output, completion, *parts, first=first, text_offset=sent_text[index])
                sent_text[index] += len(choice.text)
                yield _sse(CompletionResponse(ctx.id, ctx.created, ctx.model, [choice]))
        if _include_usage(ctx.req):
            yield _sse(CompletionResponse(ctx.id, ctx.created, ctx.model, [], _usage(finals)))
        yield _SSE_DONE
    finally:
        generation.close()


# ---- /v1/chat/completions ---------------------------------------------------------------------------


def _render_chat(server: _Server, tokenizer, messages: list[ChatMessageParam], add_generation_prompt: bool) -> str:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if server.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template (none in its tokenizer files); start the server "
                            "with --chat-template FILE, or use /v1/completions", param="messages")
    conversation = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(part.text for part in content)
        conversation.append({"role": message.role, "content": content or ""}
                            | ({"name": message.name} if message.name else {}))
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=server.chat_template,
                                             add_generation_prompt=add_generation_prompt, tokenize=False)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from exc


async def create_chat_completion(request: Request, server: _Server) -> Response:
    req = await _read_json(request, ChatCompletionRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
    top_logprobs = req.top_logprobs or 0
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling_params(req, max_tokens, top_logprobs if req.logprobs else None)
    text = _render_chat(server, engine.tokenizer, req.messages, req.add_generation_prompt)
    # The template writes the special tokens (BOS, headers) itself.
    prompt = {"prompt": text, "prompt_token_ids": engine.tokenizer.encode(text, add_special_tokens=False)}
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    head = (request_id, int(time.time()), server.served_model_name)
    if req.stream:
        return _EventStream(_chat_events(server, engine, req, head, prompt, params, top_logprobs))
    return await _unless_disconnected(
        request, lambda: _chat_response(server, engine, req, head, prompt, params, top_logprobs))


async def _chat_response(server: _Server, engine: AsyncLLMEngine, req: ChatCompletionRequest, head: tuple,
                         prompt: dict, params: SamplingParams, top_logprobs: int) -> Response:
    generation = await _Generation.start(server, engine, head[0], [prompt], params)
    try:
        [final] = await generation.final_outputs()
    finally:
        generation.close()
    choices = [
        ChatChoice(
            c.index,
            ChatMessage("assistant", c.text),
            _chat_logprobs(c.token_ids, c.logprobs, top_logprobs, engine.tokenizer) if req.logprobs else None,
            c.finish_reason,
            c.stop_reason,
        )
        for c in final.outputs
    ]
    body = ChatCompletionResponse(*head, choices, _usage([final]))
    return Response(_encoder.encode(body), media_type="application/json")


async def _chat_events(server: _Server, engine: AsyncLLMEngine, req: ChatCompletionRequest, head: tuple,
                       prompt: dict, params: SamplingParams, top_logprobs: int) -> AsyncIterator[bytes]:
    generation = await _Generation.start(server, engine, head[0], [prompt], params)
    try:
        for index in range(params.n):
            yield _sse(ChatCompletionChunk(*head, [ChatChunkChoice(index, DeltaMessage(role="assistant", content=""))]))
        cursors = [_Cursor() for _ in range(params.n)]
        final = None
        async for _, final in generation.outputs():
            for c in final.outputs:
                parts = _new_parts(cursors[c.index], c, with_tokens=req.logprobs)
                if parts is None:
                    continue
                text, tokens = parts
                logprobs = None
                if req.logprobs:
                    logprobs = _chat_logprobs(c.token_ids[tokens], c.logprobs[tokens], top_logprobs, engine.tokenizer)
                choice = ChatChunkChoice(c.index, DeltaMessage(content=text), logprobs, c.finish_reason, c.stop_reason)
                yield _sse(ChatCompletionChunk(*head, [choice]))
        if _include_usage(req):
            yield _sse(ChatCompletionChunk(*head, [], _usage([final])))
        yield _SSE_DONE
    finally:
        generation.close()


# ---- the small endpoints ----------------------------------------------------------------------------


async def health(request: Request, server: _Server) -> Response:
    server.ready_engine()
    return Response(b'{"status":"ok"}', media_type="application/json")


async def version(request: Request, server: _Server) -> Response:
    return Response(_encoder.encode({"version": importlib.metadata.version("engine")}),
                    media_type="application/json")


async def metrics(request: Request, server: _Server) -> Response:
    # Scrapes go on while draining; only a server with no engine yet has nothing to report.
    if server.engine is None:
        server.ready_engine()  # raises the 503: loading, or failed to load
    return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request, server: _Server) -> Response:
    engine = server.ready_engine()
    card = ModelCard(server.served_model_name, server.created, engine.model_config.model, engine.max_model_len)
    return Response(_encoder.encode(ModelList([card])), media_type="application/json")


async def tokenize(request: Request, server: _Server) -> Response:
    req = await _read_json(request, TokenizeRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if req.messages is not None:
        text = _render_chat(server, engine.tokenizer, req.messages, req.add_generation_prompt)
        tokens = engine.tokenizer.encode(text, add_special_tokens=False)  # the template wrote them
    else:
        tokens = engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    body = TokenizeResponse(len(tokens), engine.max_model_len, tokens)
    return Response(_encoder.encode(body), media_type="application/json")


async def detokenize(request: Request, server: _Server) -> Response:
    req = await _read_json(request, DetokenizeRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    vocab = len(engine.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
    body = DetokenizeResponse(engine.tokenizer.decode(req.tokens))
    return Response(_encoder.encode(body), media_type="application/json")


# ---- the app ----------------------------------------------------------------------------------------


def build_app(
    engine: EngineArgs | AsyncLLMEngine,
    served_model_name: str | None = None,
    api_key: str | None = None,
    chat_template: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The OpenAI-compatible app. Given EngineArgs, it loads the engine in the background at
    startup (503 until then); given an AsyncLLMEngine, it serves it at once. Either way the app
    owns the engine and shuts it down with itself. `chat_template` is template text; None uses the
    tokenizer's."""
    server = _Server(served_model_name, chat_template, max_body_bytes, ServerMetrics(lambda: server.engine.get_stats()))
    if isinstance(engine, AsyncLLMEngine):
        server.attach(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = None
        if server.engine is None:
            loading = asyncio.create_task(_load(server, engine))
        yield
        server.begin_shutdown()
        if loading is not None and not loading.done():
            loading.cancel()
        if server.engine is not None:
            await asyncio.to_thread(server.engine.shutdown)

    routes = [
        Route("/v1/chat/completions", _endpoint(create_chat_completion), methods=["POST"]),
        Route("/v1/completions", _endpoint(create_completion), methods=["POST"]),
        Route("/v1/models", _endpoint(list_models), methods=["GET"]),
        Route("/health", _endpoint(health), methods=["GET"]),
        Route("/version", _endpoint(version), methods=["GET"]),
        Route("/tokenize", _endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", _endpoint(detokenize), methods=["POST"]),
        Route("/metrics", _endpoint(metrics), methods=["GET"]),
    ]
    middleware = [Middleware(_APIKeyMiddleware, api_key=api_key)] if api_key else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_exception})
    app.state.server = server
    return app


async def _load(server: _Server, args: EngineArgs) -> None:
    try:
        server.attach(await asyncio.to_thread(AsyncLLMEngine.from_engine_args, args))
    except Exception as exc:
        logger.exception("loading the model failed")
        server.load_error = f"{type(exc).__name__}: {exc}"


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 / 405, in OpenAI's error body."""
    code = "not_found" if exc.status_code == 404 else None
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


def begin_shutdown(app: Starlette) -> None:
    """Stop taking requests and abort those in flight (their clients get 503 or an error event).
    Call on the app's event loop; `engine.serve` does on SIGINT/SIGTERM."""
    app.state.server.begin_shutdown()
