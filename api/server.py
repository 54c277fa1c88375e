"""What every endpoint shares: the server's state (`Server`: the engine once loaded, whether it is
draining, the served model's name) and reading a request body (`read_json`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from starlette.requests import Request

from api.errors import APIError
from api.metrics import ServerMetrics
from engine.async_engine import AsyncLLMEngine

logger = logging.getLogger("api")

T = TypeVar("T")


@dataclass
class Server:
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


async def read_json(request: Request, body_type: type[T], limit: int) -> T:
    logger.debug("%s %s: handler entered", request.method, request.url.path)  # the start of a request's timeline
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
    try:
        return msgspec.json.decode(b"".join(chunks), type=body_type)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
