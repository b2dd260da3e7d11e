"""Errors the HTTP server answers with, in OpenAI's shape.

Every failure a client can cause or meet is an :class:`APIError`: an HTTP status and the body OpenAI's
API returns, ``{"error": {"message", "type", "param", "code"}}``, so that OpenAI's client libraries raise
their usual exceptions (``BadRequestError`` for 400, ``AuthenticationError`` for 401, ``NotFoundError``
for 404, ``RateLimitError`` for 429, ``InternalServerError`` for 5xx). ``param`` names the offending field
of the request as a path (``messages[0].content[1].image_url.url``).
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import ValidationError

__all__ = ["APIError", "bad_request", "field_path", "from_validation_error"]

#: OpenAI's error ``type`` for each status this server answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server answers with an error: ``status`` (HTTP), ``message`` (for people),
    ``param`` (the request field at fault, or None) and ``code`` (a stable token, or None)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 error about ``param``."""
    return APIError(400, message, param=param, code=code)


def field_path(loc: Sequence[str | int], prefix: str = "") -> str:
    """A location in a request body as people write it: ``("messages", 0, "content")`` →
    ``messages[0].content`` (appended to ``prefix``, itself such a path)."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(err: ValidationError, prefix: str = "") -> APIError:
    """pydantic's first complaint about a request body → a 400 naming the field at fault."""
    first = err.errors(include_url=False)[0]
    param = field_path(first["loc"], prefix) or None
    message = first["msg"] if first["type"] != "missing" else "this field is required"
    return bad_request(f"{param}: {message}" if param else message, param)
