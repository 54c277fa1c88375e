"""The OpenAI-compatible HTTP API: a Starlette app over `AsyncLLMEngine`.

One HTTP request becomes one engine request per prompt (n completions each, sampled by the engine).
Outputs are cumulative; streamed responses send what changed since the last event, as server-sent
events ending with `data: [DONE]`. A client that goes away, streaming or not, cancels the handler,
which aborts its engine requests and frees their KV blocks at once.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 bad input (msgspec's
message for wrong types, the engine's ValueError for bad values), 401 wrong API key, 404 unknown model
or path, 413 body over the limit, 503 not ready / shutting down / overloaded, 500 anything else (that
request only).

This module builds the app: its routes, the API-key check, loading and shutting down the engine, and
the small endpoints. The generating endpoints are `api.completions` and `api.chat`, over what they
share in `api.generation` and `api.logprobs`; the server's state and body decoding are `api.server`,
errors `api.errors`, streaming and disconnects `api.streaming`, JSON and SSE encoding `api.encoding`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
from typing import AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.chat import chat_prompt, create_chat_completion
from api.completions import create_completion
from api.encoding import json_response
from api.errors import APIError, as_api_error, http_exception
from api.metrics import ServerMetrics
from api.protocol import DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse
from api.server import Server, read_json
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineArgs

logger = logging.getLogger("api")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# Paths a probe or a metrics scraper must reach without the API key.
OPEN_PATHS = frozenset({"/health", "/metrics"})


def _server(request: Request) -> Server:
    return request.app.state.server


def _endpoint(handler: Callable[[Request, Server], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, _server(request))
        except Exception as exc:
            return as_api_error(exc).response()

    endpoint.__name__ = handler.__name__
    return endpoint


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


# ---- the small endpoints ----------------------------------------------------------------------------


async def health(request: Request, server: Server) -> Response:
    server.ready_engine().check_health()  # 503 once the engine can serve no more, even while idle
    return Response(b'{"status":"ok"}', media_type="application/json")


async def version(request: Request, server: Server) -> Response:
    return json_response({"version": importlib.metadata.version("engine")})


async def metrics(request: Request, server: Server) -> Response:
    # Scrapes go on while draining; only a server with no engine yet has nothing to report.
    if server.engine is None:
        server.ready_engine()  # raises the 503: loading, or failed to load
    return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request, server: Server) -> Response:
    engine = server.ready_engine()
    card = ModelCard(server.served_model_name, server.created, engine.model_config.model, engine.max_model_len)
    return json_response(ModelList([card]))


async def tokenize(request: Request, server: Server) -> Response:
    req = await read_json(request, TokenizeRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    # Off the event loop: a long prompt takes seconds to render and tokenize.
    if req.messages is not None:
        prompt = await asyncio.to_thread(chat_prompt, server, engine.tokenizer, req)
        tokens = prompt["prompt_token_ids"]
    else:
        tokens = await asyncio.to_thread(engine.tokenizer.encode, req.prompt,
                                         add_special_tokens=req.add_special_tokens is not False)
    return json_response(TokenizeResponse(len(tokens), engine.max_model_len, tokens))


async def detokenize(request: Request, server: Server) -> Response:
    req = await read_json(request, DetokenizeRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    vocab = len(engine.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
    return json_response(DetokenizeResponse(engine.tokenizer.decode(req.tokens)))


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
    server = Server(served_model_name, chat_template, max_body_bytes, ServerMetrics(lambda: server.engine.get_stats()))
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
                    exception_handlers={HTTPException: http_exception})
    app.state.server = server
    return app


async def _load(server: Server, args: EngineArgs) -> None:
    try:
        server.attach(await asyncio.to_thread(AsyncLLMEngine.from_engine_args, args))
    except Exception as exc:
        logger.exception("loading the model failed")
        server.load_error = f"{type(exc).__name__}: {exc}"


def begin_shutdown(app: Starlette) -> None:
    """Stop taking requests and abort those in flight (their clients get 503 or an error event).
    Call on the app's event loop; `engine.serve` does on SIGINT/SIGTERM."""
    app.state.server.begin_shutdown()
