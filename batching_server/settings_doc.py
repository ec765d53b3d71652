"""Render ``docs/settings.md`` and ``settings.toml`` from the settings dataclasses, or check them.

The dataclasses in ``settings.py`` are the single source: each field's metadata carries its
one-line doc, its longer details and its allowed values. ``python -m
batching_server.settings_doc`` writes both files; ``--check`` exits 1 when either is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .settings import CROSS_KEY_RULES, ENV_PREFIX, Settings

__all__ = [
    "MARKDOWN_PATH",
    "README_KEYS",
    "README_PATH",
    "ROOT",
    "TOML_PATH",
    "env_var",
    "main",
    "render_markdown",
    "render_readme_table",
    "render_toml",
    "rendered",
    "stale_files",
    "toml_value",
    "write_files",
]

# The repository root: the parent of the package directory.
ROOT = Path(__file__).resolve().parent.parent
MARKDOWN_PATH = Path("docs/settings.md")
TOML_PATH = Path("settings.toml")
README_PATH = Path("README.md")
WIDTH = 100
# The settings a new user reaches for first: README's short table shows these, between its
# settings markers; docs/settings.md has the rest.
README_KEYS = (
    "server.host",
    "server.port",
    "model.name",
    "model.weights",
    "model.device",
    "model.compile",
    "model.precision",
    "batching.max_batch_size",
    "batching.max_wait_ms",
    "batching.max_queue_size",
    "batching.request_timeout_s",
    "limits.max_upload_bytes",
    "auth.api_keys",
    "metrics.port",
    "tracing.exporter",
)
_README_START = "<!-- settings:start -->"
_README_END = "<!-- settings:end -->"

Sections = Mapping[str, type[Any]]

_GENERATED = (
    "Generated from batching_server/settings.py by `make docs` "
    "(`python -m batching_server.settings_doc`); edit the code, not this file."
)


def _default_sections() -> dict[str, type[Any]]:
    defaults = Settings()
    return {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(Settings)}


def env_var(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{ENV_PREFIX}_{section.upper()}__{key.upper()}"


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value (tuples become arrays)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_char(char: str) -> str:
    # TOML basic strings take no raw control characters, quote or backslash.
    if char in '"\\':
        return "\\" + char
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\u{ord(char):04X}"
    return char


def _paragraphs(text: str) -> list[str]:
    # Blank lines separate paragraphs; other line breaks are only source layout.
    blocks = (" ".join(block.split()) for block in text.replace("``", "`").split("\n\n"))
    return [block for block in blocks if block]


def _section_doc(cls: type[Any]) -> str:
    return " ".join(_paragraphs(inspect.getdoc(cls) or "")[:1])


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _rules_for(key: str) -> list[str]:
    return [rule.rule for rule in CROSS_KEY_RULES if key in rule.keys]


# Markdown


def _md_text(text: str) -> str:
    # Outside code spans a "<" would open an HTML tag and hide the text after it.
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|")


def _md_paragraph(text: str) -> str:
    return textwrap.fill(
        _md_text(text), width=WIDTH, break_long_words=False, break_on_hyphens=False
    )


def _md_item(marker: str, text: str) -> str:
    return textwrap.fill(
        _md_text(text),
        width=WIDTH,
        initial_indent=marker,
        subsequent_indent=" " * len(marker),
        break_long_words=False,
        break_on_hyphens=False,
    )


def render_markdown(sections: Sections | None = None) -> str:
    """The whole ``docs/settings.md``: where settings come from, the rules, one table a section."""
    sections = _default_sections() if sections is None else sections
    example = env_var("batching", "max_batch_size")
    out = [
        "# Settings",
        "",
        f"<!-- {_GENERATED} -->",
        "",
        _md_paragraph(
            "Every key is optional: a missing key takes its default, so the server runs with no "
            "settings file at all. Values come from these sources, each overriding the ones "
            "before it:"
        ),
        "",
        _md_item("1. ", "the defaults below;"),
        _md_item(
            "2. ",
            "a TOML file: `--settings PATH`, or `./settings.toml` when it exists and no path is "
            "given (the repository's `settings.toml` lists every key with its default);",
        ),
        _md_item(
            "3. ",
            f"environment variables `{ENV_PREFIX}_<SECTION>__<KEY>`, whose values are parsed as "
            f"TOML, such as `{example}=16` or `{env_var('auth', 'api_keys')}='[\"...\"]'`;",
        ),
        _md_item(
            "4. ", "the command line's `--host` and `--port`, for `server.host` and `server.port`."
        ),
        "",
        _md_paragraph(
            "Section and key names are case-insensitive. Every value is validated at start-up, "
            "and validation collects every problem before it fails, unknown sections and keys "
            "included, so that a typo cannot fall back to a default unnoticed: the server lists "
            "them all and exits with status 2, and a bad configuration is fixed in one pass."
        ),
        "",
        "## Rules between keys",
        "",
        _md_paragraph("Besides each key's allowed values, validation enforces:"),
        "",
        *(_md_item("- ", rule.rule) for rule in CROSS_KEY_RULES),
    ]
    for name, cls in sections.items():
        out += ["", f"## `[{name}]`", "", _md_paragraph(_section_doc(cls)), ""]
        out += [
            "| key | default | allowed values | environment variable | description |",
            "| --- | --- | --- | --- | --- |",
        ]
        detailed = []
        for f in dataclasses.fields(cls):
            cells = [
                f"`{name}.{f.name}`",
                f"`{toml_value(f.default)}`",
                f.metadata["allowed"],
                f"`{env_var(name, f.name)}`",
                " ".join(_paragraphs(f.metadata["doc"])),
            ]
            out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
            if _paragraphs(f.metadata["details"]):
                detailed.append(f)
        for f in detailed:
            out += ["", f"### `{name}.{f.name}`"]
            for paragraph in _paragraphs(f.metadata["details"]):
                out += ["", _md_paragraph(paragraph)]
    return "\n".join(out) + "\n"


# TOML


def _comment(text: str) -> list[str]:
    # Backticks are Markdown; in a comment they would only be noise.
    return textwrap.wrap(
        text.replace("`", ""),
        width=WIDTH,
        initial_indent="# ",
        subsequent_indent="# ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def render_toml(sections: Sections | None = None) -> str:
    """The whole commented ``settings.toml``: every key with its default, uncommented."""
    sections = _default_sections() if sections is None else sections
    out = [
        "# batching_server settings: every key, set to its default.",
        *_comment(_GENERATED),
        "#",
        *_comment(
            "Every key is optional: a missing key takes its default. Any key can be overridden "
            f"by an environment variable {ENV_PREFIX}_<SECTION>__<KEY>, parsed as TOML, for "
            "example:"
        ),
        f"#   {env_var('batching', 'max_batch_size')}=16",
        f"#   {env_var('model', 'weights')}=random",
        *_comment(
            "A bad value stops the server at start-up (exit status 2) with a list of every problem."
        ),
    ]
    for name, cls in sections.items():
        out += ["", "", *_comment(_sentence(_section_doc(cls))), f"[{name}]"]
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            first, *rest = [
                _sentence(" ".join(_paragraphs(f.metadata["doc"]))),
                *_paragraphs(f.metadata["details"]),
            ]
            if rest:  # the doc line and the first details paragraph read as one
                first, rest = f"{first} {rest[0]}", rest[1:]
            out += ["", *_comment(first)]
            for paragraph in rest:
                out += ["#", *_comment(paragraph)]
            out += _comment(f"Allowed: {_sentence(f.metadata['allowed'])}")
            out += [line for rule in _rules_for(key) for line in _comment(f"Rule: {rule}")]
            out += _comment(f"Environment: {env_var(name, f.name)}")
            out.append(f"{f.name} = {toml_value(f.default)}")
    return "\n".join(out) + "\n"


def render_readme_table(sections: Sections | None = None) -> str:
    """README's short table of the most-used settings (``README_KEYS``)."""
    sections = sections or _default_sections()
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for dotted in README_KEYS:
        section, key = dotted.split(".")
        field = next(f for f in dataclasses.fields(sections[section]) if f.name == key)
        default = field.default if field.default is not dataclasses.MISSING else None
        doc = _md_cell(_md_text(field.metadata["doc"]))
        lines.append(f"| `{dotted}` | `{toml_value(default)}` | {doc} |")
    return "\n".join(lines) + "\n"


