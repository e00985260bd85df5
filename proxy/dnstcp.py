"""DNS over TCP (RFC 1035 4.2.2, RFC 7766): the stream side of the proxy's DNS.

A DNS rule redirects TCP connections to port 53 (protocol TCP or ANY) to the proxy's TCP
listener like UDP datagrams; the listener dispatches a connection whose rule sets hold DNS rules
here (`proxy.handlers.STREAM_HANDLERS`). Every message on it is a 2-byte length (network order)
and that many bytes of DNS; the length prefix is the only thing read by hand, the message itself
goes to dnspython through the shared path of `proxy.dns` (`DnsCore.parse`, `DnsCore.handle`):
judged, refused, forwarded, learned and recorded exactly as a query over UDP, one L7 flow record
per query (over the proxy's in-flight caps, where UDP drops a query, TCP answers SERVFAIL).

Per connection:

  * several queries, pipelined: each is handled as soon as it is read, at most MAX_PIPELINED at
    once (beyond, the proxy stops reading until one is answered), and answered as soon as its
    answer is ready, so answers may come out of order (RFC 7766 6.2.1.1; the ids tell them apart);
  * an allowed query goes upstream on a connection of its own to the original destination,
    marked from-proxy with the source identity (as the HTTP side's upstream), and the server's
    answer is relayed unchanged with its length; a server that resets the connection gets the
    client REFUSED, one that says nothing within UPSTREAM_TIMEOUT_S leaves that query unanswered;
  * bounds: a message shorter than a DNS header (12 bytes) or longer than MAX_QUERY_BYTES, or one
    that is not a DNS query, is recorded and ends the connection: nothing more is read as a
    query, the answers still owed are sent, then the proxy closes its side and discards what the
    client still sends for REFUSED_LINGER_S (so the client sees an end of stream, not a reset);
    from its first byte a message must arrive whole within the header timeout (slowloris), else
    the connection is closed; with nothing in flight, a connection idle for the idle timeout is
    closed quietly; an answer the client does not read within the progress timeout ends it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING

import dns.message

from dataplane import timescale
from dataplane.abi import from_proxy_mark

from .dns import UPSTREAM_TIMEOUT_S, DnsCore, Query, UpstreamRefused
from .marks import SO_MARK
from .stream import PIECE, PeerClosed

if TYPE_CHECKING:
    from .context import ProxyContext, StreamConnection
    from .state import ConnectionPolicy

DNS_HEADER_BYTES = 12
# A query is one question (a name of at most 255 bytes) with perhaps EDNS options, a cookie or a
# signature: 4 KiB is ample, and bounds what one message can make the proxy buffer.
MAX_QUERY_BYTES = 4096
MAX_PIPELINED = 16  # queries of one connection in flight at once (RFC 7766 6.2.1.1: pipelining)
REFUSED_LINGER_S = 2.0  # a connection closed for what is no DNS: time for the client to see the end


async def serve_dns_connection(conn: "StreamConnection") -> None:
    """The handler of `proxy.handlers.STREAM_HANDLERS["dns"]`: serve one connection to its end."""
    await DnsStream(conn).run()


class DnsStream:
    """One client connection: a reader that parses queries as they come, a task per query."""

    def __init__(self, conn: "StreamConnection") -> None:
        self.conn = conn
        self.context: ProxyContext = conn.server
        self.core = DnsCore.of(conn.server)
        self.stream = conn.client
        self.pending: set[asyncio.Task] = set()
        self.room = asyncio.Semaphore(MAX_PIPELINED)
        self.writing = asyncio.Lock()  # one answer written (and drained) at a time, each whole
        self.refused = False  # the client sent what is no DNS query: the connection ends

    async def run(self) -> None:
        try:
            while True:
                await self.room.acquire()  # stop reading while MAX_PIPELINED answers are owed
                read = await self.read_query()
                if read is None:
                    self.room.release()
                    break
                task = asyncio.get_running_loop().create_task(self.answer(*read))
                self.pending.add(task)
                task.add_done_callback(self._done)
            # The client is done sending, or sent what ends the connection: the answers still
            # owed are sent before the close, each within its own bounds.
            if self.pending:
                await asyncio.gather(*self.pending, return_exceptions=True)
            if self.refused:
                await self.linger()
        finally:
            for task in list(self.pending):
                task.cancel()
            if self.pending:
                await asyncio.gather(*self.pending, return_exceptions=True)

    def _done(self, task: asyncio.Task) -> None:
        self.pending.discard(task)
        self.room.release()

    async def read_query(self) -> tuple[Query, dns.message.Message, bytes] | None:
        """The next query (where from, parsed, as received); None at the end of the connection:
        a clean close, a timeout, or a message that is no DNS query (recorded; `refused` set)."""
        limits = self.context.limits
        buf = self.stream.buf
        while not buf:
            # Between messages. While answers are owed the connection is not idle: wait on.
            try:
                async with asyncio.timeout(limits.idle_timeout):
                    more = await self.stream.fill()
            except TimeoutError:
                if self.pending:
                    continue
                return None
            if not more:
                return None
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(limits.header_timeout):
                length = struct.unpack("!H", await self.stream.read_exact(2))[0]
                if not DNS_HEADER_BYTES <= length <= MAX_QUERY_BYTES:
                    # An HTTP request's "GE" or "PO" announces more than any query: not DNS.
                    self.record(f"a DNS message of {length} bytes (a query has {DNS_HEADER_BYTES} to "
                                f"{MAX_QUERY_BYTES}): connection closed", t0)
                    self.refused = True
                    return None
                message = await self.stream.read_exact(length)
        except TimeoutError:
            self.record(f"no complete DNS message within {limits.header_timeout:g} s: connection closed", t0)
            return None
        except PeerClosed:
            self.record("connection closed inside a DNS message", t0)
            return None
        q = self.query(t0)
        query = self.core.parse(q, message)
        if query is None:
            self.refused = True  # not DNS: nothing more on this connection is taken for a query
            return None
        return q, query, message

    async def answer(self, q: Query, query: dns.message.Message, message: bytes) -> None:
        """One query through the shared path; its answer, if any, written back with its length."""
        reply = await self.core.handle(
            q, query, message, lambda wire, query_id: ask_upstream(self.context, q.cp, q.dst, wire, query_id))
        if reply.data is not None:
            await self.write(reply.data)

    async def write(self, data: bytes) -> None:
        async with self.writing:
            try:
                async with asyncio.timeout(self.context.limits.progress_timeout):
                    self.stream.writer.write(struct.pack("!H", len(data)) + data)
                    await self.stream.writer.drain()
            except TimeoutError:
                self.stream.writer.transport.abort()  # the client does not read what it asked for
            except (ConnectionError, OSError, RuntimeError):
                pass  # the client went away: nothing left to do for this answer

    async def linger(self) -> None:
        """End a connection the proxy refuses to read on: our side closed first (end of stream),
        then what the client still sends read and discarded for a moment, so that unread bytes
        do not turn the close into a reset (the client sees the end, not an error)."""
        writer = self.stream.writer
        try:
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(REFUSED_LINGER_S):
                while await self.stream.reader.read(PIECE):
                    pass
        except (TimeoutError, ConnectionError, OSError, RuntimeError):
            pass

    def query(self, t0: float) -> Query:
        conn = self.conn
        return Query(conn.policy(self.context.snapshot), conn.peer, conn.dst, "TCP", t0)

    def record(self, reason: str, t0: float) -> None:
        """An error of the connection itself (no question was read): one record."""
        self.core.record(self.query(t0), "", "", -1, "error", reason)


async def ask_upstream(context: "ProxyContext", cp: "ConnectionPolicy", dst: tuple[str, int], data: bytes,
                       query_id: int) -> bytes | None:
    """The query to the server it was meant for, over a TCP connection of its own that carries the
    from-proxy mark; the server's answer (same id), None on silence or a broken exchange;
    UpstreamRefused when the server refuses the connection."""
    loop = asyncio.get_running_loop()
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        print(f"l7proxy: dns over tcp upstream: {exc!r}", file=sys.stderr, flush=True)
        return None
    try:
        sock.setblocking(False)
        if context.mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, from_proxy_mark(cp.src_identity))
        async with asyncio.timeout(timescale.scaled(UPSTREAM_TIMEOUT_S)):
            try:
                await loop.sock_connect(sock, dst)
            except ConnectionRefusedError:
                raise UpstreamRefused(f"{dst[0]}:{dst[1]} refused the connection") from None
            await loop.sock_sendall(sock, struct.pack("!H", len(data)) + data)
            while True:  # answers to other ids (none expected on a connection of its own) are skipped
                length = struct.unpack("!H", await _recv_exact(loop, sock, 2))[0]
                answer = await _recv_exact(loop, sock, length)
                if len(answer) >= 2 and struct.unpack("!H", answer[:2])[0] == query_id:
                    return answer
    except (TimeoutError, OSError, EOFError):
        return None
    finally:
        sock.close()


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        piece = await loop.sock_recv(sock, n - len(data))
        if not piece:
            raise EOFError("the server closed the connection inside a message")
        data += piece
    return bytes(data)

