"""Resource limits of the proxy on loopback: idle and header timeouts (slowloris), the progress
timeout (a peer that stops reading or sending mid-body; a slow transfer that keeps moving is
never cut), connection caps per source identity and overall (503, recorded, other identities
served) and bounded buffering (a peer that does not read stops the proxy from reading).

Each test runs its own proxy with short limits, in front of the recording backend of the other
proxy tests and of a stalling backend that answers by path: /public/stall-head never answers,
/public/stall-body sends a head and part of the body then nothing, /public/delay answers after a
while, /public/flood answers without end, /upload reads the request head and then never reads
again.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from proxy import __main__ as proxy_main
from proxy.events import EventLog
from proxy.limits import Limits
from proxy.server import ProxyServer
from proxy.state import Snapshot
from tests.support.http import Client
from tests.support.loopback import ADDRESSES, Backend, LoopThread, engine, remap
from tests.support.wait import wait_for

FRONTEND, STRANGER = ADDRESSES["shop/frontend"], ADDRESSES["shop/stranger"]
DEADLINE = 20.0  # "eventually": generous on a loaded machine; the limits under test are < 1 s


class StallBackend:
    """An HTTP server on the backend's address that misbehaves on purpose (see the module doc)."""

    def __init__(self, host: str) -> None:
        self.host, self.port = host, 0
        self.heads: list[bytes] = []
        self.closed = 0  # connections the proxy closed
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.flood_sent = 0  # /public/flood: bytes of the endless answer the proxy took so far
        self.flood_moved_at = 0.0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0, limit=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            path = head.split(b" ")[1]
            if path == b"/public/stall-body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
                await writer.drain()
            elif path == b"/public/flood":  # an endless answer, for a client that does not read
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
                piece = b"f" * 65536
                while True:
                    writer.write(piece)
                    await writer.drain()
                    self.flood_sent += len(piece)
                    self.flood_moved_at = time.monotonic()
            elif path == b"/public/delay":
                await asyncio.sleep(3.0)  # longer than the idle timeout of the test
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndelayed")
                await writer.drain()
            if path == b"/upload":
                await asyncio.sleep(3600)  # never read the body
            while await reader.read(65536):  # /public/stall-head too: nothing written; wait for the close
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()
            self._tasks.discard(task)


