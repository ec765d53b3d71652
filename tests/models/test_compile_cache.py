"""The compile cache's entries: keyed, checked, published whole; no torch, no compiling."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from batching_server.models.compile_cache import (
    ARTIFACT,
    BUILD_LOCK,
    LEFTOVER_AGE_S,
    MANIFEST,
    CompileCache,
    default_cache_dir,
    key_digest,
)

KEY = {"model": "resnet18", "weights": "random:seed=0", "precision": "fp32", "input": "1x3x8x8"}


class Builder:
    """Writes ``payload`` as the artifact and counts its builds."""

    def __init__(self, payload: bytes = b"compiled code") -> None:
        self.payload = payload
        self.builds = 0

    def __call__(self, path: Path) -> None:
        self.builds += 1
        path.write_bytes(self.payload)


def read(path: Path) -> bytes:
    return path.read_bytes()


def test_a_miss_builds_and_a_hit_loads_without_building(tmp_path: Path) -> None:
    cache = CompileCache(root=tmp_path / "cache")
    build = Builder()
    first = cache.get("b1", KEY, build=build, load=read)
    assert first is not None
    assert (first.value, first.built, build.builds) == (b"compiled code", True, 1)
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["key"] == {"format": "1", **KEY}
    second = cache.get("b1", KEY, build=build, load=read)
    assert second is not None
    assert (second.value, second.built, build.builds) == (b"compiled code", False, 1)
    # Nothing but the entry is left behind: no staging folder.
    names = [p.name for p in (tmp_path / "cache").iterdir() if p.name != BUILD_LOCK]
    assert names == [first.path.name]


@pytest.mark.parametrize(
    "change", [{"precision": "bf16"}, {"weights": "named:IMAGENET1K_V1"}, {"input": "2x3x8x8"}]
)
def test_a_changed_key_is_another_entry(tmp_path: Path, change: dict[str, str]) -> None:
    cache = CompileCache(root=tmp_path)
    build = Builder()
    cache.get("b1", KEY, build=build, load=read)
    other = {**KEY, **change}
    assert key_digest(other) != key_digest(KEY)
    found = cache.get("b1", other, build=build, load=read)
    assert found is not None
    assert found.built
    assert build.builds == 2
    # Both stay: going back to the first settings builds nothing.
    again = cache.get("b1", KEY, build=build, load=read)
    assert again is not None
    assert not again.built
    assert build.builds == 2


def test_with_building_not_allowed_a_miss_is_none(tmp_path: Path) -> None:
    build = Builder()
    found = CompileCache(root=tmp_path).get("b1", KEY, build=build, load=read, allow_build=False)
    assert found is None
    assert build.builds == 0


def entry_of(tmp_path: Path) -> Path:
    cache = CompileCache(root=tmp_path)
    found = cache.get("b1", KEY, build=Builder(b"first build"), load=read)
    assert found is not None
    return found.path


def rebuilt(tmp_path: Path) -> tuple[bytes, list[str]]:
    """Ask again; the value got and the problems logged."""
    build = Builder(b"rebuilt")
    with structlog.testing.capture_logs() as logs:
        found = CompileCache(root=tmp_path).get("b1", KEY, build=build, load=read)
    assert found is not None
    assert found.built
    assert build.builds == 1
    problems = [e["problem"] for e in logs if e["event"] == "compile_cache_entry_rejected"]
    return found.value, problems


def test_a_corrupt_artifact_is_logged_and_rebuilt(tmp_path: Path) -> None:
    entry = entry_of(tmp_path)
    (entry / ARTIFACT).write_bytes(b"first bui1d")  # one byte flipped on disk
    value, problems = rebuilt(tmp_path)
    assert value == b"rebuilt"
    assert problems == [f"corrupt: {ARTIFACT} does not match its checksum"]


def test_a_stale_manifest_is_logged_and_rebuilt(tmp_path: Path) -> None:
    entry = entry_of(tmp_path)
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["key"]["torch"] = "2.0.0"  # written by another torch, say
    (entry / MANIFEST).write_text(json.dumps(manifest))
    value, problems = rebuilt(tmp_path)
    assert value == b"rebuilt"
    assert problems == ["stale: its key differs in torch"]


def test_an_entry_without_its_manifest_is_rebuilt(tmp_path: Path) -> None:
    entry = entry_of(tmp_path)
    (entry / MANIFEST).unlink()  # a copy that stopped halfway, say
    value, problems = rebuilt(tmp_path)
    assert value == b"rebuilt"
    assert len(problems) == 1
    assert problems[0].startswith(f"corrupt: unreadable {MANIFEST}")


def test_an_artifact_that_does_not_load_is_rebuilt(tmp_path: Path) -> None:
    entry_of(tmp_path)
    loads: list[bytes] = []

    def load(path: Path) -> bytes:
        data = path.read_bytes()
        loads.append(data)
        if data == b"first build":
            raise OSError("undefined symbol: an older torch's")
        return data

    with structlog.testing.capture_logs() as logs:
        found = CompileCache(root=tmp_path).get("b1", KEY, build=Builder(b"rebuilt"), load=load)
    assert found is not None
    assert found.value == b"rebuilt"
    assert loads == [b"first build", b"rebuilt"]
    problems = [e["problem"] for e in logs if e["event"] == "compile_cache_entry_rejected"]
    assert problems == [f"corrupt: {ARTIFACT} does not load (undefined symbol: an older torch's)"]


def test_a_build_that_dies_halfway_leaves_no_entry(tmp_path: Path) -> None:
    cache = CompileCache(root=tmp_path)

    def dies(path: Path) -> None:
        path.write_bytes(b"half")
        raise KeyboardInterrupt  # the process stopped mid-build

    with pytest.raises(KeyboardInterrupt):
        cache.get("b1", KEY, build=dies, load=read)
    # Neither an entry nor its staging folder: only the lock builds take.
    assert [p.name for p in tmp_path.iterdir()] == [BUILD_LOCK]
    build = Builder()
    found = cache.get("b1", KEY, build=build, load=read)
    assert found is not None
    assert found.built
    assert found.value == b"compiled code"


def test_a_build_removes_what_killed_builds_left(tmp_path: Path) -> None:
    """A process killed mid-build (no finally ran) leaves its staging folder: never loaded,
    and removed by a later build once too old to be a build still running."""
    cache = CompileCache(root=tmp_path)
    entry = cache.entry_path("b1", KEY)
    stale = tmp_path / f".{entry.name}.k1ll3d_x"  # as tempfile.mkdtemp names it
    recent = tmp_path / f".{entry.name}.runn1ng_"
    aside = tmp_path / f".{entry.name}.old-0123abcd"
    unrelated = tmp_path / ".someone-elses"
    for folder in (stale, recent, aside, unrelated):
        folder.mkdir()
        (folder / ARTIFACT).write_bytes(b"half")
    day_ago = time.time() - LEFTOVER_AGE_S - 60
    for folder in (stale, aside, unrelated):
        os.utime(folder, (day_ago, day_ago))
    # A leftover is never read as the entry: the entry is missing.
    assert cache.get("b1", KEY, build=Builder(), load=read, allow_build=False) is None
    assert stale.exists()
    with structlog.testing.capture_logs() as logs:
        found = cache.get("b2", KEY, build=Builder(), load=read)
    assert found is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [found.path.name, recent.name, unrelated.name, BUILD_LOCK]
    )
    removed = {e["path"] for e in logs if e["event"] == "compile_cache_leftover_removed"}
    assert removed == {str(stale), str(aside)}


def test_a_half_written_entry_is_never_read(tmp_path: Path) -> None:
    """While one process builds, another sees no entry at all, never the builder's partial
    artifact; once published, the entry is whole."""
    cache = CompileCache(root=tmp_path)
    seen: list[object] = []

    def slow_build(path: Path) -> None:
        path.write_bytes(b"half")
        # Another process looks now (a builder would wait for the lock, see the next test):
        # the half-built artifact must be invisible to it.
        seen.append(cache.get("b1", KEY, build=Builder(), load=read, allow_build=False))
        path.write_bytes(b"half and the rest")

    found = cache.get("b1", KEY, build=slow_build, load=read)
    assert seen == [None]
    assert found is not None
    assert found.value == b"half and the rest"
    # One entry, consistent with its manifest, and no staging or old folders left.
    again = cache.get("b1", KEY, build=Builder(), load=read)
    assert again is not None
    assert not again.built
    assert again.value == b"half and the rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([found.path.name, BUILD_LOCK])


def test_the_default_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/x")
    assert default_cache_dir() == Path("/var/cache/x/batching_server/compiled")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path(os.path.expanduser("~/.cache/batching_server/compiled"))


def test_two_builders_of_one_entry_build_it_once(tmp_path: Path) -> None:
    """Workers starting together: the second waits for the first's build, then loads it."""
    root = tmp_path / "cache"
    building, release = threading.Event(), threading.Event()

    def held_build(path: Path) -> None:
        building.set()
        assert release.wait(60)
        path.write_bytes(b"compiled code")

    second_build = Builder()
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = CompileCache(root=root).get("b1", KEY, build=held_build, load=read)

    def second() -> None:
        results["second"] = CompileCache(root=root).get("b1", KEY, build=second_build, load=read)

    with structlog.testing.capture_logs() as logs:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        threads[0].start()
        assert building.wait(60)
        threads[1].start()
        deadline = time.monotonic() + 60
        while not any(e["event"] == "compile_cache_waiting" for e in logs):
            assert time.monotonic() < deadline, "the second builder never waited"
            time.sleep(0.01)  # polling until it blocks on the lock
        release.set()
        for thread in threads:
            thread.join(60)
    assert (results["first"].built, results["second"].built) == (True, False)
    assert results["second"].value == b"compiled code"
    assert second_build.builds == 0
