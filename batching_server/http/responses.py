"""JSON responses (orjson) and the one error body shape every endpoint uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from .routes import ErrorStyle

__all__ = ["error_response", "json_response"]


def json_response(
    payload: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A response whose body is ``payload`` serialised by orjson."""
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    *,
    status: int,
    error_type: str,
    message: str,
    request_id: str,
    headers: Mapping[str, str] | None = None,
    style: ErrorStyle = "native",
) -> web.Response:
    """``{"error": {"type", "message"}, "request_id"}`` with ``status``; in the Open
    Inference Protocol's style, ``{"error": message}`` (the id is in ``X-Request-ID``)."""
    # A message may quote the client's own bytes (a filename), which aiohttp keeps as
    # surrogates when they are not UTF-8; orjson refuses those, so they are spelled out.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body: dict[str, Any]
    if style == "oip":
        body = {"error": message}
    else:
        body = {"error": {"type": error_type, "message": message}, "request_id": request_id}
    return json_response(body, status=status, headers=headers)
