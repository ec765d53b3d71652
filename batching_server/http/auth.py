"""Bearer-token authentication (``auth.api_keys``) for every route not declared public."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..core.errors import UnauthorizedError
from .routes import route_of

__all__ = ["bearer_auth_middleware"]


def bearer_auth_middleware(api_keys: Iterable[str]) -> Middleware:
    """Require ``Authorization: Bearer <key>`` with one of ``api_keys``, except on public routes.

    Deny by default: a route that does not declare itself public, and a request that matches
    no route, need a key.
    """
    keys = [key.encode() for key in api_keys]

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_of(request)
        if route is None or not route.public:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # aiohttp keeps header bytes that are not UTF-8 as surrogates: encoding them back
            # gives the bytes sent, which match no key, instead of an error (a 500).
            presented = token.strip().encode("utf-8", "surrogateescape")
            # Compare against every key, each in constant time, so neither the match nor
            # its position leaks through timing.
            matches = [hmac.compare_digest(presented, key) for key in keys]
            if scheme.lower() != "bearer" or not any(matches):
                raise UnauthorizedError("a valid 'Authorization: Bearer <api key>' is required")
        return await handler(request)

    return bearer_auth
