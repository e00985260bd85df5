"""The proxy's DNS side on loopback, over UDP and TCP: DNS over TCP (allowed, refused, pipelined
queries answered out of order, malformed and oversized messages) and the learning of an
answer's addresses through the FQDN learner's socket before the answer is released (the exact
request, the answer held until the learner replied, a learner that is absent, slow, refusing or
broken).

The upstream is a small dnspython server on the backend's address (127.0.0.3), on UDP and TCP
at one port; the learner a Unix socket server that holds its replies until the test releases them.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from l7.dns import DnsFlow
from proxy.dnstcp import MAX_QUERY_BYTES
from proxy.events import EventLog
from proxy.fqdn import FqdnLearner
from proxy.limits import Limits
from proxy.server import ProxyServer
from proxy.state import Snapshot
from tests.support.loopback import ADDRESSES, LoopThread, engine, remap
from tests.support.wait import wait_for

FRONTEND, BACKEND = ADDRESSES["shop/frontend"], ADDRESSES["shop/backend"]
TIMEOUT = 20.0  # socket timeouts: generous on a loaded machine, never reached when the code is right

DNS_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
    - toEndpoints: [{matchLabels: {app: backend}}]
      toPorts:
        - ports: [{port: "PORT", protocol: ANY}]
          rules:
            dns: [{matchPattern: "*.example.com"}]
"""

ZONE = {  # name -> records of the answer, as (owner, type, ttl, data)
    "www.example.com": [("www.example.com", "A", 30, "203.0.113.20")],
    "api.example.com": [("api.example.com", "CNAME", 30, "www.example.com"),
                        ("www.example.com", "A", 30, "203.0.113.20")],
    "v6.example.com": [("v6.example.com", "AAAA", 60, "2001:db8::6"), ("v6.example.com", "A", 60, "203.0.113.6")],
    "slow.example.com": [("slow.example.com", "A", 30, "203.0.113.9")],  # answered once `release_slow` is set
    "other.example.com": [("other.example.com", "A", 30, "203.0.113.21")],
}


