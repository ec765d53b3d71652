"""``CompileCache``: compiled forward passes on disk, one checked entry per key.

An entry is a folder holding one artifact and a manifest (the key's fields and the artifact's
SHA-256). It is built in a temporary folder beside it and renamed into place, so a process
that starts while another builds sees either no entry or a whole one; a build killed midway
leaves only its staging folder, never read, and removed by a later build once a day old. An
entry whose manifest names another key (stale) or whose artifact does not match its checksum
or does not load (corrupt) is logged and rebuilt, never used.

It knows nothing of torch: the caller says what the key is, how to build an artifact and how
to load one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import structlog

__all__ = [
    "ARTIFACT",
    "BUILD_LOCK",
    "FORMAT",
    "LEFTOVER_AGE_S",
    "MANIFEST",
    "CacheEntryError",
    "CompileCache",
    "Lookup",
    "default_cache_dir",
    "file_digest",
    "key_digest",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Bumped whenever what the code builds changes (export options, inductor config): older
# entries then read as stale and are rebuilt.
FORMAT = 1
MANIFEST = "manifest.json"
ARTIFACT = "model.pt2"
_CHUNK = 1 << 20
# A build's staging folder (tempfile.mkdtemp's suffix), or an entry moved aside to be replaced.
_LEFTOVER = re.compile(r"\..+-[0-9a-f]{24}\.(?:old-[0-9a-f]{8}|[a-z0-9_]{8})")
# A process killed mid-build (a server stopped while it compiled in the background) leaves
# its staging folder; one this old cannot belong to a build still running, in any process.
LEFTOVER_AGE_S = 24 * 3600
# The file builds lock, in the cache folder (it stays: removing it could let two builds in).
BUILD_LOCK = ".build.lock"


class CacheEntryError(Exception):
    """An entry is unusable (stale, corrupt or unloadable); the message says which and why."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/batching_server/compiled``, else ``~/.cache/batching_server/compiled``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batching_server" / "compiled"


