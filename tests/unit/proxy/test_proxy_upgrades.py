"""Upgrades through the proxy on loopback: h2c is never forwarded (a real h2c backend, hypercorn,
would otherwise take every later HTTP/2 request unchecked), only WebSocket upgrades become
tunnels, a 101 the proxy did not ask for is a 502, and a tunnel carries every byte both ways even
when the backend writes its 101 and its first frame in one go."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from wsproto.events import AcceptConnection, TextMessage

from proxy.events import EventLog
from proxy.server import ProxyServer
from proxy.state import Snapshot
from tests.support.http import Client, WebSocketClient, h2_after_upgrade
from tests.support.loopback import ADDRESSES, LoopThread, engine, remap
from tests.support.upgrade_backends import GREETING, listening_socket, serve_fast_websocket, serve_h2c

BACKEND_HOST = ADDRESSES["shop/backend"]


class ProxyTo:
    """An in-process proxy whose original destination is `port` on the backend's address, with
    the harness policy (GET /public(/.*)?, GET /upgrade, ... from frontend) on that port."""

    def __init__(self, loop: LoopThread, port: int) -> None:
        self.loop = loop
        eng = engine(port)
        self.proxy = ProxyServer(Snapshot(remap(eng.map_state(), eng)), "127.0.0.1", 0, transparent=False,
                                 mark=False, original_dst=(BACKEND_HOST, port), events=EventLog())
        loop.run(self.proxy.start())

    def client(self) -> Client:
        return Client(self.proxy.port)

    def close(self) -> None:
        self.loop.run(self.proxy.stop())


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def h2c(loop: LoopThread) -> Iterator[tuple[ProxyTo, Path]]:
    """hypercorn (honours h2c) behind a proxy; yields the proxy and hypercorn's request log."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "h2c.log"
        log.touch()
        sock = listening_socket(BACKEND_HOST, 0)
        port = sock.getsockname()[1]
        stop: asyncio.Event = loop.run(_event())
        task = asyncio.run_coroutine_threadsafe(serve_h2c(sock, str(log), stop), loop.loop)
        proxy = ProxyTo(loop, port)
        try:
            yield proxy, log
        finally:
            proxy.close()
            loop.loop.call_soon_threadsafe(stop.set)
            task.result(30)


async def _event() -> asyncio.Event:
    return asyncio.Event()


