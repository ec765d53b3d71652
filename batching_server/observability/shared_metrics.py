"""Metrics of several worker processes, summed into one exposition at scrape time.

A scrape reaches one worker at random, and a worker may die (``kill -9``) between scrapes,
so no worker can be asked for its counts when they are needed. Instead every process writes
each change of its metrics through to memory-mapped files of its own, as prometheus_client's
multiprocess mode does, and whichever worker answers a scrape reads every file in the
directory: counters and histograms of dead processes still count, so the sums never go back
when a worker is replaced. prometheus_client does the file format, the merge and the
exposition (well kept, and the reference design for this); aioprometheus stays each
process's own registry, and these collectors only mirror its updates.

File names follow prometheus_client: ``counter_<id>.db`` and ``histogram_<id>.db`` with an
id unique to one process's life (a replacement must not overwrite its predecessor's
counts), ``gauge_livesum_<id>.db`` and ``gauge_liveall_<id>.db`` with the worker's index
(``mark_process_dead`` removes them when the worker dies).
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

from aioprometheus.collectors import Counter, Gauge, Histogram
from aioprometheus.mypy_types import LabelsType, NumericValueType
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = [
    "MetricFiles",
    "SharedCounter",
    "SharedGauge",
    "SharedHistogram",
    "forget_process",
    "render_fleet",
]

# How a gauge of several processes becomes one value: a total (images queued, requests in
# flight) is summed over the live ones; any other keeps one series per worker.
GaugeMode = Literal["livesum", "liveall"]

# prometheus_client's name for the label it gives per-process gauges; ours says which worker.
_PROCESS_LABEL = "pid"
WORKER_LABEL = "worker"


def _key(metric_name: str, name: str, labels: Mapping[str, object], doc: str) -> str:
    # The key prometheus_client's multiprocess files use (mmap_dict.mmap_key), labels as text.
    labels_text = {str(k): str(v) for k, v in labels.items()}
    return json.dumps([metric_name, name, labels_text, doc], sort_keys=True)


class _Keys:
    """File keys of one sample name, made once per label set: every request updates
    several metrics, and a JSON dump each time would cost the event loop for nothing.
    Label sets are few by design (bounded cardinality), so the cache stays small."""

    def __init__(self, metric_name: str, name: str, doc: str) -> None:
        self._metric_name = metric_name
        self._name = name
        self._doc = doc
        self._keys: dict[tuple[tuple[str, object], ...], str] = {}

    def __call__(self, labels: Mapping[str, object]) -> str:
        identity = tuple(sorted(labels.items()))
        key = self._keys.get(identity)
        if key is None:
            key = self._keys[identity] = _key(self._metric_name, self._name, labels, self._doc)
        return key


class MetricFiles:
    """This process's metric files; every write lands in shared memory at once."""

    def __init__(self, *, directory: str | Path, process_id: str, worker_id: str) -> None:
        for name, value in (("process_id", process_id), ("worker_id", worker_id)):
            if not value or "_" in value or "/" in value:
                # prometheus_client splits file names on "_" to find the kind and the id.
                raise ValueError(f"{name} must be non-empty without '_' or '/', got {value!r}")
        self.directory = Path(directory)
        self._process_id = process_id
        self._worker_id = worker_id
        self._files: dict[str, MmapedDict] = {}

    def _file(self, kind: str) -> MmapedDict:
        dict_ = self._files.get(kind)
        if dict_ is None:
            owner = self._worker_id if kind.startswith("gauge") else self._process_id
            dict_ = MmapedDict(str(self.directory / f"{kind}_{owner}.db"))  # type: ignore[no-untyped-call]
            self._files[kind] = dict_
        return dict_

    def set(self, kind: str, key: str, value: float) -> None:
        """Write ``value`` under ``key`` in this process's ``kind`` file."""
        self._file(kind).write_value(key, float(value), 0.0)  # type: ignore[no-untyped-call]

    def add(self, kind: str, key: str, amount: float) -> None:
        """Add ``amount`` to ``key`` (only this process writes its files: no race)."""
        dict_ = self._file(kind)
        value, _ = dict_.read_value(key)  # type: ignore[no-untyped-call]
        dict_.write_value(key, value + amount, 0.0)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Unmap the files (they stay on disk for the others to read)."""
        for dict_ in self._files.values():
            dict_.close()  # type: ignore[no-untyped-call]
        self._files.clear()


def _number(value: NumericValueType) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"a shared metric holds numbers, got {type(value).__name__}")
    return float(value)


def _go_float(bound: float) -> str:
    # The le label as prometheus_client writes it (1.0, +Inf), so the merge finds its buckets.
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def _counter_family(name: str) -> str:
    # prometheus_client names a counter's family without the _total of its samples.
    return name.removesuffix("_total")


class SharedCounter(Counter):
    """An aioprometheus counter whose every value is also written to ``files``."""

    def __init__(self, name: str, doc: str, *, files: MetricFiles, **kwargs: object) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"a shared counter's name must end in _total, got {name!r}")
        super().__init__(name, doc, **kwargs)  # type: ignore[arg-type]
        self._files = files
        self._keys = _Keys(_counter_family(name), name, doc)

    def set_value(self, labels: LabelsType, value: NumericValueType) -> None:
        super().set_value(labels, value)
        self._files.set("counter", self._keys(labels), _number(value))


class SharedGauge(Gauge):
    """An aioprometheus gauge whose every value is also written to ``files``."""

    def __init__(
        self, name: str, doc: str, *, files: MetricFiles, mode: GaugeMode, **kwargs: object
    ) -> None:
        super().__init__(name, doc, **kwargs)  # type: ignore[arg-type]
        self._files = files
        self._kind = f"gauge_{mode}"
        self._keys = _Keys(name, name, doc)

    def set_value(self, labels: LabelsType, value: NumericValueType) -> None:
        super().set_value(labels, value)
        self._files.set(self._kind, self._keys(labels), _number(value))


class SharedHistogram(Histogram):
    """An aioprometheus histogram whose every observation is also written to ``files``.

    The file holds the count of each bucket alone (not cumulative) and the sum, as
    prometheus_client's merge expects: one observation then writes two values.
    """

    def __init__(self, name: str, doc: str, *, files: MetricFiles, **kwargs: object) -> None:
        super().__init__(name, doc, **kwargs)  # type: ignore[arg-type]
        self._files = files
        self._bounds = [float(bound) for bound in self.upper_bounds]
        if not self._bounds or self._bounds[-1] != float("inf"):
            self._bounds.append(float("inf"))
        self._les = [_go_float(bound) for bound in self._bounds]
        self._bucket_keys = _Keys(name, f"{name}_bucket", doc)
        self._sum_keys = _Keys(name, f"{name}_sum", doc)
        self._series: dict[tuple[tuple[str, object], ...], tuple[list[str], str]] = {}

    def add(self, labels: LabelsType, value: NumericValueType) -> None:
        super().add(labels, value)
        value = _number(value)
        buckets, sum_key = self._series_keys(labels)
        self._files.add("histogram", buckets[bisect.bisect_left(self._bounds, value)], 1)
        self._files.add("histogram", sum_key, value)

    def _series_keys(self, labels: LabelsType) -> tuple[list[str], str]:
        # Per image, on the event loop: a series' bucket and sum keys are made once.
        identity = tuple(sorted(labels.items()))
        keys = self._series.get(identity)
        if keys is None:
            buckets = [self._bucket_keys({**labels, "le": le}) for le in self._les]
            # Every bucket of a new series shows, at zero if need be, as a scraper expects.
            for key in buckets:
                self._files.add("histogram", key, 0)
            keys = self._series[identity] = (buckets, self._sum_keys(labels))
        return keys

    observe = add


def forget_process(directory: str | Path, worker_id: str) -> None:
    """A worker died: drop its gauges (its counters and histograms keep counting)."""
    mark_process_dead(worker_id, str(directory))  # type: ignore[no-untyped-call]


def _with_worker_label(metrics: Iterable[Metric]) -> Iterator[Metric]:
    for metric in metrics:
        metric.samples = [
            Sample(
                sample.name,
                {
                    (WORKER_LABEL if name == _PROCESS_LABEL else name): value
                    for name, value in sample.labels.items()
                },
                sample.value,
            )
            for sample in metric.samples
        ]
        yield metric


class _FleetCollector:
    """prometheus_client's multiprocess merge, with the per-process label named ``worker``."""

    def __init__(self, directory: str | Path) -> None:
        self._directory = str(directory)

    def collect(self) -> Iterator[Metric]:
        files = sorted(glob.glob(os.path.join(self._directory, "*.db")))
        merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return _with_worker_label(merged)


def render_fleet(directory: str | Path) -> bytes:
    """The text exposition of every process's files in ``directory``, merged."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FleetCollector(directory))
    return generate_latest(registry)
