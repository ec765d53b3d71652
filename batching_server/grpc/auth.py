"""Bearer-token authentication (``auth.api_keys``) for every gRPC method not declared public.

Deny by default, as on HTTP: a method that does not declare itself public, and a method the
service does not have, need ``authorization: Bearer <key>`` metadata.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from ..observability.metrics import ServiceMetrics
from .calls import REQUEST_ID_KEY, Call, metadata_of, record_call, request_id_of

__all__ = ["BearerAuthInterceptor"]

_MESSAGE = "a valid 'authorization: Bearer <api key>' metadata entry is required"


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers UNAUTHENTICATED, before the method runs, to a call without a valid key;
    ``rpcs`` (path to ``Rpc``) says which methods exist and which are public."""

    def __init__(
        self, *, api_keys: Iterable[str], rpcs: Mapping[str, Any], metrics: ServiceMetrics
    ) -> None:
        self._keys = [key.encode() for key in api_keys]
        self._public = frozenset(path for path, rpc in rpcs.items() if rpc.public)
        self._known = frozenset(rpcs)
        self._metrics = metrics

    def _allowed(self, metadata: dict[str, str]) -> bool:
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        presented = token.strip().encode("utf-8", "surrogateescape")
        # Compare against every key, each in constant time, so neither the match nor its
        # position leaks through timing.
        matches = [hmac.compare_digest(presented, key) for key in self._keys]
        return scheme.lower() == "bearer" and any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        """The method's handler when it is public or the key is valid, else one that refuses."""
        path = handler_call_details.method
        metadata = metadata_of(handler_call_details.invocation_metadata)
        if path in self._public or self._allowed(metadata):
            return await continuation(handler_call_details)
        # A method the service lacks is named by the client: counted under one label, as HTTP
        # counts unmatched paths, so that metrics keep a bounded cardinality.
        endpoint = path if path in self._known else "unmatched"
        call = Call(path=endpoint, request_id=request_id_of(metadata))
        started = time.perf_counter()
        metrics = self._metrics

        async def refuse(request: Any, context: Any) -> None:
            record_call(
                metrics,
                call,
                status=401,
                grpc_status=grpc.StatusCode.UNAUTHENTICATED.name,
                seconds=time.perf_counter() - started,
                error_type="unauthorized",
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                _MESSAGE,
                trailing_metadata=((REQUEST_ID_KEY, call.request_id),),
            )

        # Raw bytes in: a refused call's message is never parsed.
        return grpc.unary_unary_rpc_method_handler(refuse)