H2C_VARIANTS = {
    "with-settings": ("1.1", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: {s}\r\n"),
    "without-settings": ("1.1", "Connection: Upgrade\r\nUpgrade: h2c\r\n"),
    "letter-case": ("1.1", "connection: UPGRADE, http2-SETTINGS\r\nuPgRaDe: H2C\r\nhttp2-settings: {s}\r\n"),
    "http-1.0": ("1.0", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: {s}\r\n"),
    "settings-not-in-connection": ("1.1", "Connection: upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: {s}\r\n"),
}


@pytest.mark.parametrize("variant", sorted(H2C_VARIANTS))
def test_h2c_upgrade_is_a_plain_request_and_http2_never_reaches_the_backend(h2c, variant: str) -> None:
    proxy, log = h2c
    version, upgrade_headers = H2C_VARIANTS[variant]
    settings, h2_bytes = h2_after_upgrade("DELETE", f"/secret/{variant}")
    head = (f"GET /public/{variant} HTTP/{version}\r\nHost: backend\r\n"
            + upgrade_headers.format(s=settings.decode()) + "\r\n").encode()
    c = proxy.client()
    c.send(head)
    r = c.read_response()
    # The backend answered the plain GET over HTTP/1.1: no 101, so the client must not go on
    # with HTTP/2 -- and if it does anyway, its frames are not an HTTP/1 request.
    assert r.status == 200 and r.body == f"seen GET /public/{variant}".encode(), r
    c.send(h2_bytes)
    rest = c.rest_until_closed(10)
    c.close()
    if version == "1.1":  # the HTTP/2 preface read as the next HTTP/1 request: 400, close
        assert rest.startswith(b"HTTP/1.1 400 "), rest[:80]
    else:  # HTTP/1.0 without keep-alive: the connection ended with the answer
        assert rest == b"", rest[:80]
    assert log.read_text().splitlines()[-1] == f"GET /public/{variant} HTTP/1.1"
    assert "secret" not in log.read_text() and "HTTP/2" not in log.read_text()


def test_the_h2c_backend_does_switch_when_asked_directly(h2c) -> None:
    """The test's backend really honours h2c (otherwise the test above proves nothing)."""
    proxy, log = h2c
    port = proxy.proxy.original_dst[1]
    settings, h2_bytes = h2_after_upgrade("DELETE", "/secret/direct")
    with socket.create_connection((BACKEND_HOST, port), timeout=10) as s:
        s.sendall(b"GET /public/direct HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n" + h2_bytes)
        assert s.recv(12) == b"HTTP/1.1 101"
        for _ in range(200):
            if "DELETE /secret/direct HTTP/2" in log.read_text():
                break
            s.settimeout(0.05)
            try:
                s.recv(65536)
            except socket.timeout:
                pass
    assert "DELETE /secret/direct HTTP/2" in log.read_text()


@pytest.mark.parametrize("offer, forwarded", [
    ("h2c, foo", None),
    ("foo, h2c", None),
    ("TLS/1.0, h2c", None),
    ("websocket, h2c", "websocket"),
    ("h2c, WebSocket", "WebSocket"),
    ("h2c,websocket/13", "websocket/13"),
])
def test_upgrade_lists_keep_only_websocket(fresh, offer: str, forwarded: str | None) -> None:
    """The harness backend switches to the first protocol it is offered: only what the proxy
    forwards can be chosen, and h2c never is."""
    c = fresh.client()
    c.send(f"GET /upgrade HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {offer}\r\n"
           "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode())
    r = c.read_response()
    (seen,) = fresh.backend.requests
    names = {n.lower(): v for n, v in seen.headers}
    assert "http2-settings" not in names
    if forwarded is None:
        assert r.status == 200 and r.body == b"ok GET /upgrade"
        assert "upgrade" not in names and "connection" not in names
    else:
        assert r.status == 101 and r.headers["upgrade"] == forwarded
        assert names["upgrade"] == forwarded and names["connection"] == "Upgrade"
        c.send(b"through")
        got = b""
        while len(got) < 7:
            got += c.sock.recv(100)
        assert got == b"THROUGH"
    c.close()


class Always101:
    """A broken (or hostile) backend: answers every request head with a 101 carrying the given
    Upgrade line(s), then records whatever arrives after the head."""

    def __init__(self, loop: LoopThread, upgrade: str = "h2c") -> None:
        self.after_head = bytearray()
        self.heads: list[bytes] = []
        self.upgrade = upgrade
        self.server = loop.run(asyncio.start_server(self.handle, BACKEND_HOST, 0))
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            lines = b"".join(b"Upgrade: %b\r\n" % u.encode() for u in self.upgrade.split("|"))
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n%b\r\n" % lines)
            while data := await reader.read(65536):
                self.after_head += data
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("request_head, switched_to", [
    (b"GET /public/x HTTP/1.1\r\nHost: backend\r\n\r\n", "h2c"),  # no upgrade asked at all
    (b"GET /public/x HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", "h2c"),  # removed
    (b"GET /upgrade HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", "h2c"),
    (b"GET /upgrade HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", "websocket, h2c"),
    (b"GET /upgrade HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", "websocket|h2c"),
    (b"GET /upgrade HTTP/1.0\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", "websocket"),
])
def test_a_101_the_proxy_did_not_ask_for_is_a_502_and_never_a_tunnel(loop, request_head: bytes,
                                                                      switched_to: str) -> None:
    backend = Always101(loop, switched_to)
    proxy = ProxyTo(loop, backend.port)
    try:
        c = proxy.client()
        c.send(request_head)
        r = c.read_response()
        assert r.status == 502 and r.headers.get("connection") == "close"
        try:
            c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nframes")
        except OSError:
            pass
        assert c.closed()
        c.close()
        assert len(backend.heads) == 1 and b"h2c" not in backend.heads[0].lower()
        assert bytes(backend.after_head) == b""  # nothing after the head ever reached the backend
    finally:
        proxy.close()
        backend.server.close()


# ------------------------------------------------------------------ tunnels with a fast backend


@pytest.fixture(scope="module")
def fast_ws(loop: LoopThread) -> Iterator[tuple[ProxyTo, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ws.log"
        log.touch()
        sock = listening_socket(BACKEND_HOST, 0)
        port = sock.getsockname()[1]
        server = loop.run(serve_fast_websocket(sock, str(log)))
        proxy = ProxyTo(loop, port)
        try:
            yield proxy, log
        finally:
            proxy.close()
            server.close()


def test_fast_backend_101_and_first_frame_in_one_write_then_echo(fast_ws) -> None:
    proxy, log = fast_ws
    ws = WebSocketClient(proxy.client())
    ws.c.sock.settimeout(10)
    ws.handshake("/upgrade")
    assert isinstance(ws.next_event(), AcceptConnection)
    first = ws.next_event()
    assert isinstance(first, TextMessage) and first.data == GREETING
    for i in range(5):  # several frames after the handshake, each echoed
        ws.send_text(f"frame {i}")
        echo = ws.next_event()
        assert isinstance(echo, TextMessage) and echo.data == f"frame {i}"
    ws.c.close()
    lines = log.read_text().splitlines()
    assert lines[0] == "HANDSHAKE GET /upgrade" and lines[1:6] == [f"MESSAGE frame {i}" for i in range(5)]


def test_tunnel_half_close_still_delivers_the_other_direction(fresh) -> None:
    """Bytes sent right behind the handshake (buffered in the proxy at the switch) go first; the
    client then half-closes after its last bytes: they still arrive, and the backend's answer to
    them still comes back before the tunnel ends."""
    c = fresh.client()
    c.send(b"GET /upgrade HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nfirst ")
    assert c.read_response().status == 101
    c.send(b"and last")
    c.sock.shutdown(socket.SHUT_WR)
    got = c.rest_until_closed(10)
    c.close()
    assert got == b"FIRST AND LAST"


# ------------------------------------------------------------------ the oracle sees what the rules see

UPGRADE_HEADER_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend-l7, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: frontend}}]
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            http:
              - {method: GET, path: /ws, headers: ["Upgrade: websocket"]}
              - {method: GET, path: /h2, headers: ["Upgrade: h2c"]}
              - {method: GET, path: /settings, headerMatches: [{name: HTTP2-Settings}]}
              - {method: GET, path: /conn, headers: ["Connection: Upgrade"]}
"""

UPGRADE_HEADER_REQUESTS = [
    {"Connection": "Upgrade", "Upgrade": "websocket"},
    {"Connection": "Upgrade", "Upgrade": "h2c"},
    {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"},
    {"Connection": "upgrade", "Upgrade": "h2c, websocket"},
    {"Upgrade": "websocket"},  # no Connection: upgrade, so no upgrade at all
    {"HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"},
]


def test_the_oracle_sees_upgrade_headers_as_the_proxy_forwards_them(loop) -> None:
    from dataplane.policy import Flow
    from dataplane.scenario import HttpRequest

    from tests.support.loopback import Backend

    backend = Backend(BACKEND_HOST)
    loop.run(backend.start())
    eng = engine(backend.port, UPGRADE_HEADER_POLICY)
    proxy = ProxyServer(Snapshot(remap(eng.map_state(), eng)), "127.0.0.1", 0, transparent=False, mark=False,
                        original_dst=(BACKEND_HOST, backend.port), events=EventLog())
    loop.run(proxy.start())
    pod = eng.scenario.pods["shop/backend"]
    try:
        outcomes = []
        for path in ("/ws", "/h2", "/settings", "/conn"):
            for headers in UPGRADE_HEADER_REQUESTS:
                flow = Flow("shop/frontend", pod.ip, "TCP", backend.port, HttpRequest("GET", path, headers), "",
                            "backend")
                oracle = eng.verdict(flow).outcome
                c = Client(proxy.port)
                c.send((f"GET {path} HTTP/1.1\r\nHost: backend\r\n"
                        + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
                status = c.read_response().status
                c.close()
                outcomes.append((path, headers, status, oracle))
                assert (status in (101, 200)) == (oracle == "allowed"), (path, headers, status, oracle)
        allowed = [(p, h) for p, h, _, o in outcomes if o == "allowed"]
        # Only a forwarded WebSocket upgrade is visible to the rules; h2c and HTTP2-Settings never are.
        assert allowed == [("/ws", UPGRADE_HEADER_REQUESTS[0]), ("/ws", UPGRADE_HEADER_REQUESTS[3]),
                           ("/conn", UPGRADE_HEADER_REQUESTS[0]), ("/conn", UPGRADE_HEADER_REQUESTS[3])]
    finally:
        loop.run(proxy.stop())
        loop.run(backend.stop())