class Upstream:
    """A DNS server on UDP and TCP at one port: answers from ZONE, NXDOMAIN otherwise."""

    def __init__(self) -> None:
        self.port = 0
        self.seen: list[tuple[str, str]] = []  # (transport, name) of every question it got
        self.release_slow = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._tcp, BACKEND, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                asyncio.get_running_loop().create_task(self.reply(data, addr))

            async def reply(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(await upstream.answer(data, "UDP"), addr)  # type: ignore[attr-defined]

        self._udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=(BACKEND, self.port))

    async def stop(self) -> None:
        assert self._server is not None and self._udp is not None
        self._server.close()
        self._udp.close()

    async def answer(self, data: bytes, transport: str) -> bytes:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        self.seen.append((transport, name))
        if name == "slow.example.com":
            await self.release_slow.wait()
        reply = dns.message.make_response(query)
        if name not in ZONE:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        for owner, kind, ttl, value in ZONE.get(name, []):
            reply.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", kind,
                                                    value + "." if kind == "CNAME" else value))
        return reply.to_wire()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                data = await reader.readexactly(length)
                answer = await self.answer(data, "TCP")
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class FakeLearner:
    """The lab's FQDN learner as the proxy sees it: JSON lines on a Unix socket. Requests are
    kept; a reply waits until `release` is set, except for names in `at_once`. `mode`: "ok",
    "refuse" (ok false), "silent" (never replies), "hangup" (closes the connection on the
    first request it gets, then serves the next connection normally)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict] = []
        self.release = asyncio.Event()
        self.at_once: set[str] = set()
        self.mode = "ok"
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        tasks = []
        try:
            while line := await reader.readline():
                request = json.loads(line)
                self.requests.append(request)
                if self.mode == "hangup":
                    self.mode = "ok"
                    break
                tasks.append(asyncio.get_running_loop().create_task(self._reply(request, writer)))
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _reply(self, request: dict, writer: asyncio.StreamWriter) -> None:
        if self.mode == "silent":
            return
        if request["qname"] not in self.at_once:
            await self.release.wait()
        if self.mode == "refuse":
            reply = {"id": request["id"], "ok": False, "error": "policy engine busy"}
        else:
            ips = [r["data"] for r in request["records"] if r["type"] in ("A", "AAAA")]
            reply = {"id": request["id"], "ok": True, "learned": [{"selector": "matchPattern *.example.com", "ips": ips}]}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()


class DnsLab:
    def __init__(self, tmp: Path) -> None:
        self.loop = LoopThread()
        self.upstream = Upstream()
        self.loop.run(self.upstream.start())
        eng = engine(self.upstream.port, DNS_POLICY)
        self.snapshot = Snapshot(remap(eng.map_state(), eng))
        self.tmp = tmp
        self.proxies: list[ProxyServer] = []
        self.learners: list[FqdnLearner] = []
        self.fakes: list[FakeLearner] = []

    def proxy(self, learner: FqdnLearner | None = None, **limits: float) -> ProxyServer:
        proxy = ProxyServer(self.snapshot, "127.0.0.1", 0, transparent=False, mark=False,
                            original_dst=(BACKEND, self.upstream.port), events=EventLog(),
                            limits=replace(Limits(), **limits), learner=learner)
        self.loop.run(proxy.start())
        self.proxies.append(proxy)
        return proxy

    def learning_proxy(self, mode: str = "ok", timeout: float = 30.0) -> tuple[ProxyServer, FakeLearner]:
        fake = FakeLearner(self.tmp / f"fqdn{len(self.fakes)}.sock")
        fake.mode = mode
        self.loop.run(fake.start())
        self.fakes.append(fake)
        learner = FqdnLearner(str(fake.path), timeout)
        self.learners.append(learner)
        return self.proxy(learner), fake

    def release(self, fake: FakeLearner) -> None:
        async def go() -> None:
            fake.release.set()
        self.loop.run(go())

    def close(self) -> None:
        async def release_all() -> None:
            self.upstream.release_slow.set()
            for fake in self.fakes:
                fake.release.set()
        self.loop.run(release_all())
        for proxy in self.proxies:
            self.loop.run(proxy.stop())
        for learner in self.learners:
            self.loop.run(learner.close())
        for fake in self.fakes:
            self.loop.run(fake.stop())
        self.loop.run(self.upstream.stop())
        self.loop.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DnsLab]:
    lab = DnsLab(tmp_path)
    yield lab
    lab.close()


# --------------------------------------------------------------------------- clients


def query(name: str, kind: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, kind)


class TcpClient:
    def __init__(self, port: int, source: str = FRONTEND) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT, source_address=(source, 0))

    def send(self, *messages: dns.message.Message | bytes) -> None:
        wire = [m if isinstance(m, bytes) else m.to_wire() for m in messages]
        self.sock.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wire))

    def receive(self) -> dns.message.Message:
        return dns.message.from_wire(self.receive_wire())

    def receive_wire(self) -> bytes:
        return self._exact(struct.unpack("!H", self._exact(2))[0])

    def pending(self) -> bool:
        """Whether anything (an answer, or the close) has arrived, without waiting."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def closed(self) -> bool:
        """True once the proxy has closed the connection (end of stream or reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = self.sock.recv(n - len(data))
            assert piece, "the proxy closed the connection"
            data += piece
        return data

    def close(self) -> None:
        self.sock.close()


class UdpClient:
    def __init__(self, port: int, source: str = FRONTEND) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(TIMEOUT)

    def send(self, message: dns.message.Message) -> None:
        self.sock.send(message.to_wire())

    def receive(self) -> dns.message.Message:
        return dns.message.from_wire(self.sock.recv(65535))

    def pending(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()


def client(transport: str, port: int) -> TcpClient | UdpClient:
    return TcpClient(port) if transport == "TCP" else UdpClient(port)


def addresses(reply: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in reply.answer for rd in rrset]


def dns_records(proxy: ProxyServer) -> list:
    return [r for r in proxy.events.records if r.dns is not None]


# --------------------------------------------------------------------------- DNS over TCP


def test_an_allowed_query_over_tcp_is_answered_by_the_server_and_recorded(lab: DnsLab) -> None:
    proxy = lab.proxy()
    c = TcpClient(proxy.port)
    sent = query("WWW.Example.com")
    c.send(sent)
    reply = c.receive()
    assert reply.id == sent.id and reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["203.0.113.20"]
    assert lab.upstream.seen == [("TCP", "www.example.com")]  # forwarded over TCP, as asked
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert (record.verdict, record.l4.protocol, record.source.ip, record.destination.port) == \
        ("forwarded", "TCP", FRONTEND, lab.upstream.port)
    assert record.dns == DnsFlow("www.example.com", ("A",), 0, ("203.0.113.20",), 30, (), ("A",))
    assert record.policy.policies == ("CiliumNetworkPolicy shop/dns",)
    # The connection stays open for the next query.
    c.send(query("nothing.example.com"))
    assert c.receive().rcode() == dns.rcode.NXDOMAIN
    c.close()


def test_a_name_no_rule_allows_is_refused_on_the_connection_and_never_forwarded(lab: DnsLab) -> None:
    proxy = lab.proxy()
    c = TcpClient(proxy.port)
    sent = query("www.example.org")
    c.send(sent)
    reply = c.receive()
    assert reply.id == sent.id and reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert lab.upstream.seen == []
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert (record.verdict, record.l4.protocol, record.dns.query, record.dns.rcode) == \
        ("denied", "TCP", "www.example.org", dns.rcode.REFUSED)
    assert "matches no DNS rule" in record.summary
    c.send(query("www.example.com"))  # still usable
    assert addresses(c.receive()) == ["203.0.113.20"]
    c.close()


def test_pipelined_queries_are_answered_as_their_answers_come(lab: DnsLab) -> None:
    """Two queries in one write: the one the server holds back does not hold up the other,
    whose answer comes first; each answer carries its own query's id."""
    proxy = lab.proxy()
    c = TcpClient(proxy.port)
    slow, fast = query("slow.example.com"), query("www.example.com")
    c.send(slow, fast)
    first = c.receive()
    assert first.id == fast.id and addresses(first) == ["203.0.113.20"]
    assert ("TCP", "slow.example.com") in lab.upstream.seen
    assert not c.pending()  # the slow one is still held by the server
    lab.loop.run(_set(lab.upstream.release_slow))
    second = c.receive()
    assert second.id == slow.id and addresses(second) == ["203.0.113.9"]
    records = wait_for("both records", lambda: len(dns_records(proxy)) == 2 and dns_records(proxy))
    assert [r.dns.query for r in records] == ["www.example.com", "slow.example.com"]
    c.close()


