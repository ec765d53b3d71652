"""What the supervisor and a worker say to each other, one line at a time, on a socket pair.

A worker says ``ready`` once it is warmed up. The supervisor says whether the whole fleet
is ready (``fleet ready``) or not, and why (``fleet wait <reason>``), since any worker may
be the one asked ``/ready``. End of file means the other side is gone.
"""

from __future__ import annotations

__all__ = ["READY", "fleet_message", "parse_fleet_message"]

READY = b"ready\n"


def fleet_message(*, ready: bool, reason: str) -> bytes:
    """The supervisor's line about the fleet."""
    if ready:
        return b"fleet ready\n"
    return b"fleet wait " + reason.replace("\n", " ").encode() + b"\n"


def parse_fleet_message(line: bytes) -> tuple[bool, str] | None:
    """``(ready, reason)`` from a supervisor's line, or None for a line it does not know."""
    text = line.decode(errors="replace").rstrip("\n")
    if text == "fleet ready":
        return True, "ready"
    if text.startswith("fleet wait "):
        return False, text.removeprefix("fleet wait ")
    return None
