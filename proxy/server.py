"""The transparent L7 proxy: listener, per-connection request loop, upstream forwarding.

A connection assigned to the listener by bpf_sk_assign keeps its original tuple, so
`getsockname()` of the accepted socket is the original destination (tests override it with
`original_dst`). A connection is served by the handler of the L7 protocol of the rule sets that
apply to it (STREAM_HANDLERS below: HTTP, `ClientConnection`). Per request: read and validate
the head (proxy.http), judge it under the current policy snapshot (proxy.state, which calls the
oracle's own decision in `l7.decide`), then either answer 403 (reading and discarding the body so
the connection stays usable) or forward the re-serialized request upstream and stream the
response back. Requests on one client connection are handled strictly in order, which keeps
pipelined answers in order. The upstream connection (SO_MARK = from-proxy magic + source
identity) is reused for the next request of the same client connection while it stays clean.

Failure policy: malformed input -> 400/431 and close; an upstream that cannot be reached -> 503;
an upstream that answers garbage -> 502; any other exception -> the connection is closed with
nothing more forwarded (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Callable

from dataplane import timescale
from dataplane.abi import PROXY_PORT, from_proxy_mark
from dataplane.flowrecord import Verdict
from l7.http import HttpError, HttpFlow, recorded_headers

from .context import DatagramHandler, ProxyContext
from .events import EventLog, l7_flow, redirect_direction
from .fqdn import FqdnLearner
from .handlers import DATAGRAM_HANDLERS, STREAM_HANDLERS as PROTOCOL_STREAM_HANDLERS
from .http import Request, denied_response, error_response, parse_request, parse_response, response_head, upgrade_accepted
from .limits import ConnectionCaps, Limits, tcp_progress
from .marks import IP_TRANSPARENT, SO_MARK
from .state import ConnectionPolicy, RequestVerdict, Snapshot
from .stream import LAST_CHUNK, PIECE, BufferedStream, PeerClosed

CONNECT_TIMEOUT_S = 5.0  # an ordinary machine's seconds: the wait is timescale.scaled()
# The idle, header and progress timeouts and the connection caps are `Limits` (proxy.limits).
REFUSED_LINGER_S = 2.0  # a connection over a cap: time for the client to read its 503 before the close
MAX_LINGERING = 64  # refused connections waiting for that at once; beyond, they are closed at once
CLOSE_GRACE_S = 2.0  # a closed connection whose peer does not read what is left is reset after this


class UpstreamFailed(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class ProxyServer:
    """Owns the listener, the current policy snapshot and the event log."""

    def __init__(self, snapshot: Snapshot, host: str = "0.0.0.0", port: int = PROXY_PORT, *,
                 transparent: bool = True, mark: bool = True, original_dst: tuple[str, int] | None = None,
                 events: EventLog | None = None, limits: Limits | None = None, learner: FqdnLearner | None = None,
                 datagram_handlers: Mapping[str, Callable[[ProxyContext], DatagramHandler]] | None = None) -> None:
        self.snapshot = snapshot  # replaced whole on reload; each request reads it once
        self.host, self.port = host, port
        self.transparent, self.mark = transparent, mark
        self.original_dst = original_dst  # tests: the "original destination" of every connection
        self.events, self.learner = events or EventLog(), learner  # learner: DNS answers' addresses (proxy.fqdn)
        self.limits = limits or Limits()
        self.caps = ConnectionCaps()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()  # every connection's task, admitted or being refused
        self._live: dict[asyncio.Task, ClientConnection] = {}  # the admitted ones
        self._lingering = 0  # refused connections waiting for their client to read the 503
        self._watchdog: asyncio.Task | None = None
        self._task_factory: tuple[Callable[..., Any], Any] | None = None  # (ours, the one before)
        # The datagram protocols (DNS), each with its own socket on the same port number.
        self.datagram_handlers = DATAGRAM_HANDLERS if datagram_handlers is None else datagram_handlers
        self.datagram: dict[str, DatagramHandler] = {}  # by protocol name, once started

    def listening_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)  # accept connections for any address
        sock.bind((self.host, self.port))
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self.listening_socket()
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=PIECE)
        try:
            for name, make in self.datagram_handlers.items():
                handler = make(self)
                await handler.start()
                self.datagram[name] = handler
        except OSError:
            for handler in self.datagram.values():
                await handler.stop()
            self.datagram.clear()
            self._server.close()
            raise
        loop = asyncio.get_running_loop()
        self._watchdog = loop.create_task(self._watch())
        previous = loop.get_task_factory()

        def owned_tasks(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future:
            # A task a connection starts (its body upload and response relay) belongs to it: when
            # the connection ends -- a limit, a shutdown -- its tasks are cancelled with it rather
            # than left running against closed sockets.
            task = previous(loop, coro, **kwargs) if previous is not None else asyncio.Task(coro, loop=loop, **kwargs)
            conn = self._live.get(asyncio.current_task(loop))  # type: ignore[arg-type]
            if conn is not None:
                conn.tasks.add(task)
                task.add_done_callback(conn.tasks.discard)
            return task
        self._task_factory = (owned_tasks, previous)
        loop.set_task_factory(owned_tasks)

    def reload(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot  # one reference swap: atomic for every request after it

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self._task_factory is not None and loop.get_task_factory() is self._task_factory[0]:
            loop.set_task_factory(self._task_factory[1])
        for handler in self.datagram.values():
            await handler.stop()
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.events.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        conn = ClientConnection(self, BufferedStream(reader, writer))
        identity: int | None = None
        try:
            if self.original_dst is None and conn.dst[1] == self.port:
                # Addressed to the proxy port itself (a client connecting to node:15001 directly,
                # not a redirected flow): forwarding would loop into ourselves. Refuse it.
                return
            # The source identity as the lab's ipcache says (never anything the client sends):
            # the caps count per identity, so one pod's connections never crowd out another's.
            cp = conn.policy(self.snapshot)
            serve = STREAM_HANDLERS.get(cp.protocol)
            if serve is None:
                return  # no handler speaks the protocol of the rules that apply: fail closed
            refusal = self.caps.admit(cp.src_identity, self.limits)
            if refusal:
                await self._turn_away(conn, cp, refusal)
                return
            identity = cp.src_identity
            self._live[task] = conn
            await serve(conn)
        except (asyncio.CancelledError, ConnectionError, PeerClosed):
            pass  # shutdown, a limit that ended it, or a peer that went away mid-exchange: just close
        except Exception as exc:  # fail closed: log, close, forward nothing more
            print(f"l7proxy: internal error on {conn.peer}: {exc!r}", file=sys.stderr)
        finally:
            conn.close()
            self._conns.discard(task)
            if identity is not None:
                self._live.pop(task, None)
                self.caps.release(identity)

    async def _turn_away(self, conn: "ClientConnection", cp: ConnectionPolicy, reason: str) -> None:
        """A connection over a cap: recorded, answered 503 with `Connection: close` and closed.
        The close waits (briefly, reading and discarding) for the client to finish sending, so
        that unread request bytes do not turn the close into a reset that could lose the 503."""
        conn.record(None, cp, 503, "error", reason, time.monotonic())
        writer = conn.client.writer
        writer.write(error_response(503))
        if self._lingering >= MAX_LINGERING:
            writer.transport.abort()  # many refusals at once: do not hold descriptors for them
            return
        self._lingering += 1
        try:
            writer.write_eof()
            async with asyncio.timeout(REFUSED_LINGER_S):
                while await conn.client.reader.read(PIECE):
                    pass
        except (TimeoutError, ConnectionError, OSError, RuntimeError):
            pass
        finally:
            self._lingering -= 1

    async def _watch(self) -> None:
        """Once a tick, end every exchange in flight that moved no byte for the progress timeout.
        One timer for the whole proxy, not one per read or write."""
        while True:
            timeout = self.limits.progress_timeout
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for task, conn in list(self._live.items()):
                try:
                    if conn.stalled(now, timeout):
                        conn.end_stalled(task, timeout)
                except Exception as exc:  # noqa: BLE001 - one connection's trouble must not stop the watch
                    print(f"l7proxy: progress check on {conn.peer}: {exc!r}", file=sys.stderr)
                    task.cancel()


class Upstream:
    """One connection to the original destination, marked as from-proxy traffic."""

    def __init__(self, stream: BufferedStream) -> None:
        self.stream = stream
        self.used = False  # has carried a complete exchange (a reused connection may be stale)

    @classmethod
    async def open(cls, dst: tuple[str, int], mark: int | None) -> "Upstream":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, dst), timescale.scaled(CONNECT_TIMEOUT_S))
            reader, writer = await asyncio.open_connection(sock=sock, limit=PIECE)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            raise UpstreamFailed(503, f"upstream {dst[0]}:{dst[1]} unreachable: {exc!r}") from None
        return cls(BufferedStream(reader, writer))


class ClientConnection:
    def __init__(self, server: ProxyServer, client: BufferedStream) -> None:
        self.server = server
        self.client = client
        sock = client.writer.get_extra_info("socket")
        self.peer: tuple[str, int] = client.writer.get_extra_info("peername")[:2]
        self.dst: tuple[str, int] = server.original_dst or sock.getsockname()[:2]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream: Upstream | None = None
        self._snap: Snapshot | None = None
        self._cp: ConnectionPolicy | None = None
        self.response_started = False  # the current response's head has been written to the client
        # The request in flight (None between requests) and the progress last seen on it.
        self.exchange: tuple[Request, ConnectionPolicy, float] | None = None
        self.tasks: set[asyncio.Future] = set()  # tasks it started that still run (ProxyServer.start)
        self._progress, self._progress_at = 0, 0.0

    def policy(self, snap: Snapshot) -> ConnectionPolicy:
        """Connection-level decisions, computed once per snapshot."""
        if snap is not self._snap:
            self._snap, self._cp = snap, snap.connection(self.peer[0], self.dst[0], self.dst[1])
            if self.upstream is not None:  # new policy: new mark identity possibly; reconnect
                self.upstream.stream.close()
                self.upstream = None
        return self._cp

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        streams = [self.client] + ([self.upstream.stream] if self.upstream is not None else [])
        self.upstream = None
        for stream in streams:
            stream.close()
            # close() sends what is still buffered first; a peer that does not read it would
            # keep the socket open for ever, so it is reset after a grace period.
            transport = stream.writer.transport
            if _buffered(transport):
                asyncio.get_running_loop().call_later(CLOSE_GRACE_S, _abort_if_stuck, transport)

    async def run(self) -> None:
        limits = self.server.limits
        while True:
            if not self.client.buf:
                # Between requests: the next one must start within the idle timeout (a new
                # connection too); an idle connection is closed quietly, with nothing recorded.
                try:
                    async with asyncio.timeout(limits.idle_timeout):
                        more = await self.client.fill()
                except TimeoutError:
                    return
                if not more:
                    return
            try:
                # From its first byte, the whole head within the header timeout (slowloris).
                async with asyncio.timeout(limits.header_timeout):
                    head = await self.client.read_head()
            except TimeoutError:
                await self.refuse(HttpError(408, "no complete request head in time"), None, time.monotonic(),
                                  self.policy(self.server.snapshot))
                return
            except HttpError as exc:
                await self.refuse(exc, None, time.monotonic(), self.policy(self.server.snapshot))
                return
            except PeerClosed:
                return
            if head is None:
                return
            t0 = time.monotonic()
            snap = self.server.snapshot  # read once: this request is judged under this state only
            cp = self.policy(snap)
            try:
                req = parse_request(head)
            except HttpError as exc:
                await self.refuse(exc, None, t0, cp)
                return
            verdict = snap.judge(cp, req.method, req.path, req.match_headers())
            self.begin_exchange(req, cp, t0)
            try:
                if not verdict.allowed:
                    if not await self.deny(req, cp, verdict, t0):
                        return
                    continue
                if not await self.forward(req, cp, verdict, t0):
                    return
            finally:
                self.exchange = None

    # ------------------------------------------------------------------ progress of an exchange

    def begin_exchange(self, req: Request, cp: ConnectionPolicy, t0: float) -> None:
        self.exchange = (req, cp, t0)
        self.response_started = False
        self._progress, self._progress_at = self.progress(), time.monotonic()

    def progress(self) -> int:
        """What the kernel has moved on this connection's sockets so far (see proxy.limits)."""
        total = tcp_progress(self.client.writer.get_extra_info("socket"))
        if self.upstream is not None:
            total += tcp_progress(self.upstream.stream.writer.get_extra_info("socket"))
        return total

    def stalled(self, now: float, timeout: float) -> bool:
        """True if a request is in flight and no byte moved on it for `timeout` seconds."""
        if self.exchange is None:
            return False
        seen = self.progress()
        if seen != self._progress:
            self._progress, self._progress_at = seen, now
            return False
        return now - self._progress_at >= timeout

    def end_stalled(self, task: asyncio.Task, timeout: float) -> None:
        """End an exchange that stopped moving: recorded, 408 (the request had a body: the client
        may be the one that stopped) or 504 (the upstream owes the answer) if the client has no
        answer yet, then the connection task is cancelled and both sockets are closed."""
        assert self.exchange is not None
        req, cp, t0 = self.exchange
        self.exchange = None
        why = f"no progress for {timeout:g} s (progress timeout)"
        if self.response_started:
            self.record(req, cp, 502, "error", why + " in the middle of the response", t0)
        else:
            status = 408 if req.body != "none" else 504
            self.record(req, cp, status, "error", why, t0)
            with contextlib.suppress(Exception):
                self.client.writer.write(_timeout_response(status))
        for child in list(self.tasks):
            child.cancel()
        task.cancel()

    # ------------------------------------------------------------------ answers from the proxy

    async def refuse(self, exc: HttpError, req: Request | None, t0: float, cp: ConnectionPolicy | None = None) -> None:
        """Protocol error: answer it and let the caller close the connection."""
        # Every answer is recorded before it is written: whoever sees it finds its record.
        self.record(req, cp, exc.status, "error", exc.reason, t0)
        try:
            await self.client.write(error_response(exc.status))
        except (ConnectionError, OSError):
            pass

    async def deny(self, req: Request, cp: ConnectionPolicy, verdict: RequestVerdict, t0: float) -> bool:
        """403; True if the connection stays usable."""
        if req.body != "none" and req.expect_continue:
            # The client waits for 100 Continue before sending the body: answering first and
            # then reading a body it may never send would hang or desync; close instead.
            self.record(req, cp, 403, "denied", verdict.why, t0, verdict)
            await self.client.write(denied_response(close=True))
            return False
        try:
            async for _ in self.client.body(req.body, req.length):
                pass  # discard the body per its framing so the next request starts cleanly
        except HttpError as exc:
            await self.refuse(exc, req, t0, cp)
            return False
        except PeerClosed:
            return False
        self.record(req, cp, 403, "denied", verdict.why, t0, verdict)
        await self.client.write(denied_response(close=not req.keep_alive))
        return req.keep_alive

    def record(self, req: Request | None, cp: ConnectionPolicy | None, status: int, verdict: str, reason: str,
               t0: float, rv: RequestVerdict | None = None) -> None:
        elapsed_ns = round((time.monotonic() - t0) * 1e9)
        self.server.events.emit(l7_flow(
            self.server.snapshot, Verdict(verdict), self.peer, self.dst,
            src_identity=cp.src_identity if cp else None, dst_identity=cp.dst_identity if cp else None,
            direction=redirect_direction(cp), summary=reason, latency_ms=round(elapsed_ns / 1e6, 3),
            latency_ns=elapsed_ns,
            rule_ids=rv.rule_ids if rv else (), policies=rv.policies if rv else (),
            http=HttpFlow(req.method, f"http://{req.host}{req.path}", req.path, f"HTTP/{req.version}", status,
                          recorded_headers(req.match_headers()))
            if req else HttpFlow("", "", "", "", status)))

    # ------------------------------------------------------------------ forwarding

    async def forward(self, req: Request, cp: ConnectionPolicy, verdict: RequestVerdict, t0: float) -> bool:
        """Forward an allowed request and relay its response; True if the connection stays usable."""
        self.response_started = False
        for attempt in (0, 1):
            try:
                up = await self.connect(cp)
            except UpstreamFailed as exc:
                return await self.upstream_error(req, cp, exc, t0, verdict, sent=False)
            reused = up.used
            try:
                await up.stream.write(req.serialize())
            except (ConnectionError, OSError):
                self.drop_upstream()
                if reused and attempt == 0:
                    continue
                return await self.upstream_error(req, cp, UpstreamFailed(503, "upstream write failed"), t0, verdict,
                                                 sent=False)
            recorded = False

            def answered(status: int) -> None:
                nonlocal recorded
                if not recorded:
                    recorded = True
                    self.record(req, cp, status, "forwarded", verdict.why, t0, verdict)

            upload = asyncio.create_task(self.upload(req, up)) if req.body != "none" else None
            relay = asyncio.create_task(self.relay(req, up, answered))
            tasks = {relay} | ({upload} if upload else set())
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if upload is not None and upload in done and upload.exception() is not None:
                # Bad framing inside the body, or the client went away: the backend holds an
                # incomplete request, so both connections end here (nothing more is forwarded).
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)
                self.drop_upstream()
                exc = upload.exception()
                if isinstance(exc, HttpError) and not self.response_started:
                    await self.refuse(exc, req, t0, cp)
                return False
            try:
                status, keep, tunnel = await relay
            except UpstreamFailed as exc:
                if upload is not None:
                    upload.cancel()
                    await asyncio.gather(upload, return_exceptions=True)
                self.drop_upstream()
                if exc.status == 0 and reused and attempt == 0 and upload is None:
                    continue  # stale keep-alive connection closed before answering: retry once
                return await self.upstream_error(req, cp, exc, t0, verdict, sent=exc.status == -1)
            if upload is not None:
                try:
                    await upload  # the response came first: finish reading (and discarding) the body
                except (HttpError, PeerClosed):
                    self.drop_upstream()  # body broke after the answer: the stream is out of sync
                    return False
            if tunnel:
                await self.tunnel(up)
                return False
            up.used = True
            return keep
        return False

    async def connect(self, cp: ConnectionPolicy) -> Upstream:
        if self.upstream is None:
            mark = from_proxy_mark(cp.src_identity) if self.server.mark else None
            self.upstream = await Upstream.open(self.dst, mark)
        return self.upstream

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.stream.close()
            self.upstream = None

    async def upstream_error(self, req: Request, cp: ConnectionPolicy, exc: UpstreamFailed, t0: float,
                             verdict: RequestVerdict, sent: bool) -> bool:
        status = 503 if exc.status in (0, 503) else 502
        self.record(req, cp, status, "error", exc.reason, t0, verdict)
        if not sent:  # nothing of the response reached the client yet: answer for the upstream
            try:
                await self.client.write(error_response(status))
            except (ConnectionError, OSError):
                pass
        return False

    async def upload(self, req: Request, up: Upstream) -> None:
        """Stream the request body upstream; keeps consuming it if the upstream goes away."""
        alive = True
        async for piece in self.client.body(req.body, req.length):
            if alive:
                try:
                    await up.stream.write(piece)
                except (ConnectionError, OSError):
                    alive = False

    async def relay(self, req: Request, up: Upstream, answered: Callable[[int], None]) -> tuple[int, bool, bool]:
        """Relay the response (after any 1xx); returns (status, client keep-alive, tunnel).

        `answered(status)` is called just before the client can see the end of the response
        (before its last byte is written), so the request's record exists by the time the
        client has its answer: a reader that sees the response also finds the record.

        Raises UpstreamFailed with status 0 (closed before any response byte), 502 (bad
        response, nothing sent to the client yet) or -1 (broken after the head was relayed)."""
        while True:
            try:
                head = await up.stream.read_head(502)
            except PeerClosed:
                raise UpstreamFailed(502, "upstream closed inside a response head") from None
            except HttpError as exc:
                raise UpstreamFailed(502, exc.reason) from None
            if head is None:
                raise UpstreamFailed(0, "upstream closed the connection before answering")
            try:
                resp = parse_response(head, req)
            except HttpError as exc:
                raise UpstreamFailed(502, exc.reason) from None
            if 100 <= resp.status < 200 and resp.status != 101:
                if req.version == "1.1":  # interim answers (100 Continue) are for HTTP/1.1 clients only
                    await self.client.write(response_head("1.1", resp.status, resp.reason, resp.headers))
                continue
            break
        if resp.status == 101:
            # Only an upgrade the proxy forwarded may become a tunnel: a 101 to a request whose
            # upgrade offer was removed (h2c) or never made would hand the connection to a
            # protocol the rules cannot check. Such an answer is a broken upstream: 502, close.
            if not req.upgrade:
                raise UpstreamFailed(502, "upstream switched protocols for a request without a forwarded upgrade")
            if not upgrade_accepted(req.upgrade, resp.upgrade):
                raise UpstreamFailed(502, f"upstream switched to {resp.upgrade!r}, not to the offered {req.upgrade!r}")
        tunnel = resp.status == 101 or (req.is_connect and 200 <= resp.status < 300)
        keep = req.keep_alive and not tunnel
        body_kind, framed = resp.body, True
        headers = list(resp.headers)
        if tunnel and resp.status == 101:
            headers += [("Connection", "Upgrade"), ("Upgrade", resp.upgrade)]
        elif resp.body == "none":
            if resp.content_length_header is not None and resp.status not in (204,) and resp.status >= 200:
                headers.append(("Content-Length", resp.content_length_header))  # HEAD / 304: as sent
        elif resp.body == "length":
            headers.append(("Content-Length", str(resp.length)))
        elif req.version == "1.1":  # chunked or close-delimited: (re-)chunk for an HTTP/1.1 client
            inner = [v for _, v in resp.extra]  # codings other than chunked stay on the payload
            headers.append(("Transfer-Encoding", ", ".join(inner + ["chunked"])))
        else:  # HTTP/1.0 client: no chunked; the end of the body is the end of the connection
            framed, keep = False, False
        if not tunnel:
            if not keep:
                headers.append(("Connection", "close"))
            elif req.version == "1.0":
                headers.append(("Connection", "keep-alive"))
        self.response_started = True
        if tunnel or body_kind == "none" or (body_kind == "length" and not resp.length):
            answered(resp.status)  # the head is the whole answer
        await self.client.write(response_head(req.version if req.version == "1.0" else "1.1", resp.status,
                                              resp.reason, headers))
        try:
            if body_kind == "close" and framed:
                async for piece in up.stream.body("close"):
                    await self.client.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                answered(resp.status)
                await self.client.write(LAST_CHUNK)
            elif body_kind == "length":
                remaining = resp.length
                async for piece in up.stream.body("length", resp.length, status=502):
                    remaining -= len(piece)
                    if not remaining:
                        answered(resp.status)
                    await self.client.write(piece)
            elif body_kind == "chunked":
                async for piece in up.stream.body("chunked", framed=framed, status=502):
                    if piece is LAST_CHUNK:  # the body's own terminator, never a data piece
                        answered(resp.status)
                    await self.client.write(piece)
            elif body_kind == "close":  # HTTP/1.0 client: the end is the close that follows
                async for piece in up.stream.body("close"):
                    await self.client.write(piece)
        except (HttpError, PeerClosed) as exc:
            raise UpstreamFailed(-1, f"upstream response body broken: {exc}") from None
        answered(resp.status)
        if tunnel:
            # The connection now belongs to the tunnel, with whatever the upstream already sent
            # after the head (a fast backend writes its 101 and first frame in one go): the
            # keep-alive bookkeeping below does not apply.
            return resp.status, False, True
        if not resp.keep_alive or body_kind == "close" or up.stream.buf:
            self.drop_upstream()  # never reuse a connection that might carry unread bytes
        return resp.status, keep, tunnel

    async def tunnel(self, up: Upstream) -> None:
        """After 101 / CONNECT 2xx: every byte both ways until either side closes.

        Bytes already buffered on either side at the switch (frames the client sent right after
        its handshake, the first frames a fast backend wrote with its 101) go first. A clean
        end of stream from one side is passed on as a half-close (write_eof), and the other
        direction goes on until its sender closes too; a reset or write error on either side
        ends both directions at once."""
        async def pipe(src: BufferedStream, dst: BufferedStream) -> None:
            if src.buf:
                pending = bytes(src.buf)
                src.buf.clear()
                await dst.write(pending)
            while True:
                data = await src.reader.read(PIECE)
                if not data:
                    break
                await dst.write(data)
            if dst.writer.can_write_eof():
                dst.writer.write_eof()

        directions = [asyncio.create_task(pipe(self.client, up.stream)),
                      asyncio.create_task(pipe(up.stream, self.client))]
        try:
            for finished in asyncio.as_completed(directions):
                try:
                    await finished
                except (ConnectionError, OSError, RuntimeError):
                    break  # broken, not closed: nothing more can be carried either way
        finally:
            for task in directions:
                task.cancel()
            await asyncio.gather(*directions, return_exceptions=True)


