"""Bodies on the wire: JSON responses and server-sent events, encoded with one msgspec encoder."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()

SSE_DONE = b"data: [DONE]\n\n"


def json_response(body: Any, status_code: int = 200) -> Response:
    """`body` (a msgspec Struct or plain data) as an application/json response."""
    return Response(_encoder.encode(body), status_code=status_code, media_type="application/json")


def sse(body: msgspec.Struct) -> bytes:
    """`body` as one server-sent event."""
    return b"data: " + _encoder.encode(body) + b"\n\n"
