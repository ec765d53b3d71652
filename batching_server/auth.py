"""Optional bearer-token authentication for ``/predict`` (``auth.api_keys``)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .errors import UnauthorizedError

__all__ = ["bearer_auth_middleware"]


def bearer_auth_middleware(api_keys: Iterable[str], protected_paths: Iterable[str]) -> Middleware:
    """Require ``Authorization: Bearer <key>`` with one of ``api_keys`` on ``protected_paths``."""
    keys = [key.encode() for key in api_keys]
    protected = frozenset(protected_paths)

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in protected:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            presented = token.strip().encode()
            # Compare against every key, each in constant time, so neither the match nor
            # its position leaks through timing.
            matches = [hmac.compare_digest(presented, key) for key in keys]
            if scheme.lower() != "bearer" or not any(matches):
                raise UnauthorizedError("a valid 'Authorization: Bearer <api key>' is required")
        return await handler(request)

    return bearer_auth