def key_digest(key: Mapping[str, str]) -> str:
    """A stable SHA-256 of the key's fields (order does not matter)."""
    blob = json.dumps({"format": FORMAT, **key}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Lookup(Generic[T]):
    """What ``CompileCache.get`` found: the loaded artifact, and whether it had to be built."""

    value: T
    built: bool
    path: Path


def _open(artifact: Path, load: Callable[[Path], T]) -> T:
    try:
        return load(artifact)
    except Exception as exc:  # whatever the loader raises, the entry is unusable
        raise CacheEntryError(f"corrupt: {ARTIFACT} does not load ({exc})") from exc


class CompileCache:
    """Entries under ``root``, each named ``<label>-<digest of the key>``."""

    def __init__(self, *, root: Path) -> None:
        self.root = root

    def entry_path(self, label: str, key: Mapping[str, str]) -> Path:
        """Where the entry for ``key`` lives (``label`` only makes the folder readable)."""
        return self.root / f"{label}-{key_digest(key)[:24]}"

    def get(
        self,
        label: str,
        key: Mapping[str, str],
        *,
        build: Callable[[Path], None],
        load: Callable[[Path], T],
        allow_build: bool = True,
    ) -> Lookup[T] | None:
        """The loaded artifact for ``key``: from its entry, else built (``build(path)`` writes
        the artifact at ``path``), stored and loaded. None when there is no usable entry and
        ``allow_build`` is false."""
        entry = self.entry_path(label, key)
        seen = _stamp(entry)
        found = self._cached(entry, key, load)
        if found is not None or not allow_build:
            return found
        with self._build_lock(entry):
            # Another process (a worker, a `compile`) may have built it while this one waited.
            if _stamp(entry) != seen and (found := self._cached(entry, key, load)) is not None:
                return found
            self._build(entry, key, build)
        # Just written and checksummed by this process, under the lock: loaded, not re-read.
        return Lookup(_open(entry / ARTIFACT, load), built=True, path=entry)

    def _cached(
        self, entry: Path, key: Mapping[str, str], load: Callable[[Path], T]
    ) -> Lookup[T] | None:
        """The entry loaded, or None when it is missing or unusable (logged)."""
        if not entry.exists():
            return None
        try:
            return Lookup(self._load(entry, key, load), built=False, path=entry)
        except CacheEntryError as exc:
            log.warning("compile_cache_entry_rejected", entry=str(entry), problem=str(exc))
            return None

    @contextlib.contextmanager
    def _build_lock(self, entry: Path) -> Iterator[None]:
        """One build at a time per cache folder, across processes: several workers starting
        together build each graph once, the others load it. The kernel drops the lock of a
        process that dies, so a killed build never blocks the next."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / BUILD_LOCK).open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("compile_cache_waiting", entry=str(entry), reason="another build runs")
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _load(self, entry: Path, key: Mapping[str, str], load: Callable[[Path], T]) -> T:
        manifest = read_manifest(entry)
        wanted = {"format": str(FORMAT), **key}
        if manifest.get("key") != wanted:
            stored = manifest.get("key")
            changed = sorted(
                name
                for name in set(wanted) | set(stored if isinstance(stored, dict) else {})
                if not isinstance(stored, dict) or stored.get(name) != wanted.get(name)
            )
            raise CacheEntryError(f"stale: its key differs in {', '.join(changed)}")
        artifact = entry / ARTIFACT
        try:
            digest = file_digest(artifact)
        except OSError as exc:
            raise CacheEntryError(f"corrupt: cannot read {ARTIFACT} ({exc})") from exc
        if digest != manifest.get("sha256"):
            raise CacheEntryError(f"corrupt: {ARTIFACT} does not match its checksum")
        return _open(artifact, load)

    def _build(self, entry: Path, key: Mapping[str, str], build: Callable[[Path], None]) -> None:
        self._remove_leftovers()  # the root exists: _build_lock made it
        # Beside the entry, so the rename that publishes it stays on one file system.
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.root))
        try:
            started = time.perf_counter()
            build(staging / ARTIFACT)
            manifest = {
                "key": {"format": str(FORMAT), **key},
                "sha256": file_digest(staging / ARTIFACT),
                "bytes": (staging / ARTIFACT).stat().st_size,
                "build_seconds": round(time.perf_counter() - started, 3),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            _publish(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Remove what builds killed midway left behind; never loaded, but it takes space."""
        # File times are wall-clock times: so is the age they are compared with.
        oldest = time.time() - LEFTOVER_AGE_S
        for path in self.root.iterdir():
            if not _LEFTOVER.fullmatch(path.name):
                continue
            try:
                if path.stat().st_mtime >= oldest:
                    continue
            except FileNotFoundError:  # another process removed it first
                continue
            log.info("compile_cache_leftover_removed", path=str(path))
            shutil.rmtree(path, ignore_errors=True)


def read_manifest(entry: Path) -> dict[str, object]:
    """An entry's manifest; raises ``CacheEntryError`` when it is missing or unreadable."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CacheEntryError(f"corrupt: unreadable {MANIFEST} ({exc})") from exc
    if not isinstance(manifest, dict):
        raise CacheEntryError(f"corrupt: {MANIFEST} is not an object")
    return manifest


def _stamp(entry: Path) -> tuple[int, int] | None:
    """Which version of ``entry`` is on disk (None: none): publishing replaces the folder."""
    try:
        stat = entry.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _publish(staging: Path, entry: Path) -> None:
    """Rename the built folder into place, replacing a rejected entry."""
    try:
        staging.rename(entry)
        return
    except OSError:
        pass  # an entry is there: the rejected one, or one another process just published
    # Moved aside first, then removed: a process still reading the old entry keeps its open
    # files, and nobody ever sees the folder half deleted.
    aside = entry.with_name(f".{entry.name}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):  # another process moved it already
        entry.rename(aside)
    try:
        staging.rename(entry)
    except OSError:
        # A third process published meanwhile: its entry is as good as ours.
        log.info("compile_cache_entry_published_by_another_process", entry=str(entry))
    shutil.rmtree(aside, ignore_errors=True)
