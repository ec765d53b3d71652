"""Read the ``file`` parts of a multipart/form-data body, within the upload limits."""

from __future__ import annotations

import re
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import BodyPartReader, MultipartReader, StreamReader, hdrs, http_exceptions, web
from aiohttp.multipart import (
    BadContentDispositionHeader,
    content_disposition_filename,
    parse_content_disposition,
)

from ..core.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = ["FIELD_NAME", "MAX_OTHER_PARTS", "Upload", "read_uploads"]

FIELD_NAME = "file"
# Parts not named ``file`` (a form's other fields) that a request may carry besides its files;
# they are read and dropped. With limits.max_files_per_request, this caps the parts of any
# name: each part costs header parsing on the event loop, whatever its size, so a body of
# many empty parts would otherwise cost loop time by the million.
MAX_OTHER_PARTS = 16
# Framing lines (preamble, boundaries, part headers, epilogue) aiohttp may read per allowed
# part: aiohttp reads each with a call of its own, on the loop, so their number is capped as
# well as their bytes. Generous: a browser or curl sends four lines per part.
_LINES_PER_PART = 32
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
# MultipartReader.next() raises a bare RuntimeError for a first part named _charset_ with
# 32 bytes or more; nothing else in the reader raises RuntimeError.
_MALFORMED_NEXT = (*_MALFORMED, RuntimeError)


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


class _LimitedBody:
    """The request's body stream as aiohttp's multipart reader uses it, held to the limits.

    Every read first checks the bytes received so far (``total_bytes``: all of the body,
    preamble, part headers and epilogue included), so a loop inside aiohttp's reader (a long
    preamble, many header lines) stops at the limit too, and counts the lines read.
    """

    def __init__(self, content: StreamReader, *, max_bytes: int, max_lines: int) -> None:
        self._content = content
        self._max_bytes = max_bytes
        self._lines_left = max_lines

    def check(self) -> None:
        """Raise 413 once more than ``max_bytes`` of the body have been received."""
        if self._content.total_bytes > self._max_bytes:
            raise _too_large(self._max_bytes)

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        """One line, counted against the line budget."""
        self.check()
        self._lines_left -= 1
        if self._lines_left < 0:
            raise BadRequestError("too many lines of multipart framing in the request body")
        line = await self._content.readline(max_line_length=max_line_length)
        self.check()
        return line

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (never the whole body: the reader always asks for a size)."""
        self.check()
        data = await self._content.read(n)
        self.check()
        return data

    def at_eof(self) -> bool:
        """Whether the whole body has been received and read."""
        return self._content.at_eof()

    def unread_data(self, data: bytes) -> None:
        """Put back what the part reader read past its boundary."""
        # The reader's own call; aiohttp deprecates it for users, and its warning is about
        # aiohttp's code, not this one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._content.unread_data(data)


def _refuse_compressed(request: web.Request) -> None:
    # aiohttp inflates a compressed body as it arrives, so its size on the wire says nothing
    # of what reading it costs. No client needs to compress images that are compressed
    # already: refuse it before reading a byte of it.
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaTypeError(
            f"compressed request bodies are not accepted (Content-Encoding: "
            f"{encoding[:32]!r}); send the multipart body uncompressed"
        )


async def read_uploads(
    request: web.Request, *, max_upload_bytes: int, max_files: int
) -> AsyncIterator[Upload]:
    """Yield each ``file`` part as soon as it is read, so decoding can start early.

    The byte limit counts every byte of the body as received (framing and other fields
    included), so a chunked upload with no Content-Length is held to it too; parts of any
    name are capped at ``max_files + MAX_OTHER_PARTS``.
    """
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"expected a multipart/form-data upload with a {FIELD_NAME!r} field, got "
            f"{request.content_type!r}"
        )
    _refuse_compressed(request)
    if request.content_length is not None and request.content_length > max_upload_bytes:
        raise _too_large(max_upload_bytes)
    max_parts = max_files + MAX_OTHER_PARTS
    body = _LimitedBody(
        request.content,
        max_bytes=max_upload_bytes,
        # One more part's worth for the preamble, the closing boundary and the epilogue.
        max_lines=(max_parts + 1) * _LINES_PER_PART,
    )
    try:
        # What request.multipart() builds, on the limited stream.
        reader = MultipartReader(
            request.headers,
            body,  # type: ignore[arg-type]  # the methods the reader calls, and no others
            max_field_size=request.protocol.max_field_size,
            max_headers=request.protocol.max_headers,
        )
    except _MALFORMED as exc:
        raise BadRequestError(f"malformed multipart body: {type(exc).__name__}") from None
    count = 0
    parts = 0
    other_fields: list[str] = []
    while True:
        try:
            part = await reader.next()
        except _MALFORMED_NEXT as exc:
            raise BadRequestError(f"malformed multipart body: {type(exc).__name__}") from None
        if part is None:
            break
        parts += 1
        if parts > max_parts:
            raise BadRequestError(
                f"more than {max_parts} parts in one request: {max_files} {FIELD_NAME!r} "
                f"parts (limits.max_files_per_request) and {MAX_OTHER_PARTS} others at most"
            )
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
                if is_file:
                    chunks += chunk
        except _MALFORMED as exc:
            raise BadRequestError(f"malformed multipart body: {type(exc).__name__}") from None
        if is_file:
            yield Upload(index=count - 1, filename=filename, data=bytes(chunks))
    if count == 0:
        found = f"; found {', '.join(map(repr, other_fields))}" if other_fields else ""
        raise BadRequestError(f"no {FIELD_NAME!r} field in the multipart body{found}")
    # The rest of the epilogue, within the limit: read to its end, the body leaves the
    # connection ready for the client's next request.
    while await body.read(_READ_SIZE):
        pass
