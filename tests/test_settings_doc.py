"""docs/settings.md and settings.toml are rendered from the settings dataclasses, and current."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batching_server.settings import CROSS_KEY_RULES, BatchingSettings, Settings, load_settings
from batching_server.settings_doc import (
    MARKDOWN_PATH,
    README_PATH,
    ROOT,
    TOML_PATH,
    env_var,
    main,
    render_markdown,
    render_readme_table,
    render_toml,
    stale_files,
    toml_value,
    write_files,
)

REPO = Path(__file__).resolve().parent.parent
SECTIONS: dict[str, type[Any]] = {
    f.name: type(getattr(Settings(), f.name)) for f in dataclasses.fields(Settings)
}
RENDERERS = [
    pytest.param(MARKDOWN_PATH, render_markdown, id="markdown"),
    pytest.param(TOML_PATH, render_toml, id="toml"),
]

Render = Callable[..., str]


def flat(text: str) -> str:
    """``text`` without line breaks, comment marks or code quotes, to find wrapped prose in."""
    return " ".join(text.replace("`", "").replace("\n#", "\n").split())


def with_changed_field(cls: type[Any], name: str, **changes: Any) -> type[Any]:
    """A copy of section ``cls`` whose field ``name`` has another default or metadata."""
    fields = []
    for f in dataclasses.fields(cls):
        default, metadata = f.default, dict(f.metadata)
        if f.name == name:
            default = changes.pop("default", default)
            metadata.update(changes)
        fields.append((f.name, f.type, dataclasses.field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass(
        cls.__name__, fields, namespace={"__doc__": cls.__doc__}, frozen=True, kw_only=True
    )


def test_paths_are_relative_to_the_repository_root() -> None:
    assert ROOT == REPO
    assert (ROOT / "batching_server" / "settings_doc.py").is_file()


@pytest.mark.parametrize(("relative", "render"), RENDERERS)
def test_committed_file_is_what_the_code_renders(relative: Path, render: Render) -> None:
    committed = (REPO / relative).read_text(encoding="utf-8")
    assert committed == render(), (
        f"{relative} differs from batching_server/settings.py: run `make docs` and commit it"
    )


@pytest.mark.parametrize(("relative", "render"), RENDERERS)
def test_every_field_appears_with_its_env_var(relative: Path, render: Render) -> None:
    text = flat(render())
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert env_var(section, f.name) in text, f"{section}.{f.name} missing from {relative}"
            assert flat(f.metadata["doc"]) in text
            assert flat(f.metadata["details"]) in text
    for rule in CROSS_KEY_RULES:
        assert flat(rule.rule) in text


def test_markdown_has_a_row_per_field() -> None:
    text = render_markdown()
    for section, cls in SECTIONS.items():
        assert f"## `[{section}]`" in text
        for f in dataclasses.fields(cls):
            row = f"| `{section}.{f.name}` | `{toml_value(f.default)}` |"
            assert row in text


def test_toml_sets_every_key_to_its_default() -> None:
    parsed = tomllib.loads(render_toml())
    for section, cls in SECTIONS.items():
        defaults = cls()
        assert set(parsed[section]) == {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            expected = list(value) if isinstance(value, tuple) else value
            assert parsed[section][f.name] == expected


def test_env_var_names_match_what_the_loader_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BATCHING_SERVER") or name.endswith("_FOR_DYNACONF"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(env_var("batching", "max_wait_ms"), "2.5")
    assert load_settings().batching.max_wait_ms == 2.5


@pytest.mark.parametrize(
    "value",
    ["", "plain", 'quote " and \\ backslash', "line\nbreak\ttab\x7f", "ünïcode", 0, -3, 2.5, True],
)
def test_toml_value_round_trips(value: Any) -> None:
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value
    assert tomllib.loads(f"v = {toml_value((value, value))}")["v"] == [value, value]


@pytest.mark.parametrize(("relative", "render"), RENDERERS)
def test_a_changed_default_changes_the_render(relative: Path, render: Render) -> None:
    changed = {
        **SECTIONS,
        "batching": with_changed_field(BatchingSettings, "max_wait_ms", default=12.5),
    }
    text = render(changed)
    assert text != render()
    assert "12.5" in text
    assert "12.5" not in render()
    if relative == TOML_PATH:
        assert tomllib.loads(text)["batching"]["max_wait_ms"] == 12.5


@pytest.mark.parametrize(("relative", "render"), RENDERERS)
def test_a_changed_doc_changes_the_render(relative: Path, render: Render) -> None:
    doc = "Longest wait, reworded to prove the check can fail"
    changed = {**SECTIONS, "batching": with_changed_field(BatchingSettings, "max_wait_ms", doc=doc)}
    assert doc in render(changed)
    assert doc not in render()


def test_check_names_each_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = ["--root", str(tmp_path)]
    assert main(["--check", *root]) == 1  # nothing written yet
    assert set(capsys.readouterr().err.split()) >= {str(MARKDOWN_PATH), str(TOML_PATH)}

    assert main(root) == 0  # --write is the default, and quiet
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / MARKDOWN_PATH).read_text(encoding="utf-8") == render_markdown()
    assert (tmp_path / TOML_PATH).read_text(encoding="utf-8") == render_toml()
    assert main(["--check", *root]) == 0
    assert capsys.readouterr() == ("", "")

    markdown = tmp_path / MARKDOWN_PATH
    markdown.write_text(markdown.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert main(["--check", *root]) == 1
    err = capsys.readouterr().err
    assert str(MARKDOWN_PATH) in err
    assert str(TOML_PATH) not in err
    assert "make docs" in err

    assert main(["--write", *root]) == 0
    assert main(["--check", *root]) == 0


def test_a_changed_field_makes_both_files_stale(tmp_path: Path) -> None:
    assert main(["--root", str(tmp_path)]) == 0
    assert stale_files(tmp_path) == []
    changed = {
        **SECTIONS,
        "batching": with_changed_field(BatchingSettings, "max_wait_ms", default=12.5),
    }
    assert stale_files(tmp_path, changed) == [MARKDOWN_PATH, TOML_PATH]


def test_command_line_check_exits_1_on_a_stale_file(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "batching_server.settings_doc", "--root", str(tmp_path)]
    assert subprocess.run(command, check=False, capture_output=True).returncode == 0
    (tmp_path / TOML_PATH).write_text("[server]\n", encoding="utf-8")
    done = subprocess.run([*command, "--check"], check=False, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stdout == ""
    assert str(TOML_PATH) in done.stderr


# --- README's short table -------------------------------------------------------------------


def test_readmes_settings_table_is_what_the_code_renders() -> None:
    readme = (REPO / README_PATH).read_text(encoding="utf-8")
    assert render_readme_table() in readme, "README's settings table is stale: run `make docs`"
    assert README_PATH not in stale_files(REPO)


def test_a_changed_default_makes_readmes_table_stale(tmp_path: Path) -> None:
    write_files(tmp_path)
    (tmp_path / README_PATH).write_text(
        "# title\n\n<!-- settings:start -->\n<!-- settings:end -->\n\nmore\n", encoding="utf-8"
    )
    assert stale_files(tmp_path) == [README_PATH]
    write_files(tmp_path)
    assert stale_files(tmp_path) == []
    text = (tmp_path / README_PATH).read_text(encoding="utf-8")
    assert text.startswith("# title\n\n<!-- settings:start -->\n| key |")
    assert text.endswith("<!-- settings:end -->\n\nmore\n")
    changed = {
        **SECTIONS,
        "batching": with_changed_field(BatchingSettings, "max_batch_size", default=12),
    }
    assert "| `batching.max_batch_size` | `12` |" in render_readme_table(changed)
    assert stale_files(tmp_path, changed) == [MARKDOWN_PATH, TOML_PATH, README_PATH]


def test_a_readme_without_the_markers_is_left_alone(tmp_path: Path) -> None:
    write_files(tmp_path)
    (tmp_path / README_PATH).write_text("# no table here\n", encoding="utf-8")
    assert stale_files(tmp_path) == []
    write_files(tmp_path)
    assert (tmp_path / README_PATH).read_text(encoding="utf-8") == "# no table here\n"