class LimitsLab:
    """Both backends on 127.0.0.3 (pod shop/backend) and a factory of proxies with given limits."""

    def __init__(self) -> None:
        self.loop = LoopThread()
        self.backend = Backend(ADDRESSES["shop/backend"])
        self.stall = StallBackend(ADDRESSES["shop/backend"])
        self.loop.run(self.backend.start())
        self.loop.run(self.stall.start())
        self.proxies: list[ProxyServer] = []

    def proxy(self, backend: Backend | StallBackend, **limits: float) -> ProxyServer:
        eng = engine(backend.port)
        proxy = ProxyServer(Snapshot(remap(eng.map_state(), eng)), "127.0.0.1", 0, transparent=False, mark=False,
                            original_dst=(backend.host, backend.port), events=EventLog(),
                            limits=replace(Limits(), **limits))
        self.loop.run(proxy.start())
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            self.loop.run(proxy.stop())
        self.loop.run(self.backend.stop())
        self.loop.run(self.stall.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[LimitsLab]:
    lab = LimitsLab()
    yield lab
    lab.close()


def records(proxy: ProxyServer, verdict: str | None = None) -> list:
    return [r for r in proxy.events.records if verdict is None or r.verdict == verdict]


# --------------------------------------------------------------------------- idle and header timeouts


def test_idle_keep_alive_connection_is_closed_quietly(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.backend, idle_timeout=0.5)
    c = Client(proxy.port, FRONTEND)
    assert c.request("GET", "/public/a").status == 200
    assert c.closed_by_peer(DEADLINE)  # nothing more sent: closed after the idle timeout, no 408
    assert c.buf == b""
    silent = Client(proxy.port, FRONTEND)  # a new connection that never sends a byte
    assert silent.closed_by_peer(DEADLINE)
    assert [(r.http.path, r.http.code) for r in records(proxy)] == [("/public/a", 200)]  # idle closes are not errors


def test_idle_timeout_never_cuts_a_request_in_flight(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.stall, idle_timeout=1.0, header_timeout=1.0)
    c = Client(proxy.port, FRONTEND)
    resp = c.request("GET", "/public/delay")  # the backend answers after 3 s
    assert (resp.status, resp.body) == (200, b"delayed")
    assert c.request("GET", "/private").status == 403  # and the connection is still usable


def test_header_timer_starts_with_the_first_byte(lab: LimitsLab) -> None:
    """A connection idle for longer than the header timeout (within the idle timeout) is served."""
    proxy = lab.proxy(lab.backend, idle_timeout=30, header_timeout=0.3)
    c = Client(proxy.port, FRONTEND)
    time.sleep(0.6)  # stay idle past the header timeout: that alone must not end the connection
    assert c.request("GET", "/public/late").status == 200


def test_slowloris_heads_get_408_while_others_are_served(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.backend, header_timeout=0.5)
    slow = [Client(proxy.port, FRONTEND) for _ in range(3)]
    head = b"GET /public/slowloris HTTP/1.1\r\nHost: backend\r\nX-Pad: " + b"a" * 200
    sent = 0
    while not all(c.buf for c in slow) and sent < len(head):  # one byte each per round, until answered
        for c in slow:
            try:
                c.send(head[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                pass
            c.sock.setblocking(False)
            try:
                c.buf += c.sock.recv(65536)
            except (BlockingIOError, ConnectionResetError):
                pass
            c.sock.setblocking(True)
        other = Client(proxy.port, STRANGER)  # another identity: answered at once meanwhile
        assert other.request("GET", "/private").status == 403
        other.close()
        sent += 1
        time.sleep(0.05)
    for c in slow:
        c.sock.settimeout(DEADLINE)
        resp = c.read_response()
        assert (resp.status, resp.headers.get("connection")) == (408, "close")
        assert c.closed_by_peer(DEADLINE)
    assert "/public/slowloris" not in [s.url for s in lab.backend.requests]
    timeouts = [r for r in records(proxy, "error") if r.http.code == 408]
    assert len(timeouts) == 3 and all(r.summary == "no complete request head in time" for r in timeouts)


# --------------------------------------------------------------------------- progress timeout


def test_upstream_that_stops_sending_mid_body_is_cut(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.stall, progress_timeout=0.5)
    c = Client(proxy.port, FRONTEND)
    c.send(b"GET /public/stall-body HTTP/1.1\r\nHost: backend\r\n\r\n")
    got = []
    with pytest.raises(ConnectionError):
        c.read_response(sink=got.append)  # 1000 of the announced 100000 bytes, then the close
    assert 0 < len(b"".join(got) + c.buf) < 100000
    (rec,) = wait_for("the record of the cut exchange", lambda: records(proxy, "error"), DEADLINE)
    assert (rec.http.path, rec.http.code) == ("/public/stall-body", 502) and "progress timeout" in rec.summary
    wait_for("the upstream connection to be closed", lambda: lab.stall.closed >= 1, DEADLINE)


def test_upstream_that_never_answers_gets_504(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.stall, progress_timeout=0.5)
    c = Client(proxy.port, FRONTEND)
    c.sock.settimeout(DEADLINE)
    resp = c.request("GET", "/public/stall-head")
    assert (resp.status, resp.headers.get("connection")) == (504, "close")
    assert c.closed_by_peer(DEADLINE)
    (rec,) = records(proxy, "error")
    assert rec.http.code == 504 and "no progress for 0.5 s" in rec.summary


def test_client_that_stops_sending_its_body_gets_408(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.backend, progress_timeout=0.5)
    c = Client(proxy.port, FRONTEND)
    c.sock.settimeout(DEADLINE)
    c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nContent-Length: 100000\r\n\r\n" + b"u" * 1000)
    resp = c.read_response()  # and nothing more is sent
    assert (resp.status, resp.headers.get("connection")) == (408, "close")
    assert c.closed_by_peer(DEADLINE)
    assert not [s for s in lab.backend.requests if s.url == "/upload" and s.body_len == 100000]
    assert [(r.http.path, r.http.code) for r in records(proxy, "error")] == [("/upload", 408)]
    other = Client(proxy.port, FRONTEND)  # the proxy serves on
    assert other.request("GET", "/public/after").status == 200


def test_client_that_stops_reading_is_cut(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.backend, progress_timeout=0.5)
    c = Client(proxy.port, FRONTEND)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    size = 256 * 1024 * 1024
    c.send(b"GET /big/%d HTTP/1.1\r\nHost: backend\r\n\r\n" % size)  # and never read
    (rec,) = wait_for("the record of the cut exchange", lambda: records(proxy, "error"), DEADLINE)
    assert (rec.http.path, rec.http.code) == (f"/big/{size}", 502) and "progress timeout" in rec.summary
    assert c.count_until_closed(DEADLINE) < size


def test_slow_but_moving_transfer_is_never_cut(lab: LimitsLab) -> None:
    """Read 4 MB at a trickle for far longer than the progress timeout: every byte arrives."""
    proxy = lab.proxy(lab.backend, progress_timeout=1.0, idle_timeout=1.0)
    c = Client(proxy.port, FRONTEND)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    size = 4 * 1024 * 1024
    c.send(b"GET /big/%d HTTP/1.1\r\nHost: backend\r\n\r\n" % size)
    started = time.monotonic()
    got: list[bytes] = []
    resp = c.read_response(sink=got.append, pace=(0.003, 4096))
    assert resp.status == 200 and sum(map(len, got)) == size
    assert time.monotonic() - started > 2.0  # it did take longer than the timeout: the test means something
    assert not records(proxy, "error")


# --------------------------------------------------------------------------- connection caps


def admitted(proxy: ProxyServer, source: str) -> Client:
    """A connection whose request was answered by the proxy (so it is counted)."""
    c = Client(proxy.port, source)
    assert c.request("GET", "/public/held").status == (200 if source == FRONTEND else 403)
    return c


def refused(proxy: ProxyServer, source: str) -> None:
    c = Client(proxy.port, source)
    c.sock.settimeout(DEADLINE)
    c.send(b"GET /public/over HTTP/1.1\r\nHost: backend\r\n\r\n")
    resp = c.read_response()
    assert (resp.status, resp.headers.get("connection")) == (503, "close")
    assert c.closed_by_peer(DEADLINE)


def test_connection_caps_per_identity_and_overall(lab: LimitsLab) -> None:
    proxy = lab.proxy(lab.backend, max_connections=3, max_connections_per_identity=2)
    a = [admitted(proxy, FRONTEND), admitted(proxy, FRONTEND)]
    refused(proxy, FRONTEND)  # a third from the same identity
    b = admitted(proxy, STRANGER)  # another identity is still served
    refused(proxy, STRANGER)  # the proxy as a whole is full now
    errors = records(proxy, "error")
    assert [r.http.code for r in errors] == [503, 503]
    frontend = proxy.snapshot.identity_of(FRONTEND)
    assert (errors[0].source.ip, errors[0].source.name, errors[0].source.identity) == (FRONTEND, "shop/frontend", frontend)
    assert errors[0].summary == (f"connection limit: identity {frontend} already has 2 connections open "
                                "(max-connections-per-identity 2)")
    assert errors[1].summary == "connection limit: the proxy already has 3 connections open (max-connections 3)"
    assert "/public/over" not in [s.url for s in lab.backend.requests]
    # Held connections still work; once one closes, its identity may open another.
    assert a[1].request("GET", "/public/again").status == 200
    a[0].close()
    wait_for("a new connection of the frontend to be admitted", lambda: _served(proxy, FRONTEND), DEADLINE)
    b.close()


def _served(proxy: ProxyServer, source: str) -> bool:
    c = Client(proxy.port, source)
    try:
        return c.request("GET", "/public/retry").status == 200
    except ConnectionError:
        return False
    finally:
        c.close()


# --------------------------------------------------------------------------- bounded buffers


def test_a_peer_that_does_not_read_stops_the_proxy_reading(lab: LimitsLab) -> None:
    """Upload to a backend that never reads the body: the proxy stops taking bytes from the
    client (flow control) instead of buffering them; what it took is bounded by socket buffers."""
    proxy = lab.proxy(lab.stall, progress_timeout=30)
    c = Client(proxy.port, FRONTEND)
    size = 512 * 1024 * 1024
    c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n" % size)
    c.sock.setblocking(False)
    piece, sent = b"b" * (1 << 20), 0
    while sent < size:
        # until the socket stays unwritable for a while: the whole path is full
        if not select.select([], [c.sock], [], 2.0)[1]:
            break
        try:
            sent += c.sock.send(piece)
        except BlockingIOError:
            continue
    assert sent < 96 * 1024 * 1024, f"the proxy took {sent} bytes for a backend that reads nothing"
    c.close()


def test_a_client_that_does_not_read_stops_the_proxy_reading_upstream(lab: LimitsLab) -> None:
    """An endless answer to a client that reads nothing: the proxy stops taking it from the
    backend once the buffers on the way are full, instead of holding it in memory."""
    proxy = lab.proxy(lab.stall, progress_timeout=30)
    c = Client(proxy.port, FRONTEND)
    c.send(b"GET /public/flood HTTP/1.1\r\nHost: backend\r\n\r\n")  # and never read
    wait_for("the backend to be held back", lambda: lab.stall.flood_sent and
             time.monotonic() - lab.stall.flood_moved_at > 2.0)
    assert lab.stall.flood_sent < 96 * 1024 * 1024, f"the proxy took {lab.stall.flood_sent} bytes"
    c.close()


# --------------------------------------------------------------------------- DNS


DNS_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns, namespace: shop}
spec:
  endpointSelector: {matchExpressions: [{key: app, operator: In, values: [frontend, stranger]}]}
  egress:
    - toEndpoints: [{matchLabels: {app: backend}}]
      toPorts:
        - ports: [{port: "PORT", protocol: UDP}]
          rules:
            dns: [{matchPattern: "*"}]
"""


class SilentDns(asyncio.DatagramProtocol):
    """A DNS server on the backend's address that never answers: every query stays in flight."""

    def __init__(self) -> None:
        self.names: list[str] = []  # the question of every query that reached it

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        import dns.message

        self.names.append(dns.message.from_wire(data).question[0].name.to_text(omit_final_dot=True))


def test_dns_queries_in_flight_are_capped_per_identity(lab: LimitsLab, monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.message

    from proxy import dns as proxy_dns

    monkeypatch.setattr(proxy_dns, "UPSTREAM_TIMEOUT_S", 60.0)  # nothing leaves flight during the test
    server = SilentDns()

    async def listen() -> tuple[asyncio.DatagramTransport, int]:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: server, local_addr=(ADDRESSES["shop/backend"], 0))
        return transport, transport.get_extra_info("sockname")[1]
    transport, port = lab.loop.run(listen())
    eng = engine(port, DNS_POLICY)
    proxy = ProxyServer(Snapshot(remap(eng.map_state(), eng)), "127.0.0.1", 0, transparent=False, mark=False,
                        original_dst=(ADDRESSES["shop/backend"], port), events=EventLog())
    lab.loop.run(proxy.start())
    lab.proxies.append(proxy)
    try:
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.bind((FRONTEND, 0))
        sent = proxy_dns.MAX_IN_FLIGHT_PER_IDENTITY + 20
        for i in range(sent):
            flood.sendto(dns.message.make_query(f"q{i}.example", "A").to_wire(), ("127.0.0.1", proxy.port))
        drops = wait_for("the queries over the cap to be dropped", lambda: len(
            [r for r in records(proxy, "error") if "too many queries in flight from identity" in r.summary]) == 20)
        assert drops
        wait_for("the queries within the cap to reach the server",
                 lambda: len(server.names) == proxy_dns.MAX_IN_FLIGHT_PER_IDENTITY)
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # another identity still gets through
        other.bind((STRANGER, 0))
        other.sendto(dns.message.make_query("other.example", "A").to_wire(), ("127.0.0.1", proxy.port))
        wait_for("the other identity's query to reach the server", lambda: "other.example" in server.names, DEADLINE)
        flood.close()
        other.close()
    finally:
        lab.loop.run(proxy.stop())
        lab.proxies.remove(proxy)
        transport.close()


# --------------------------------------------------------------------------- settings


def test_limits_spec_and_flags() -> None:
    assert Limits.parse("idle-timeout=5, max-connections=100") == replace(Limits(), idle_timeout=5.0,
                                                                          max_connections=100)
    for bad, message in (("idle=5", "expected NAME=VALUE"), ("max-connections=1.5", "an integer"),
                         ("header-timeout=0", "greater than 0"), ("progress-timeout=nan", "greater than 0"),
                         ("idle-timeout", "expected NAME=VALUE")):
        with pytest.raises(ValueError, match=message):
            Limits.parse(bad)
    args = proxy_main.parse_args(["--lab", "x", "--state", "s", "--limits", "header-timeout=2,max-connections=9",
                                  "--max-connections", "7"])
    assert args.limits == replace(Limits(), header_timeout=2.0, max_connections=7)  # the flag wins
    with pytest.raises(SystemExit) as exc:
        proxy_main.parse_args(["--lab", "x", "--state", "s", "--limits", "nope=1"])
    assert exc.value.code == 2


def test_max_connections_fits_the_open_files_limit(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setattr(proxy_main.resource, "getrlimit", lambda _: (1024, 2048))
    monkeypatch.setattr(proxy_main.resource, "setrlimit", lambda _, value: None)
    limits = proxy_main.fit_open_files(Limits(max_connections=4096), "t")
    assert limits.max_connections == (2048 - proxy_main.FD_RESERVE) // 2
    assert "max-connections lowered from 4096" in capsys.readouterr().err
    assert proxy_main.fit_open_files(Limits(max_connections=100), "t").max_connections == 100