def test_several_questions_in_one_message_are_answered_formerr_and_the_connection_stays(lab: DnsLab) -> None:
    proxy = lab.proxy()
    smuggled = query("www.example.com")
    smuggled.question.append(dns.rrset.RRset(dns.name.from_text("www.example.org"), dns.rdataclass.IN,
                                             dns.rdatatype.A))
    c = TcpClient(proxy.port)
    c.send(smuggled)
    reply = dns.message.from_wire(c.receive_wire(), question_only=True)
    assert reply.id == smuggled.id and reply.rcode() == dns.rcode.FORMERR
    assert lab.upstream.seen == []
    c.send(query("www.example.com"))
    assert addresses(c.receive()) == ["203.0.113.20"]
    c.close()


@pytest.mark.parametrize("length,why", [(5, "a DNS message of 5 bytes"), (0, "a DNS message of 0 bytes"),
                                        (MAX_QUERY_BYTES + 1, f"a DNS message of {MAX_QUERY_BYTES + 1} bytes")])
def test_a_length_out_of_bounds_closes_the_connection(lab: DnsLab, length: int, why: str) -> None:
    """Shorter than a DNS header or longer than a query can be: recorded and closed at once, with
    no need for the announced bytes to arrive (an oversized one is never buffered)."""
    proxy = lab.proxy()
    c = TcpClient(proxy.port)
    c.sock.sendall(struct.pack("!H", length) + b"\x00" * min(length, 5))
    assert c.closed()
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert record.verdict == "error" and why in record.summary and record.l4.protocol == "TCP"
    assert lab.upstream.seen == []
    c.close()


