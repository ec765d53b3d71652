"""Read a Prometheus text exposition back, as the tests need it."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["Samples", "parse_metrics", "scrape", "value"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Samples:
    """Samples of a text exposition, keyed by name and label set."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = frozenset(_LABEL.findall(match.group(3) or ""))
            samples[(match.group(1), labels)] = float(match.group(4))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``."""
    return samples[(name, frozenset(labels.items()))]


async def scrape(client: Any) -> Samples:
    """GET /metrics through a test client and parse it."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    return parse_metrics(await response.text())
