"""Routes that declare their policy where they are defined: public or protected, traced or not.

Authentication, tracing and the endpoint list on ``/`` all read the policy from here, so a new
route cannot be forgotten by any of them. A route is protected unless it says it is public,
and a request that matches no route (a 404 or 405) is treated as protected too: with
``auth.api_keys`` set, nothing about the server is told to a caller without a key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import AbstractRoute

__all__ = ["ROUTES", "ErrorStyle", "Route", "RouteTable", "add_routes", "route_of"]

ErrorStyle = Literal["native", "oip"]
"""How a route's errors look: ours (type, message, request id) or the Open Inference Protocol's."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One endpoint and its policy."""

    method: str
    path: str
    handler: Handler
    summary: str  # one line for the endpoint list on ``/``
    public: bool = False  # reachable without an API key when ``auth.api_keys`` is set
    traced: bool = True  # gets a server span (probes and scrapes would only add noise)
    errors: ErrorStyle = "native"  # the shape of its error bodies

    @property
    def name(self) -> str:
        """``METHOD /path``, as the endpoint list shows it."""
        return f"{self.method} {self.path}"


class RouteTable:
    """Collects ``Route``s through decorators, as ``web.RouteTableDef`` does."""

    def __init__(self) -> None:
        self._routes: list[Route] = []

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def route(
        self,
        method: str,
        *paths: str,
        summary: str,
        public: bool = False,
        traced: bool = True,
        errors: ErrorStyle = "native",
    ) -> Callable[[Handler], Handler]:
        """Declare ``method`` on each of ``paths`` with one policy; protected and traced
        unless told."""

        def register(handler: Handler) -> Handler:
            for path in paths:
                self._routes.append(
                    Route(
                        method=method,
                        path=path,
                        handler=handler,
                        summary=summary,
                        public=public,
                        traced=traced,
                        errors=errors,
                    )
                )
            return handler

        return register

    def get(
        self,
        *paths: str,
        summary: str,
        public: bool = False,
        traced: bool = True,
        errors: ErrorStyle = "native",
    ) -> Callable[[Handler], Handler]:
        """Declare a GET route (no implicit HEAD)."""
        return self.route(
            "GET", *paths, summary=summary, public=public, traced=traced, errors=errors
        )

    def post(
        self,
        *paths: str,
        summary: str,
        public: bool = False,
        traced: bool = True,
        errors: ErrorStyle = "native",
    ) -> Callable[[Handler], Handler]:
        """Declare a POST route."""
        return self.route(
            "POST", *paths, summary=summary, public=public, traced=traced, errors=errors
        )


ROUTES = web.AppKey("routes", dict[AbstractRoute, Route])
"""Every route of an app, by aiohttp's route object: what ``route_of`` reads."""


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    """Register ``routes`` on ``app`` and remember their policies."""
    table = app.setdefault(ROUTES, {})
    for route in routes:
        # Keyed by aiohttp's route, not the handler: one handler may serve several routes.
        table[app.router.add_route(route.method, route.path, route.handler)] = route


def route_of(request: web.Request) -> Route | None:
    """The declared route that ``request`` matched, or None (no match, or undeclared)."""
    table = request.app.get(ROUTES)
    if table is None:
        return None
    return table.get(request.match_info.route)
