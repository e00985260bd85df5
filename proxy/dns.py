"""The DNS side of the proxy: every redirected DNS query is checked against the DNS rules of the
policies that apply (`toPorts.rules.dns`: matchName / matchPattern), as Cilium's DNS proxy does.

One path for every query, whichever transport brought it (`DnsCore.handle`): the UDP listener
below (`DnsProxy`) and DNS over TCP (`proxy.dnstcp`) hand it one message and send back what it
returns. Per query:

  * not a DNS query (or a response): nothing to answer, recorded as an error (UDP: dropped;
    TCP: the connection is closed);
  * not one standard question (several questions, another opcode): FORMERR, never forwarded;
  * no rule allows the name: answered REFUSED, as if by the server the client asked;
  * allowed: forwarded to the original destination, over the transport it came on, from a
    socket that carries the from-proxy mark (at most MAX_IN_FLIGHT at once, a quarter of them
    per source identity: beyond, UDP drops the query and TCP answers SERVFAIL). The server's
    answer is relayed back unchanged; a server that refuses the forward (ICMP port unreachable,
    a TCP reset) makes the proxy answer REFUSED, as Cilium's does; silence for UPSTREAM_TIMEOUT_S
    is left to the client's own timeout;
  * before an answer with addresses (NOERROR, at least one A or AAAA) is released, the lab's
    FQDN learner is told (`proxy.fqdn`, with `--fqdn-socket`): the toFQDNs selectors matching
    the name allow its addresses before the client can use them. A learner that fails or is
    slow (LEARN_TIMEOUT_S) delays nothing more: the answer is released and the record says the
    policy was not updated, and why.

UDP answers leave from a transparent socket bound to the original destination, so the client sees
them come from the server it asked, and conntrack sees the reply of the client's own flow.
One L7 flow record per query (`proxy/events.py`), its DNS part the name, the question type, the
rcode sent (0 NOERROR, 3 NXDOMAIN, 5 REFUSED; -1 when nothing was sent), the answer relayed and
the selectors learned.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset

from dataplane import timescale
from dataplane.abi import PROTO_UDP, from_proxy_mark
from dataplane.flowrecord import Verdict
from l7.dns import DnsFlow

from .events import l7_flow, redirect_direction
from .fqdn import learn_request, learned_note, learns
from .marks import IP_TRANSPARENT, SO_MARK

if TYPE_CHECKING:
    from .context import ProxyContext
    from .state import ConnectionPolicy, RequestVerdict, Snapshot

IP_RECVORIGDSTADDR = 20  # socket.IP_RECVORIGDSTADDR (Linux); the cmsg type is IP_ORIGDSTADDR (same value)
UPSTREAM_TIMEOUT_S = 2.0  # an ordinary machine's seconds: waits use timescale.scaled()
MAX_DATAGRAM = 65535
MAX_IN_FLIGHT = 256
# One source identity may hold a quarter of them: a pod flooding a server that never answers
# (each query then waits UPSTREAM_TIMEOUT_S) leaves room for every other pod's queries.
MAX_IN_FLIGHT_PER_IDENTITY = 64


class UpstreamRefused(Exception):
    """The server said no to the forward itself (ICMP port unreachable, a TCP reset)."""


class Query(NamedTuple):
    """Where one DNS message came from and how."""

    cp: "ConnectionPolicy"  # what applies to (client, original destination) under the snapshot
    client: tuple[str, int]
    dst: tuple[str, int]  # the original destination: the server the client asked
    transport: str  # "UDP" | "TCP"
    t0: float  # when it arrived (time.monotonic)


class Reply(NamedTuple):
    """What to send the client for one message (None: nothing)."""

    data: bytes | None


# Asks the server the query was meant for, over the query's own transport: (query, its id) ->
# the server's answer with that id, None on silence; UpstreamRefused when the server refuses.
Ask = Callable[[bytes, int], Awaitable[bytes | None]]

_cores: "weakref.WeakKeyDictionary[object, DnsCore]" = weakref.WeakKeyDictionary()


class DnsCore:
    """The judge/forward/learn/record path of one proxy process, shared by its transports."""

    def __init__(self, context: "ProxyContext") -> None:
        self.context = context
        # Each query in flight may hold an upstream socket for UPSTREAM_TIMEOUT_S: a bound keeps a
        # flood from exhausting the descriptors the HTTP side needs too.
        self.in_flight = 0
        self.by_identity: Counter[int] = Counter()  # queries in flight per source identity

    @classmethod
    def of(cls, context: "ProxyContext") -> "DnsCore":
        """The one core of a proxy process (both transports count against the same caps)."""
        core = _cores.get(context)
        if core is None:
            core = _cores[context] = cls(context)
        return core

    def parse(self, q: Query, data: bytes) -> dns.message.Message | None:
        """The query a message holds; None (recorded) if it is not a DNS query at all. Over UDP
        such a datagram is dropped; over TCP the connection is closed (`proxy.dnstcp`), which is
        why this step is apart from `handle`: the stream's reader decides at once."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            self.record(q, "", "", -1, "error", f"not a DNS query: {_dropped(q)}")
            return None
        except Exception as exc:  # noqa: BLE001 - fail closed: whatever breaks the parser, nothing is forwarded
            self.record(q, "", "", -1, "error", f"internal error: {exc!r}")
            return None
        if query.flags & dns.flags.QR:
            self.record(q, "", "", -1, "error", f"a DNS response, not a query: {_dropped(q)}")
            return None
        return query

    async def handle(self, q: Query, query: dns.message.Message, data: bytes, ask: Ask) -> Reply:
        """Judge one query (`parse`d from `data`), forward it if allowed, learn and record; what to
        answer."""
        snap = self.context.snapshot
        try:
            return await self._handle(snap, q, query, data, ask)
        except Exception as exc:  # noqa: BLE001 - fail closed: nothing forwarded, nothing answered
            self.record(q, "", "", -1, "error", f"internal error: {exc!r}")
            return Reply(None)

    async def _handle(self, snap: "Snapshot", q: Query, query: dns.message.Message, data: bytes, ask: Ask) -> Reply:
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            # Only the one question that was checked may reach the server: anything else (more
            # questions, other opcodes) is answered FORMERR and never forwarded.
            self.record(q, "", "", dns.rcode.FORMERR, "error", "only standard queries with one question are forwarded")
            return Reply(_rcode_reply(query, dns.rcode.FORMERR))
        question = query.question[0]
        name = asked_name(question)
        qtype = dns.rdatatype.to_text(question.rdtype)
        verdict = snap.judge_dns(q.cp, name)
        if not verdict.allowed:
            self.record(q, qtype, name, dns.rcode.REFUSED, "denied", verdict.why, verdict)
            return Reply(_rcode_reply(query, dns.rcode.REFUSED))
        identity = q.cp.src_identity
        busy = ""
        if self.in_flight >= MAX_IN_FLIGHT:
            busy = f"too many queries in flight (at most {MAX_IN_FLIGHT})"
        elif self.by_identity[identity] >= MAX_IN_FLIGHT_PER_IDENTITY:
            busy = (f"too many queries in flight from identity {identity} (at most {MAX_IN_FLIGHT_PER_IDENTITY})")
        if busy:
            # UDP: dropped, the client asks again after its timeout. TCP: the connection would
            # wait for ever for this one answer, so the proxy says at once that it failed.
            if q.transport == "TCP":
                self.record(q, qtype, name, dns.rcode.SERVFAIL, "error", f"{busy}: answered SERVFAIL", verdict)
                return Reply(_rcode_reply(query, dns.rcode.SERVFAIL))
            self.record(q, qtype, name, -1, "error", f"{busy}: dropped", verdict)
            return Reply(None)
        # The slot is held until the answer is released: the upstream exchange and the learner.
        self.in_flight += 1
        self.by_identity[identity] += 1
        try:
            return await self._forward(q, query, data, ask, qtype, name, verdict)
        finally:
            self.in_flight -= 1
            self.by_identity[identity] -= 1
            if not self.by_identity[identity]:
                del self.by_identity[identity]

    async def _forward(self, q: Query, query: dns.message.Message, data: bytes, ask: Ask, qtype: str, name: str,
                       verdict: "RequestVerdict") -> Reply:
        try:
            answer = await ask(data, query.id)
        except UpstreamRefused as exc:
            self.record(q, qtype, name, dns.rcode.REFUSED, "error", f"cannot forward: {exc}: answered REFUSED", verdict)
            return Reply(_rcode_reply(query, dns.rcode.REFUSED))
        if answer is None:
            self.record(q, qtype, name, -1, "error", "no answer from the server", verdict)
            return Reply(None)
        try:
            parsed = dns.message.from_wire(answer)
        except dns.exception.DNSException:
            self.record(q, qtype, name, -1, "error", "the server's answer is not DNS: dropped", verdict)
            return Reply(None)
        summary, learned = verdict.why, ()
        if self.context.learner is not None and learns(parsed):
            # Before the client has the answer: the addresses must be allowed before it can use them.
            result = await self.context.learner.learn(
                learn_request(q.client[0], q.cp.src_identity, q.dst, name, qtype, parsed))
            summary += learned_note(result)
            learned = result.learned
        self.record(q, qtype, name, parsed.rcode(), "forwarded", summary, verdict, parsed, learned)
        return Reply(answer)

    def record(self, q: Query, qtype: str, name: str, rcode: int, verdict: str, reason: str,
               rv: "RequestVerdict | None" = None, upstream: dns.message.Message | None = None,
               learned: tuple[str, ...] = ()) -> None:
        answer = answer_record(upstream) if upstream is not None else {}
        elapsed_ns = round((time.monotonic() - q.t0) * 1e9)
        cp = q.cp
        self.context.events.emit(l7_flow(
            self.context.snapshot, Verdict(verdict), q.client, q.dst, src_identity=cp.src_identity,
            dst_identity=cp.dst_identity, direction=redirect_direction(cp), summary=reason,
            latency_ms=round(elapsed_ns / 1e6, 3), latency_ns=elapsed_ns, rule_ids=rv.rule_ids if rv else (),
            policies=rv.policies if rv else (), transport=q.transport,
            dns=DnsFlow(name, (qtype,) if qtype else (), rcode, **answer, learned=learned)))