def test_a_message_that_is_not_dns_closes_the_connection_after_the_answers_owed(lab: DnsLab) -> None:
    proxy = lab.proxy()
    c = TcpClient(proxy.port)
    allowed = query("www.example.com")
    c.send(allowed, b"\xff" * 20)
    assert c.receive().id == allowed.id
    assert c.closed()
    records = wait_for("two records", lambda: len(dns_records(proxy)) == 2 and dns_records(proxy))
    junk = next(r for r in records if r.verdict == "error")
    assert junk.summary == "not a DNS query: connection closed"
    c.close()


def test_an_http_request_on_a_dns_port_ends_in_a_clean_close(lab: DnsLab) -> None:
    """What is no DNS ends the connection with an end of stream the client can read (not a reset,
    which its unread request would otherwise cause), and nothing reaches the server."""
    proxy = lab.proxy()
    c = TcpClient(proxy.port)
    c.sock.sendall(b"GET / HTTP/1.1\r\n")
    record = wait_for("the record", lambda: dns_records(proxy))[0]  # the proxy has decided: not DNS
    c.sock.sendall(b"Host: backend\r\nConnection: close\r\n\r\n")  # and the client goes on
    assert c.sock.recv(65536) == b""  # a reset would raise ConnectionResetError here
    assert record.verdict == "error" and record.summary.startswith(f"a DNS message of {0x4745} bytes")
    assert lab.upstream.seen == []
    c.close()


def test_an_incomplete_message_is_given_the_header_timeout(lab: DnsLab) -> None:
    proxy = lab.proxy(header_timeout=0.3)
    c = TcpClient(proxy.port)
    c.sock.sendall(struct.pack("!H", 40) + b"\x00" * 10)  # and the rest never comes
    assert c.closed()
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert "no complete DNS message within 0.3 s" in record.summary
    c.close()


def test_an_idle_connection_is_closed_quietly(lab: DnsLab) -> None:
    proxy = lab.proxy(idle_timeout=0.3)
    c = TcpClient(proxy.port)
    c.send(query("www.example.com"))
    c.receive()
    assert c.closed()
    assert len(dns_records(proxy)) == 1  # the query's; the close itself is not recorded
    c.close()


def test_a_server_that_refuses_the_forward_gets_the_client_refused(lab: DnsLab) -> None:
    """Nothing listens at the original destination: the proxy answers REFUSED (as Cilium's DNS
    proxy does when it cannot forward), on UDP (ICMP port unreachable) and TCP (a reset)."""
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind((BACKEND, 0))
    port = closed.getsockname()[1]
    closed.close()  # a port nothing listens on, TCP or UDP (probably: it was free a moment ago)
    eng = engine(port, DNS_POLICY)
    proxy = ProxyServer(Snapshot(remap(eng.map_state(), eng)), "127.0.0.1", 0, transparent=False, mark=False,
                        original_dst=(BACKEND, port), events=EventLog())
    lab.loop.run(proxy.start())
    lab.proxies.append(proxy)
    for transport in ("TCP", "UDP"):
        c = client(transport, proxy.port)
        c.send(query("www.example.com"))
        reply = c.receive()
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer, transport
        c.close()
    records = wait_for("both records", lambda: len(dns_records(proxy)) == 2 and dns_records(proxy))
    assert all(r.verdict == "error" and "cannot forward" in r.summary for r in records)


