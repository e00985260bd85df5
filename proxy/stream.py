"""A buffered byte stream over an asyncio reader: message heads, lines and body framing.

Bodies are streamed as pieces of at most `PIECE` bytes (never buffered whole); chunked bodies are
decoded strictly and re-encoded (same chunk sizes, extensions and trailers dropped) so what goes
out is always well-formed whatever came in. A head is refused early -- before the limit is
reached -- when it contains a bare LF, a bare CR or a NUL, so a client cannot park the proxy on
a head that will never parse.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .http import MAX_CHUNK_LINE, MAX_HEAD, MAX_REQUEST_LINE, HttpError, parse_chunk_size, validate_trailer

PIECE = 256 * 1024
LAST_CHUNK = b"0\r\n\r\n"  # one object: relays tell the terminator from data by identity


class PeerClosed(Exception):
    """The peer closed (or reset) the connection in the middle of a message."""


class BufferedStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(PIECE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            return False
        self.buf += data
        return True

    async def read_head(self, error_status: int = 400) -> bytes | None:
        """The next head through CRLFCRLF; None on a clean close before any byte of it."""
        scanned = 0  # bytes already checked for bare CR/LF/NUL and for the terminator
        while True:
            while self.buf.startswith(b"\r\n") and scanned == 0:
                del self.buf[:2]  # RFC 9112 2.2: ignore empty lines before a request line
            end = self.buf.find(b"\r\n\r\n", max(0, scanned - 3))
            limit = end + 4 if end >= 0 else len(self.buf)
            self._check_head_bytes(max(0, scanned - 1), limit, error_status)
            if end >= 0:
                if end + 4 > MAX_HEAD:
                    raise HttpError(431, "request head too large")
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            scanned = len(self.buf)
            if scanned > MAX_HEAD:
                raise HttpError(431, "request head too large")
            if self.buf.find(b"\r\n") < 0 and scanned > MAX_REQUEST_LINE:
                raise HttpError(431, "request line too long")
            if not await self._fill():
                if not self.buf:
                    return None
                raise PeerClosed("connection closed inside a message head")

    def _check_head_bytes(self, start: int, stop: int, status: int) -> None:
        buf = self.buf
        if buf.find(b"\x00", start, stop) >= 0:
            raise HttpError(status, "NUL in message head")
        pos = buf.find(b"\n", start, stop)
        while pos >= 0:
            if pos == 0 or buf[pos - 1] != 0x0D:
                raise HttpError(status, "bare LF in message head")
            pos = buf.find(b"\n", pos + 1, stop)
        pos = buf.find(b"\r", start, stop)
        while pos >= 0:
            if pos + 1 < len(buf) and buf[pos + 1] != 0x0A:
                raise HttpError(status, "bare CR in message head")
            pos = buf.find(b"\r", pos + 1, stop)

    async def read_line(self, limit: int, status: int = 400) -> bytes:
        """One CRLF-terminated line (without the CRLF); bare LF or over-long -> HttpError(status)."""
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                if b"\n" in line or b"\r" in line:
                    raise HttpError(status, "bare CR or LF in a framing line")
                return line
            if len(self.buf) > limit or self.buf.find(b"\n") >= 0:
                raise HttpError(status, "invalid framing line")
            if not await self._fill():
                raise PeerClosed("connection closed inside a framing line")

    async def read_some(self, n: int) -> bytes:
        """Up to n bytes (at least one); PeerClosed at end of stream."""
        if not self.buf and not await self._fill():
            raise PeerClosed("connection closed inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
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
                if not self.buf and not await self._fill():
                    return
                data = bytes(self.buf)
                self.buf.clear()
                yield data

    async def _chunked(self, framed: bool, status: int) -> AsyncIterator[bytes]:
        while True:
            try:
                size = parse_chunk_size(await self.read_line(MAX_CHUNK_LINE, status))
            except HttpError as exc:
                raise HttpError(status, exc.reason) from None
            if size == 0:
                total = 0
                while True:  # trailers: validated, then dropped
                    line = await self.read_line(MAX_HEAD, status)
                    if not line:
                        break
                    total += len(line)
                    if total > MAX_HEAD:
                        raise HttpError(431 if status == 400 else status, "trailers too large")
                    try:
                        validate_trailer(line)
                    except HttpError as exc:
                        raise HttpError(status, exc.reason) from None
                if framed:
                    yield LAST_CHUNK
                return
            if framed:
                yield b"%x\r\n" % size
            remaining = size
            while remaining:
                data = await self.read_some(min(remaining, PIECE))
                remaining -= len(data)
                yield data
            if await self.read_exact(2) != b"\r\n":
                raise HttpError(status, "chunk data not followed by CRLF")
            if framed:
                yield b"\r\n"

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # already closed / transport gone
            pass