# The stream (TCP) protocols, by the name of their rules in the `l7` registry: the connection
# is served by the handler of the protocol of the rule sets that apply to it. HTTP is
# `ClientConnection` above; the others (DNS over TCP) are listed in proxy.handlers with the
# datagram ones, and get the `ClientConnection` as a `proxy.context.StreamConnection`.
STREAM_HANDLERS: dict[str, Callable[[ClientConnection], Awaitable[None]]] = {
    "http": ClientConnection.run, **PROTOCOL_STREAM_HANDLERS}


def _timeout_response(status: int) -> bytes:
    """408 Request Timeout or 504 Gateway Timeout, then close."""
    reason = "Gateway Timeout" if status == 504 else "Request Timeout"
    body = f"{reason}\r\n".encode()
    return response_head("1.1", status, reason, [("Content-Length", str(len(body))), ("Content-Type", "text/plain"),
                                                 ("Connection", "close")]) + body


def _buffered(transport: asyncio.BaseTransport | None) -> bool:
    try:
        return bool(transport.get_write_buffer_size())  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return False


def _abort_if_stuck(transport: asyncio.BaseTransport) -> None:
    """Reset a closed connection whose peer still has not taken what was left to send. (A
    transport that flushed and closed meanwhile is left alone: aborting it again is an error.)"""
    if _buffered(transport):
        transport.abort()  # type: ignore[attr-defined]


def install_uvloop() -> bool:
    """Use uvloop when installed (faster event loop); plain asyncio otherwise."""
    if os.environ.get("L7LAB_PROXY_NO_UVLOOP"):
        return False
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