# --------------------------------------------------------------------------- learning before release


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_the_answer_is_released_only_after_the_learner_replied(lab: DnsLab, transport: str) -> None:
    proxy, fake = lab.learning_proxy()
    c = client(transport, proxy.port)
    sent = query("API.example.com")
    c.send(sent)
    request = dict(wait_for("the learner to be asked", lambda: fake.requests and fake.requests[0]))
    assert isinstance(request.pop("id"), int)
    assert request == {
        "op": "learn", "endpoint_ip": FRONTEND, "src_identity": proxy.snapshot.identity_of(FRONTEND),
        "server": f"{BACKEND}:{lab.upstream.port}", "qname": "api.example.com", "qtype": "A", "rcode": 0,
        "records": [{"name": "api.example.com", "type": "CNAME", "ttl": 30, "data": "www.example.com"},
                    {"name": "www.example.com", "type": "A", "ttl": 30, "data": "203.0.113.20"}]}
    # The server has answered, the learner has not: the client has nothing yet.
    assert ("api.example.com" in [name for _, name in lab.upstream.seen]) and not c.pending()
    assert not dns_records(proxy)
    lab.release(fake)
    reply = c.receive()
    assert reply.id == sent.id and addresses(reply) == ["www.example.com.", "203.0.113.20"]
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert record.verdict == "forwarded" and record.l4.protocol == transport
    assert record.dns.learned == ("matchPattern *.example.com",)
    assert "learned before the answer was released, for matchPattern *.example.com" in record.summary
    c.close()


def test_a_slow_learner_holds_back_only_the_answer_that_waits_for_it(lab: DnsLab) -> None:
    """One answer waits for the learner; an answer without addresses (NXDOMAIN) and one the
    learner answers at once (its reply overtaking the first) are released meanwhile."""
    proxy, fake = lab.learning_proxy()
    fake.at_once.add("other.example.com")
    held, nx, quick = UdpClient(proxy.port), UdpClient(proxy.port), UdpClient(proxy.port)
    held.send(query("www.example.com"))
    wait_for("the learner to be asked", lambda: fake.requests)
    nx.send(query("nothing.example.com"))
    assert nx.receive().rcode() == dns.rcode.NXDOMAIN
    quick.send(query("other.example.com"))
    assert addresses(quick.receive()) == ["203.0.113.21"]
    assert not held.pending()
    assert [r["qname"] for r in fake.requests] == ["www.example.com", "other.example.com"]  # NXDOMAIN: not asked
    lab.release(fake)
    assert addresses(held.receive()) == ["203.0.113.20"]
    assert fake.connections == 1  # one persistent connection for all of them
    for c in (held, nx, quick):
        c.close()


def test_aaaa_records_are_learned_too(lab: DnsLab) -> None:
    proxy, fake = lab.learning_proxy()
    fake.at_once.add("v6.example.com")
    c = TcpClient(proxy.port)
    c.send(query("v6.example.com", "AAAA"))
    c.receive()
    assert [(r["type"], r["data"], r["ttl"]) for r in fake.requests[0]["records"]] == \
        [("AAAA", "2001:db8::6", 60), ("A", "203.0.113.6", 60)]
    assert fake.requests[0]["qtype"] == "AAAA"
    c.close()


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_without_a_learner_the_answer_is_released_and_the_record_says_why(lab: DnsLab, transport: str) -> None:
    learner = FqdnLearner(str(lab.tmp / "nobody-listens.sock"))
    lab.learners.append(learner)
    proxy = lab.proxy(learner)
    c = client(transport, proxy.port)
    c.send(query("www.example.com"))
    assert addresses(c.receive()) == ["203.0.113.20"]
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert record.verdict == "forwarded" and record.dns.learned == ()
    assert "policy not updated: FQDN learner at" in record.summary and "unavailable" in record.summary
    c.close()


def test_a_learner_that_does_not_reply_in_time_delays_the_answer_no_longer(lab: DnsLab) -> None:
    proxy, fake = lab.learning_proxy(mode="silent", timeout=0.2)
    c = UdpClient(proxy.port)
    c.send(query("www.example.com"))
    assert addresses(c.receive()) == ["203.0.113.20"]
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert "policy not updated: no reply from the FQDN learner within 0.2 s" in record.summary
    assert record.dns.learned == ()
    c.close()


