"""HTTP/1.1 over a plain loopback socket, for requests a client library would refuse to send."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["WAIT_S", "RawConnection", "RawResponse", "exchange", "request_head"]

# Bounds every wait in these helpers, so a server that never answers fails the test instead
# of hanging it (a bound, not a measurement: nothing asserts on how long anything took).
WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class RawResponse:
    """A parsed response: status, headers (names lower-cased) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def request_head(
    method: str, target: str, headers: Iterable[tuple[str | bytes, str | bytes]] = ()
) -> bytes:
    """The request line and headers, and the blank line that ends them; bytes pass as sent."""
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    for name, value in headers:
        raw_name = name if isinstance(name, bytes) else name.encode("latin-1")
        raw_value = value if isinstance(value, bytes) else value.encode("latin-1")
        lines.append(raw_name + b": " + raw_value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class RawConnection:
    """A socket to the server on 127.0.0.1.

    Reads what the server sent before any reset, as the kernel hands it out: a server that
    closes with part of the request unread resets the connection, after its answer.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int | None) -> RawConnection:
        """Connect to ``port`` (a test server's, which is None only before it starts)."""
        assert port is not None
        sock = socket.socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), WAIT_S)
        return cls(sock)

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False if the server has closed the connection."""
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), WAIT_S)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def _more(self) -> bytes:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), WAIT_S)
        self.buffer += data
        return data

    async def read_response(self) -> RawResponse:
        """One response, framed by its Content-Length."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._more():
                raise ConnectionError(f"closed before a response: {self.buffer[:200]!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            if not await self._more():
                raise ConnectionError("closed in the middle of a response body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(status=int(status_line.split()[1]), headers=headers, body=body)

    async def closed(self) -> bool:
        """Whether the server closes the connection (an end or a reset) before ``WAIT_S``."""
        try:
            while await self._more():
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


async def exchange(port: int | None, request: bytes) -> RawResponse:
    """Send ``request`` on a fresh connection and read the one response."""
    connection = await RawConnection.open(port)
    try:
        await connection.send(request)
        return await connection.read_response()
    finally:
        connection.close()
