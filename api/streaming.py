"""Responses that outlive a client: the server-sent-event stream, and cancelling the work of a
client that disconnects (whose cancellation runs the finally clauses that abort its engine
requests and free their KV blocks at once)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.encoding import SSE_DONE, sse
from api.errors import as_api_error


class EventStream(Response):
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
            async with cancelled_on_disconnect(receive):
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
                event = sse(error.body()) + SSE_DONE
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
async def cancelled_on_disconnect(receive: Receive) -> AsyncIterator[None]:
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


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
    """`work()`'s response, or (if the client went away first, cancelling it) a 499 nobody reads."""
    async with cancelled_on_disconnect(request.receive):
        return await work()
    return Response(status_code=499)