def test_a_learner_that_refuses_is_named_in_the_record(lab: DnsLab) -> None:
    proxy, fake = lab.learning_proxy(mode="refuse")
    fake.at_once.add("www.example.com")
    c = UdpClient(proxy.port)
    c.send(query("www.example.com"))
    assert addresses(c.receive()) == ["203.0.113.20"]
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert "policy not updated: the FQDN learner refused: policy engine busy" in record.summary
    c.close()


def test_the_learner_connection_is_opened_again_after_it_broke(lab: DnsLab) -> None:
    proxy, fake = lab.learning_proxy(mode="hangup")
    fake.at_once.update({"www.example.com", "other.example.com"})
    c = UdpClient(proxy.port)
    c.send(query("www.example.com"))
    assert addresses(c.receive()) == ["203.0.113.20"]  # released at once: the learner hung up
    first = wait_for("the record", lambda: dns_records(proxy))[0]
    assert "policy not updated" in first.summary and "closed the connection" in first.summary
    c.send(query("other.example.com"))
    assert addresses(c.receive()) == ["203.0.113.21"]
    second = wait_for("the second record", lambda: len(dns_records(proxy)) == 2 and dns_records(proxy))[1]
    assert second.dns.learned == ("matchPattern *.example.com",) and fake.connections == 2
    c.close()


def test_without_fqdn_socket_nothing_is_learned_and_the_summary_is_the_verdict(lab: DnsLab) -> None:
    proxy = lab.proxy()
    c = UdpClient(proxy.port)
    c.send(query("www.example.com"))
    c.receive()
    record = wait_for("the record", lambda: dns_records(proxy))[0]
    assert record.dns.learned == () and "learn" not in record.summary
    c.close()


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_the_learner_socket_and_timeout_are_proxy_flags() -> None:
    from proxy import __main__ as proxy_main
    from proxy.fqdn import LEARN_TIMEOUT_S

    args = proxy_main.parse_args(["--lab", "x", "--state", "s", "--fqdn-socket", "/run/l7lab/x/fqdn.sock",
                                  "--learn-timeout", "0.5"])
    assert args.fqdn_socket == "/run/l7lab/x/fqdn.sock" and args.limits.learn_timeout == 0.5
    assert proxy_main.parse_args(["--lab", "x", "--state", "s", "--limits", "learn-timeout=3"]).limits.learn_timeout == 3
    plain = proxy_main.parse_args(["--lab", "x", "--state", "s"])
    assert plain.fqdn_socket is None and plain.limits.learn_timeout == LEARN_TIMEOUT_S == 2.0


def test_the_proxy_process_learns_through_its_fqdn_socket(lab: DnsLab) -> None:
    """`python -m proxy --fqdn-socket PATH` as the lab starts it: the learner is asked before the
    answer is released, and the process still stops cleanly (exit 0) with its connection open."""
    import signal
    import subprocess
    import sys

    fake = FakeLearner(lab.tmp / "process.sock")
    lab.loop.run(fake.start())
    lab.fakes.append(fake)
    state = lab.tmp / "policy.json"
    state.write_text(json.dumps(lab.snapshot.state.to_json()))
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--lab", "t", "--state", str(state), "--host", "127.0.0.1",
                             "--port", "0", "--original-dst", f"{BACKEND}:{lab.upstream.port}", "--no-mark",
                             "--fqdn-socket", str(fake.path)], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY 127.0.0.1:"), line
        c = UdpClient(int(line.rsplit(":", 1)[1]))
        c.send(query("www.example.com"))
        wait_for("the learner to be asked", lambda: fake.requests)
        assert fake.requests[0]["qname"] == "www.example.com" and not c.pending()
        lab.release(fake)
        assert addresses(c.receive()) == ["203.0.113.20"]
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