class DnsProxy:
    """UDP listener of one proxy process; shares its snapshot, marks and event log (the
    `ProxyContext` it is given: the proxy server, or a stand-in in tests)."""

    def __init__(self, server: "ProxyContext") -> None:
        self.server = server
        self.core = DnsCore.of(server)
        self.sock: socket.socket | None = None
        self.port = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.server.transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            sock.bind((self.server.host, self.server.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock, self.port = sock, sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(sock, self._readable)

    async def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
            self.sock = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):  # a burst at a time; the loop calls back while more is queued
            try:
                data, ancdata, _flags, client = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket: not a query
                print(f"l7proxy: dns receive: {exc!r}", file=sys.stderr, flush=True)
                continue
            dst = self.server.original_dst or _original_dst(ancdata)
            if dst is None:
                continue  # cannot know where it was going: fail closed, drop
            task = asyncio.get_running_loop().create_task(self.handle(data, client[:2], dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def handle(self, data: bytes, client: tuple[str, int], dst: tuple[str, int]) -> None:
        """One datagram: the shared path, then its answer (if any) back to the client."""
        cp = self.server.snapshot.connection(client[0], dst[0], dst[1], PROTO_UDP)
        q = Query(cp, client, dst, "UDP", time.monotonic())
        query = self.core.parse(q, data)
        if query is None:
            return  # not a DNS query: nothing to answer
        reply = await self.core.handle(q, query, data, lambda wire, query_id: self.ask_upstream(cp, dst, wire, query_id))
        if reply.data is not None:
            self.answer(dst, client, reply.data)

    async def ask_upstream(self, cp: "ConnectionPolicy", dst: tuple[str, int], data: bytes,
                           query_id: int) -> bytes | None:
        """Send the query to the server it was meant for; its answer (same id), or None.
        UpstreamRefused on an ICMP port unreachable."""
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            sock.setblocking(False)
            if self.server.mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, from_proxy_mark(cp.src_identity))
            sock.connect(dst)
            await loop.sock_sendall(sock, data)
            deadline = time.monotonic() + timescale.scaled(UPSTREAM_TIMEOUT_S)
            while (left := deadline - time.monotonic()) > 0:
                try:
                    reply = await asyncio.wait_for(loop.sock_recv(sock, MAX_DATAGRAM), left)
                except asyncio.TimeoutError:
                    return None
                except ConnectionRefusedError:
                    raise UpstreamRefused(f"{dst[0]}:{dst[1]} answered ICMP port unreachable") from None
                if len(reply) >= 2 and struct.unpack("!H", reply[:2])[0] == query_id:
                    return reply
            return None
        except OSError:
            return None
        finally:
            sock.close()

    def answer(self, src: tuple[str, int], client: tuple[str, int], data: bytes) -> None:
        """Send `data` to the client as if from `src`, the server it asked."""
        if not self.server.transparent:
            assert self.sock is not None
            with contextlib.suppress(OSError):
                self.sock.sendto(data, client)
            return
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            print(f"l7proxy: dns answer: {exc!r}", file=sys.stderr, flush=True)
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind(src)
            sock.sendto(data, client)
        except OSError as exc:
            print(f"l7proxy: dns answer to {client[0]}:{client[1]} as {src[0]}:{src[1]}: {exc!r}",
                  file=sys.stderr, flush=True)
        finally:
            sock.close()


def _rcode_reply(query: dns.message.Message, rcode: int) -> bytes:
    """The proxy's own answer to `query`: its question echoed, no records, `rcode`."""
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    return reply.to_wire()


def _dropped(q: Query) -> str:
    return "connection closed" if q.transport == "TCP" else "dropped"


# A record keeps at most this many addresses, names and types of an answer (an answer may carry
# hundreds of records; the record of one question stays one small line).
RECORDED_ANSWERS = 32


def answer_record(message: dns.message.Message) -> dict:
    """The DnsFlow fields of an upstream answer relayed to the client: the addresses of its A and
    AAAA records, the smallest TTL of its answer records, the CNAME targets (lower case, no final
    dot) and the type of each answer record (bounded to RECORDED_ANSWERS each)."""
    ips: list[str] = []
    cnames: list[str] = []
    rrtypes: list[str] = []
    ttls: list[int] = []
    for rrset in message.answer:
        ttls.append(rrset.ttl)
        kind = dns.rdatatype.to_text(rrset.rdtype)
        for rdata in rrset:
            rrtypes.append(kind)
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                ips.append(rdata.address)
            elif rrset.rdtype == dns.rdatatype.CNAME:
                cnames.append(rdata.target.to_text(omit_final_dot=True).lower())
    return {"ips": tuple(ips[:RECORDED_ANSWERS]), "ttl": min(ttls, default=0),
            "cnames": tuple(cnames[:RECORDED_ANSWERS]), "rrtypes": tuple(rrtypes[:RECORDED_ANSWERS])}


def asked_name(question: dns.rrset.RRset) -> str:
    """The name a question asks, as it is judged and recorded: lower case, no final dot."""
    return question.name.to_text(omit_final_dot=True).lower()


def _original_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The sockaddr_in of IP_ORIGDSTADDR: family (2 bytes), port (network order), address."""
    for level, kind, value in ancdata:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(value) >= 8:
            port = struct.unpack("!H", value[2:4])[0]
            return socket.inet_ntoa(value[4:8]), port
    return None
