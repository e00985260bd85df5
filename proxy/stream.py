"""A buffered byte stream over an asyncio reader: message heads, lines and body framing.

Bodies are streamed as pieces of at most `PIECE` bytes (never buffered whole); chunked bodies are
decoded strictly and re-encoded (same chunk sizes, extensions and trailers dropped) so what goes
out is always well-formed whatever came in.

Heads, chunk-size lines and trailers are read line by line under one rule: a line is refused as
soon as the bytes that break it have arrived -- a NUL, a bare CR or bare LF, more bytes than its
limit, or (for the first line of a head, once complete) a request line that is not HTTP/1.0 or
1.1 -- so a client cannot park the proxy on a message that will never parse, and the answer
depends only on the bytes, never on how they were split across reads.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import AsyncIterator

from l7.http import HttpError
from .http import (MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_REQUEST_LINE, check_status_line, parse_chunk_size,
                   parse_request_line, validate_trailer)

PIECE = 256 * 1024
LAST_CHUNK = b"0\r\n\r\n"  # one object: relays tell the terminator from data by identity
_HEAD_CTL = re.compile(rb"[\x00\r\n]")  # never inside a head or framing line, except as its CRLF
_CTL_NAMES = {0x00: "NUL", 0x0A: "bare LF", 0x0D: "bare CR"}


class PeerClosed(Exception):
    """The peer closed (or reset) the connection in the middle of a message."""


class BufferedStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def fill(self) -> bool:
        """Read what the peer has sent next into the buffer; False when it has closed."""
        try:
            data = await self.reader.read(PIECE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            return False
        self.buf += data
        return True

    async def read_head(self, error_status: int = 400) -> bytes | None:
        """The next head through CRLFCRLF; None on a clean close before any byte of it.

        `error_status` tells the side: 400 reads a request head from a client, 502 a response
        head from an upstream. Every line is checked as soon as the bytes that break it arrive
        (see `_line_end`) and the first line as soon as its CRLF arrives (a request line must be
        HTTP/1.0 or 1.1, a status line HTTP/1.x), so a client cannot park the proxy on a head that
        will never parse. Limits: first line (request line) MAX_REQUEST_LINE bytes, whole head
        (CRLFCRLF included) MAX_HEAD bytes, MAX_HEADERS header lines -- 431 for a request."""
        request = error_status == 400
        first_limit = MAX_REQUEST_LINE if request else MAX_HEAD
        too_large = 431 if request else error_status
        line_start = 0  # where the line being read starts
        lines = 0  # complete non-empty lines so far (the first line included)
        clean = 0  # bytes before this offset have been checked and hold no CRLF of the current line
        while True:
            if lines == 0 and self.buf.startswith(b"\r\n"):
                while self.buf.startswith(b"\r\n"):
                    del self.buf[:2]  # RFC 9112 2.2: ignore empty lines before a request line
                clean = 0
            if lines == 0 and clean == 0:  # first look at this head's bytes (later: line by line)
                head = self._whole_clean_head(first_limit)
                if head is not None:  # the common case, checked in one pass
                    first = head[:head.find(b"\r\n")]
                    if request:
                        parse_request_line(first)
                    else:
                        check_status_line(first)
                    del self.buf[:len(head)]
                    return head
            # The longest this line may be: the head needs its CRLF and the final CRLF too.
            limit, what = MAX_HEAD - 4 - line_start, "message head"
            if lines == 0:
                limit, what = min(limit, first_limit), "request line" if request else "status line"
            elif lines > MAX_HEADERS:
                limit, what = 0, f"head (more than {MAX_HEADERS} header fields)"
            end = self._line_end(line_start, clean, max(0, limit), error_status, too_large, what)
            if end < 0:
                clean = len(self.buf)
                if not await self.fill():
                    if not self.buf:
                        return None
                    raise PeerClosed("connection closed inside a message head")
                continue
            if end == line_start and lines:  # the empty line: the head is complete
                head = bytes(self.buf[:end + 2])
                del self.buf[:end + 2]
                return head
            if lines == 0:
                line = bytes(self.buf[:end])
                if request:
                    parse_request_line(line)
                else:
                    check_status_line(line)
            lines += 1
            line_start = clean = end + 2

    def _whole_clean_head(self, first_limit: int) -> bytes | None:
        """The head at the start of the buffer if it is all there and breaks no rule of
        `_line_end` (no NUL, bare CR or bare LF, every limit kept), else None: then the line by
        line path finds what is wrong, in byte order, exactly as if the bytes came one by one."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HEAD:
            return None
        head = bytes(self.buf[:end + 4])
        crlf = head.count(b"\r\n")  # every CR and every LF is part of a CRLF: no bare CR or LF
        if crlf != head.count(b"\r") or crlf != head.count(b"\n") or b"\x00" in head or \
                head.find(b"\r\n") > first_limit or crlf - 2 > MAX_HEADERS:
            return None
        return head

    def _line_end(self, start: int, clean: int, limit: int, bad_status: int, long_status: int, what: str) -> int:
        """Index of the CRLF ending the line that starts at `start` in the buffer, or -1 while it
        has not arrived; bytes in [start, clean) are known to be clean and hold no CRLF.

        Raises HttpError as soon as the bytes present break the line: a NUL, a bare LF or a bare
        CR (`bad_status`), or more than `limit` bytes before the CRLF (`long_status`). Each rule
        fires at the first byte that makes it certain (a CR that may still be followed by LF
        decides nothing yet) and the earliest wins, a bad byte on a tie: so the answer depends
        only on the bytes, never on how they were split across reads."""
        buf = self.buf
        scan = max(start, clean - 1)
        end = buf.find(b"\r\n", scan)
        stop = end if end >= 0 else len(buf)
        bad_at = long_at = sys.maxsize  # prefix length at which each rule becomes certain
        bad = _HEAD_CTL.search(buf, scan, stop)
        if bad is not None:
            i = bad.start()
            if buf[i] != 0x0D:
                bad_at = i + 1
            elif i + 1 < len(buf):  # a CR followed by anything but LF (CRLF would be `end`)
                bad_at = i + 2
        if stop - start > limit:
            long_at = start + limit + (2 if buf[start + limit] == 0x0D else 1)
        if min(bad_at, long_at) <= len(buf):
            if bad_at <= long_at:
                raise HttpError(bad_status, f"{_CTL_NAMES[buf[bad.start()]]} in {what}")
            raise HttpError(long_status, f"{what} longer than {limit} bytes")
        return end

    async def read_line(self, limit: int, status: int = 400, long_status: int | None = None,
                        what: str = "framing line") -> bytes:
        """One CRLF-terminated line (without the CRLF). A NUL, bare CR or bare LF -> HttpError(status);
        more than `limit` bytes before the CRLF -> HttpError(long_status, default status), however
        the line was split across reads (see `_line_end`)."""
        clean = 0
        while True:
            end = self._line_end(0, clean, limit, status, status if long_status is None else long_status, what)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            clean = len(self.buf)
            if not await self.fill():
                raise PeerClosed("connection closed inside a framing line")

    async def read_some(self, n: int) -> bytes:
        """Up to n bytes (at least one); PeerClosed at end of stream."""
        if not self.buf and not await self.fill():
            raise PeerClosed("connection closed inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self.fill():
                raise PeerClosed("connection closed inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def body(self, kind: str, length: int = 0, framed: bool = True,
                   status: int = 400) -> AsyncIterator[bytes]:
        """Pieces of a body: "length" (raw), "chunked" (re-encoded if `framed`, else decoded),
        "close" (until end of stream), "none" (nothing). `status` is the error status to raise
        on bad framing (400 for requests, 502 for responses)."""
        if kind == "length":
            remaining = length
            while remaining:
                data = await self.read_some(min(remaining, PIECE))
                remaining -= len(data)
                yield data
        elif kind == "chunked":
            async for piece in self._chunked(framed, status):
                yield piece
        elif kind == "close":
            while True:
                if not self.buf and not await self.fill():
                    return
                data = bytes(self.buf)
                self.buf.clear()
                yield data

    async def _chunked(self, framed: bool, status: int) -> AsyncIterator[bytes]:
        while True:
            line = await self.read_line(MAX_CHUNK_LINE, status, what="chunk-size line")
            try:
                size = parse_chunk_size(line)
            except HttpError as exc:
                raise HttpError(status, exc.reason) from None
            if size == 0:
                await self._trailers(status)
                if framed:
                    yield LAST_CHUNK
                return
            if framed:
                yield b"%x\r\n" % size  # the size alone: validated extensions are not forwarded
            remaining = size
            while remaining:
                data = await self.read_some(min(remaining, PIECE))
                remaining -= len(data)
                yield data
            if await self.read_exact(2) != b"\r\n":
                raise HttpError(status, "chunk data not followed by CRLF")
            if framed:
                yield b"\r\n"

    async def _trailers(self, status: int) -> None:
        """Read, validate and drop the trailer section, under the limits of a head: MAX_HEAD bytes
        (every CRLF included), MAX_HEADERS fields (431 for a request)."""
        too_large = 431 if status == 400 else status
        used, fields = 0, 0
        while True:
            limit, what = max(0, MAX_HEAD - 4 - used), "trailer section"
            if fields >= MAX_HEADERS:
                limit, what = 0, f"trailer section (more than {MAX_HEADERS} fields)"
            line = await self.read_line(limit, status, too_large, what)
            if not line:
                return
            try:
                validate_trailer(line)
            except HttpError as exc:
                raise HttpError(status, exc.reason) from None
            used += len(line) + 2
            fields += 1

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # already closed / transport gone
            pass
