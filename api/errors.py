"""Errors in OpenAI's body `{"error": {"message", "type", "param", "code"}}`: `APIError`, the mapping
of any exception a request raises onto one (`as_api_error`), and Starlette's own 404 / 405 in the
same shape."""

from __future__ import annotations

import logging
import re

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from api.encoding import json_response
from api.protocol import ErrorInfo, ErrorResponse
from engine.async_engine import EngineNotRunningError, EngineOverloadedError, EngineStepError, RequestAbortedError

logger = logging.getLogger("api")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.code))

    def response(self) -> Response:
        return json_response(self.body(), status_code=self.status)


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
    if isinstance(exc, ClientDisconnect):  # gone while its body was being read: nobody to answer
        return APIError(499, "the client disconnected", code="client_disconnected")
    if isinstance(exc, EngineStepError):  # the step loop logged it once, with its traceback
        return APIError(500, str(exc), type="server_error")
    logger.error("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


async def http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 / 405, in OpenAI's error body."""
    code = "not_found" if exc.status_code == 404 else None
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()
