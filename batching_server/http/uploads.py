"""Read the ``file`` parts of a multipart/form-data body, within the upload limits."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import BodyPartReader, hdrs, http_exceptions, web
from aiohttp.multipart import (
    BadContentDispositionHeader,
    content_disposition_filename,
    parse_content_disposition,
)

from ..core.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = ["FIELD_NAME", "Upload", "read_uploads"]

FIELD_NAME = "file"
# Bytes asked of a part per read. aiohttp's default (8 KiB) takes several reads for one
# photo, each copying its window to look for the boundary; a read returns what has arrived.
_READ_SIZE = 1 << 18
# What aiohttp's multipart reader raises for a body that breaks the format (found by fuzzing:
# a mangled part header raises InvalidHeader, an HttpProcessingError). A bad
# Content-Disposition is only a warning, unless warnings are errors (as in the tests).
_MALFORMED = (
    ValueError,
    KeyError,
    AssertionError,
    http_exceptions.HttpProcessingError,
    BadContentDispositionHeader,
)


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded file, as bytes; its type is sniffed from them, not from headers."""

    index: int
    filename: str | None
    data: bytes


# A quoted value that aiohttp's parser returns as it stands: no escapes, no ';' (which it
# splits on first) and no leading '/' or '\' (which it strips).
_PLAIN_VALUE = r'"((?:[^"\\;/][^"\\;]*)?)"'
# The header browsers, curl and HTTP libraries send for a file field.
_PLAIN_FORM_DATA = re.compile(
    rf"\s*form-data\s*;\s*name={_PLAIN_VALUE}\s*(?:;\s*filename={_PLAIN_VALUE}\s*)?",
    re.IGNORECASE,
)


def _field_and_filename(header: str | None) -> tuple[str | None, str | None]:
    """A part's field name and filename, from its Content-Disposition header."""
    # aiohttp's parser is costly (it escapes 128 characters into a regex on every call), and
    # its reader has already run it once on this part, looking for a _charset_ field. One
    # match reads the usual header; anything else (escapes, an RFC 5987 filename*, more
    # parameters) goes to aiohttp's parser, so the result is the same.
    if header is not None and (plain := _PLAIN_FORM_DATA.fullmatch(header)):
        return plain[1], plain[2]
    _, params = parse_content_disposition(header)
    return content_disposition_filename(params, "name"), content_disposition_filename(
        params, "filename"
    )


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is over the limit of {limit} bytes (limits.max_upload_bytes)"
    )


async def read_uploads(
    request: web.Request, *, max_upload_bytes: int, max_files: int
) -> AsyncIterator[Upload]:
    """Yield each ``file`` part as soon as it is read, so decoding can start early.

    The byte limit counts the whole streamed body, so a chunked upload with no
    Content-Length is held to it too.
    """
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"expected a multipart/form-data upload with a {FIELD_NAME!r} field, got "
            f"{request.content_type!r}"
        )
    if request.content_length is not None and request.content_length > max_upload_bytes:
        raise _too_large(max_upload_bytes)
    try:
        reader = await request.multipart()
    except _MALFORMED as exc:
        raise BadRequestError(f"malformed multipart body: {type(exc).__name__}") from None
    received = 0
    count = 0
    other_fields: list[str] = []
    while True:
        try:
            part = await reader.next()
        except _MALFORMED as exc:
            raise BadRequestError(f"malformed multipart body: {type(exc).__name__}") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise BadRequestError("nested multipart bodies are not supported")
        try:
            field, filename = _field_and_filename(part.headers.get(hdrs.CONTENT_DISPOSITION))
        except _MALFORMED as exc:  # e.g. aiohttp's ValueError on name*0="'"
            raise BadRequestError(f"malformed Content-Disposition: {type(exc).__name__}") from None
        is_file = field == FIELD_NAME
        if is_file:
            count += 1
            if count > max_files:
                raise BadRequestError(
                    f"more than {max_files} {FIELD_NAME!r} parts in one request "
                    "(limits.max_files_per_request)"
                )
        elif field is not None and len(other_fields) < 8:
            other_fields.append(field)
        chunks = bytearray()
        try:
            while chunk := await part.read_chunk(_READ_SIZE):
                received += len(chunk)
                if received > max_upload_bytes:
                    raise _too_large(max_upload_bytes)
                if is_file:
                    chunks += chunk
        except _MALFORMED as exc:
            raise BadRequestError(f"malformed multipart body: {type(exc).__name__}") from None
        if is_file:
            yield Upload(index=count - 1, filename=filename, data=bytes(chunks))
    if count == 0:
        found = f"; found {', '.join(map(repr, other_fields))}" if other_fields else ""
        raise BadRequestError(f"no {FIELD_NAME!r} field in the multipart body{found}")
