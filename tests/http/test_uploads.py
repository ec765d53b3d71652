"""Reading a part's Content-Disposition: the one-match path gives what aiohttp's parser gives."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from hypothesis import given, settings
from hypothesis import strategies as st

from batching_server.http import uploads


def aiohttp_reading(header: str | None) -> tuple[str | None, str | None]:
    _, params = parse_content_disposition(header)
    return content_disposition_filename(params, "name"), content_disposition_filename(
        params, "filename"
    )


def outcome(read: Callable[[str | None], Any], header: str | None) -> Any:
    # aiohttp warns about malformed headers (the tests turn warnings into errors), and some
    # it cannot read at all: content_disposition_filename raises ValueError on name*0="'".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read(header)
        except ValueError as exc:
            return type(exc)


def both_readings(header: str | None) -> tuple[Any, Any]:
    return outcome(uploads._field_and_filename, header), outcome(aiohttp_reading, header)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('form-data; name="file"; filename="photo.jpg"', ("file", "photo.jpg")),
        ('form-data; name="file"', ("file", None)),
        ('Form-Data; NAME="file"; FileName="Caf\u00e9 1.JPG"', ("file", "Caf\u00e9 1.JPG")),
        (' form-data ;name="file" ;  filename=""  ', ("file", "")),
    ],
)
def test_the_usual_headers_are_read_in_one_match(
    header: str, expected: tuple[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str | None] = []
    monkeypatch.setattr(uploads, "parse_content_disposition", calls.append)
    assert uploads._field_and_filename(header) == expected
    assert calls == []
    monkeypatch.undo()
    assert aiohttp_reading(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        'form-data; name="file"; filename="/etc/passwd"',  # aiohttp strips the leading '/'
        'form-data; name="file"; filename="\\\\server\\share.jpg"',
        'form-data; name="file"; filename="a\\"b.jpg"',
        'form-data; name="file"; filename="a;b.jpg"',
        "form-data; name=\"file\"; filename*=UTF-8''caf%C3%A9.jpg",
        'form-data; name="file"; filename="x.jpg"; filename*=UTF-8\'\'y.jpg',
        'form-data; name="file"; filename*0="a"; filename*1="b.jpg"',
        "form-data; name=file; filename=x.jpg",
        'form-data; filename="x.jpg"; name="file"',
        'form-data; name="file"; size=3',
        'attachment; name="file"; filename="x.jpg"',
        'form-data; name="file"; name="other"',
        'form-data; name ="file"',
    ],
)
def test_other_headers_are_read_as_aiohttp_reads_them(header: str | None) -> None:
    ours, theirs = both_readings(header)
    assert ours == theirs


_VALUE_CHARS = st.sampled_from(
    ['"', "\\", "/", ";", "'", "%", "=", " ", "\t", "*", "a", "Z", "\u00e9"]
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    lead=st.sampled_from(["", " ", "\t"]),
    disposition=st.sampled_from(["form-data", "FORM-DATA", "attachment", "form-data "]),
    keys=st.lists(
        st.sampled_from(["name", "NAME", "filename", "filename*", "name*0", "x"]), max_size=3
    ),
    values=st.lists(st.text(_VALUE_CHARS, max_size=6), min_size=3, max_size=3),
    quoted=st.lists(st.booleans(), min_size=3, max_size=3),
    separator=st.sampled_from([";", "; ", " ; ", ";;"]),
)
def test_any_header_is_read_as_aiohttp_reads_it(
    lead: str,
    disposition: str,
    keys: list[str],
    values: list[str],
    quoted: list[bool],
    separator: str,
) -> None:
    params = [
        f'{key}="{value}"' if quote else f"{key}={value}"
        for key, value, quote in zip(keys, values, quoted, strict=False)
    ]
    header = lead + separator.join([disposition, *params])
    ours, theirs = both_readings(header)
    assert ours == theirs