def _with_readme_table(readme: str, table: str) -> str | None:
    """``readme`` with its settings block replaced by ``table``; None without the markers."""
    start, end = readme.find(_README_START), readme.find(_README_END)
    if start < 0 or end < start:
        return None
    return readme[: start + len(_README_START)] + "\n" + table + readme[end:]


def _readme_update(root: Path, sections: Sections | None) -> tuple[Path, str, str] | None:
    """README's path, its text now, and its text with the table rendered (None: no block)."""
    path = root / README_PATH
    if not path.is_file():
        return None
    current = path.read_text(encoding="utf-8")
    updated = _with_readme_table(current, render_readme_table(sections))
    return None if updated is None else (path, current, updated)


# Files


def rendered(sections: Sections | None = None) -> dict[Path, str]:
    """Each generated file's path, relative to the repository root, and its text."""
    return {MARKDOWN_PATH: render_markdown(sections), TOML_PATH: render_toml(sections)}


def write_files(root: Path = ROOT, sections: Sections | None = None) -> list[Path]:
    """Write the generated files under ``root``; returns the paths that changed."""
    changed = []
    for relative, text in rendered(sections).items():
        path = root / relative
        data = text.encode("utf-8")
        if path.is_file() and path.read_bytes() == data:
            continue  # untouched, so its modification time still means something
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        changed.append(relative)
    readme = _readme_update(root, sections)
    if readme is not None and readme[1] != readme[2]:
        readme[0].write_text(readme[2], encoding="utf-8")
        changed.append(README_PATH)
    return changed


def stale_files(root: Path = ROOT, sections: Sections | None = None) -> list[Path]:
    """The generated files under ``root`` that are missing or differ from their rendering.

    README counts when its settings block differs (a README without the block is left alone).
    """
    stale = [
        relative
        for relative, text in rendered(sections).items()
        if not (root / relative).is_file() or (root / relative).read_bytes() != text.encode("utf-8")
    ]
    readme = _readme_update(root, sections)
    if readme is not None and readme[1] != readme[2]:
        stale.append(README_PATH)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Write the settings docs (the default) or, with ``--check``, report stale ones."""
    parser = argparse.ArgumentParser(
        prog="python -m batching_server.settings_doc",
        description="Generate docs/settings.md and settings.toml from batching_server/settings.py.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write both files (the default)")
    mode.add_argument(
        "--check", action="store_true", help="exit 1, naming them, if either file is stale"
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="repository root (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if not args.check:
        write_files(args.root)
        return 0
    stale = stale_files(args.root)
    for relative in stale:
        print(f"{relative} is stale: run `make docs`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
