"""The lab's cluster DNS: the names a scenario gives, answered as CoreDNS answers them in a
Kubernetes cluster, and the UDP and TCP servers that serve them.

The pure part is a `Zone` (`zone_from_scenario`): every record the cluster DNS answers, built
from the scenario and serializable (`to_json` / `from_json`) so that the lab hands it to the
DNS pod's server as a file. `Zone.resolve(name, qtype)` is the lookup itself, also what the
policy oracle uses to know which addresses a name has; `Zone.respond(query)` makes a DNS
message of it. Records, all under CLUSTER_DOMAIN except world names:

    <svc>.<ns>.svc.cluster.local      A   the Service's ClusterIP            TTL CLUSTER_DNS_TTL
    <pod>.<ns>.svc.cluster.local      A   the pod's address (the lab's own convenience: as if
                                          every pod had a headless Service of its name)
    <a-b-c-d>.<ns>.pod.cluster.local  A   the pod's address (CoreDNS `pods insecure`)
    <world dnsName>                   A   every host declaring the name      TTL host.ttl or
                                                                             settings.dns_ttl
    <world alias>                     CNAME the host's first dnsName, followed by that name's
                                          A records (as CoreDNS forwarding to a recursive
                                          upstream answers)

A Service and a pod of one namespace never share a name (the scenario refuses it). A world
host's own `name` is the lab's label for it, never a DNS name.

Answers (RFC 1034/2308, CoreDNS's kubernetes plugin): AA set; NXDOMAIN for an unknown name,
with the SOA of its zone in the authority section (cluster.local for cluster names, the root
for others: the lab serves the world's names without their real zones); NOERROR with no
answer (NODATA) for a known name and another type (AAAA, TXT...), and for the names between
cluster.local and its records (`svc.cluster.local`, `<ns>.svc.cluster.local`); FORMERR for a
message with several questions or another opcode than QUERY; names compare case-insensitively,
a trailing dot or none.

The servers (`serve_udp`, `serve_tcp`) only answer from the zone: they never resolve a name
themselves and never forward anywhere. UDP answers that do not fit in 512 bytes (or the EDNS
payload size the query advertises) are sent truncated with TC set, for the client to ask again
over TCP. TCP follows RFC 7766: a 2-byte length before each message, several queries per
connection answered in order, an idle timeout, a bound on the query size; a frame that is not a
DNS query closes the connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from .scenario import CLUSTER_DNS_TTL, CLUSTER_DOMAIN

if TYPE_CHECKING:
    from .scenario import Scenario

ZONE_FORMAT = 1
UDP_DEFAULT_PAYLOAD = 512  # RFC 1035 4.2.1: a UDP answer without EDNS fits in 512 bytes
UDP_MAX_PAYLOAD = 65535 - 28  # the largest a UDP datagram over IPv4 can carry
TCP_IDLE_TIMEOUT_S = 10.0  # RFC 7766 6.2.3: close idle connections after some seconds
TCP_MAX_QUERY = 4096  # a query has one question: anything larger is not one the lab answers
TCP_MAX_CONNECTIONS = 128  # open connections at once; more are closed as they arrive
# The SOA CoreDNS's kubernetes plugin gives the cluster zone (its minimum, the negative TTL, is the
# records' TTL); names outside the cluster get a root SOA with the world's default TTL.
SOA_MNAME, SOA_RNAME = "ns.dns", "hostmaster"
SOA_TIMERS = (7200, 1800, 86400)  # refresh, retry, expire

LogFn = Callable[[dict[str, Any]], None]

_NAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


class ZoneError(ValueError):
    """A zone file that cannot be read as one; the message names the file and the field."""


class Record(NamedTuple):
    """One resource record: owner (lower case, no trailing dot), type ("A", "CNAME", "SOA"),
    TTL in seconds, data in presentation form."""

    owner: str
    type: str
    ttl: int
    data: str


@dataclass(frozen=True)
class Answer:
    """What the cluster DNS answers: an rcode (dns.rcode values: 0 NOERROR, 3 NXDOMAIN), the
    answer section in order (a CNAME first, then A records) and the authority section (the SOA
    of a negative answer)."""

    rcode: int
    records: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """The A records' addresses, in answer order."""
        return tuple(r.data for r in self.records if r.type == "A")


def canonical(name: str) -> str:
    """A name as the zone keys it: lower case, without a trailing dot."""
    return name.strip().lower().rstrip(".")


@dataclass(frozen=True)
class _Address:
    ttl: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class _Alias:
    ttl: int
    target: str


class Zone:
    """Every name the cluster DNS answers (see the module docstring). Names are canonical."""

    def __init__(self, addresses: dict[str, _Address] | None = None, aliases: dict[str, _Alias] | None = None,
                 *, cluster_domain: str = CLUSTER_DOMAIN, cluster_ttl: int = CLUSTER_DNS_TTL,
                 world_negative_ttl: int = 30) -> None:
        self.addresses: dict[str, _Address] = dict(addresses or {})
        self.aliases: dict[str, _Alias] = dict(aliases or {})
        self.cluster_domain = canonical(cluster_domain)
        self.cluster_ttl = cluster_ttl
        self.world_negative_ttl = world_negative_ttl
        # Names between the cluster domain and its records (svc.cluster.local, shop.svc.cluster.local):
        # they exist, with no record of their own (NODATA, not NXDOMAIN, as CoreDNS answers).
        self._between: set[str] = set()
        suffix = "." + self.cluster_domain
        for name in self.addresses:
            while name.endswith(suffix):
                name = name.split(".", 1)[1]
                if name == self.cluster_domain:
                    break
                self._between.add(name)

    # -- lookups ----------------------------------------------------------------------------
    def in_cluster(self, name: str) -> bool:
        name = canonical(name)
        return name == self.cluster_domain or name.endswith("." + self.cluster_domain)

    def soa(self, name: str) -> Record:
        """The SOA a negative answer about `name` carries (its TTL is the negative TTL)."""
        if self.in_cluster(name):
            zone, ttl = self.cluster_domain, self.cluster_ttl
            mname, rname = f"{SOA_MNAME}.{zone}.", f"{SOA_RNAME}.{zone}."
        else:
            zone, ttl = "", self.world_negative_ttl
            mname, rname = f"{SOA_MNAME}.{self.cluster_domain}.", f"{SOA_RNAME}.{self.cluster_domain}."
        refresh, retry, expire = SOA_TIMERS
        return Record(zone, "SOA", ttl, f"{mname} {rname} 1 {refresh} {retry} {expire} {ttl}")

    def resolve(self, name: str, qtype: str) -> Answer:
        """The answer to a question about `name` of type `qtype` ("A", "AAAA", "CNAME", ...)."""
        name, qtype = canonical(name), qtype.upper()
        alias = self.aliases.get(name)
        if alias is not None:
            cname = Record(name, "CNAME", alias.ttl, alias.target + ".")
            if qtype not in ("A", "ANY"):
                return Answer(0, (cname,))  # the chain, without records of that type at its end
            target = self.addresses.get(alias.target)
            follow = tuple(Record(alias.target, "A", target.ttl, a) for a in target.addresses) if target else ()
            return Answer(0, (cname, *follow))
        found = self.addresses.get(name)
        if found is not None:
            if qtype in ("A", "ANY"):
                return Answer(0, tuple(Record(name, "A", found.ttl, a) for a in found.addresses))
            return Answer(0, (), (self.soa(name),))
        if name == self.cluster_domain:
            if qtype in ("SOA", "ANY"):
                return Answer(0, (self.soa(name),))
            return Answer(0, (), (self.soa(name),))
        if name in self._between:
            return Answer(0, (), (self.soa(name),))
        return Answer(int(dns.rcode.NXDOMAIN), (), (self.soa(name),))

    def respond(self, query: dns.message.Message) -> dns.message.Message:
        """The reply to a query: the answer of `resolve` as a DNS message (AA set), or FORMERR
        for a message that is not one question of opcode QUERY."""
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        reply.flags &= ~dns.flags.RA  # authoritative only: it recurses for nobody
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply
        question = query.question[0]
        if question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            reply.set_rcode(dns.rcode.REFUSED)  # the lab has no CHAOS or HESIOD names
            return reply
        answer = self.resolve(question.name.to_text(), dns.rdatatype.to_text(question.rdtype))
        reply.set_rcode(answer.rcode)
        asked = canonical(question.name.to_text())
        for records, section in ((answer.records, reply.answer), (answer.authority, reply.authority)):
            for record in records:
                # The owner as the question spelled it (a client may mix case: DNS 0x20).
                owner = question.name if record.owner == asked else dns.name.from_text(record.owner or ".")
                rrset = dns.rrset.from_text(owner, record.ttl, "IN", record.type, record.data)
                existing = next((r for r in section if r.name == rrset.name and r.rdtype == rrset.rdtype), None)
                if existing is None:
                    section.append(rrset)
                else:
                    existing.union_update(rrset)
        return reply

    # -- the file the lab hands to the DNS pod's server -------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": ZONE_FORMAT,
            "cluster_domain": self.cluster_domain,
            "cluster_ttl": self.cluster_ttl,
            "world_negative_ttl": self.world_negative_ttl,
            "addresses": {n: {"ttl": a.ttl, "addresses": list(a.addresses)} for n, a in sorted(self.addresses.items())},
            "aliases": {n: {"ttl": a.ttl, "target": a.target} for n, a in sorted(self.aliases.items())},
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "zone") -> "Zone":
        """A zone from `to_json`'s form; ZoneError naming `source` and the field otherwise."""
        def fail(field: str, expected: str) -> ZoneError:
            return ZoneError(f"{source}: {field}: expected {expected}")

        def ttl_of(value: Any, field: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0x7FFFFFFF:
                raise fail(field, "a TTL, an integer 0..2147483647")
            return value

        def name_of(value: Any, field: str) -> str:
            if not isinstance(value, str) or len(value) > 253 or not _NAME_RE.fullmatch(value):
                raise fail(field, f"a lower-case DNS name without a trailing dot, got {value!r}")
            return value

        if not isinstance(data, dict):
            raise fail("(top level)", "an object")
        if data.get("format") != ZONE_FORMAT:
            raise fail("format", f"{ZONE_FORMAT}")
        addresses: dict[str, _Address] = {}
        raw_addresses = data.get("addresses", {})
        if not isinstance(raw_addresses, dict):
            raise fail("addresses", "an object of name -> {ttl, addresses}")
        for name, entry in raw_addresses.items():
            where = f"addresses.{name}"
            name_of(name, where)
            if not isinstance(entry, dict) or not isinstance(entry.get("addresses"), list) or not entry["addresses"]:
                raise fail(where, "{ttl: N, addresses: [IPv4 address, ...]} with at least one address")
            for i, address in enumerate(entry["addresses"]):
                try:
                    if not isinstance(address, str) or ipaddress.ip_address(address).version != 4:
                        raise ValueError
                except ValueError:
                    raise fail(f"{where}.addresses[{i}]", f"an IPv4 address, got {address!r}") from None
            addresses[name] = _Address(ttl_of(entry.get("ttl"), f"{where}.ttl"), tuple(entry["addresses"]))
        aliases: dict[str, _Alias] = {}
        raw_aliases = data.get("aliases", {})
        if not isinstance(raw_aliases, dict):
            raise fail("aliases", "an object of name -> {ttl, target}")
        for name, entry in raw_aliases.items():
            where = f"aliases.{name}"
            name_of(name, where)
            if not isinstance(entry, dict):
                raise fail(where, "{ttl: N, target: NAME}")
            if name in addresses:
                raise fail(where, "a name that has no A records (a name is an alias or an address name)")
            aliases[name] = _Alias(ttl_of(entry.get("ttl"), f"{where}.ttl"), name_of(entry.get("target"), f"{where}.target"))
        return cls(addresses, aliases,
                   cluster_domain=name_of(data.get("cluster_domain", CLUSTER_DOMAIN), "cluster_domain"),
                   cluster_ttl=ttl_of(data.get("cluster_ttl", CLUSTER_DNS_TTL), "cluster_ttl"),
                   world_negative_ttl=ttl_of(data.get("world_negative_ttl", 30), "world_negative_ttl"))

    @classmethod
    def load(cls, path: str) -> "Zone":
        """A zone file written by the lab (`write`); ZoneError naming the file otherwise."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(64 << 20)
        except OSError as exc:
            raise ZoneError(f"{path}: cannot read the zone file: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ZoneError(f"{path}: not JSON: {exc}") from None
        return cls.from_json(data, path)


def zone_from_scenario(scenario: Scenario) -> Zone:
    """The cluster DNS's records for a scenario (see the module docstring)."""
    domain = CLUSTER_DOMAIN
    addresses: dict[str, _Address] = {}
    for pod in scenario.pods.values():
        addresses[f"{pod.name}.{pod.namespace}.svc.{domain}"] = _Address(CLUSTER_DNS_TTL, (pod.ip,))
        dashed = pod.ip.replace(".", "-")
        addresses[f"{dashed}.{pod.namespace}.pod.{domain}"] = _Address(CLUSTER_DNS_TTL, (pod.ip,))
    for svc in scenario.services.values():
        addresses[f"{svc.name}.{svc.namespace}.svc.{domain}"] = _Address(CLUSTER_DNS_TTL, (svc.cluster_ip,))
    default_ttl = scenario.settings.dns_ttl
    world: dict[str, tuple[int, list[str]]] = {}
    for host in scenario.world.values():
        ttl = host.ttl if host.ttl is not None else default_ttl
        for dns_name in host.dns_names:
            name = canonical(dns_name)
            before = world.get(name)
            if before is None:
                world[name] = (ttl, [host.address])
            else:  # a name several hosts share: all their addresses, the smallest TTL
                world[name] = (min(before[0], ttl), before[1] + [a for a in [host.address] if a not in before[1]])
    for name, (ttl, addrs) in world.items():
        if name in addresses:  # a world name inside the cluster domain: the cluster's record stays
            continue
        addresses[name] = _Address(ttl, tuple(addrs))
    aliases: dict[str, _Alias] = {}
    for host in scenario.world.values():
        if not host.dns_names:
            continue
        ttl = host.ttl if host.ttl is not None else default_ttl
        for alias in host.aliases:
            name = canonical(alias)
            if name not in addresses:
                aliases.setdefault(name, _Alias(ttl, canonical(host.dns_names[0])))
    return Zone(addresses, aliases, world_negative_ttl=default_ttl)


# --------------------------------------------------------------------------------------------
# Servers


def _formerr_for(data: bytes) -> bytes | None:
    """A FORMERR for a query dnspython cannot parse, when its header can be read (RFC 1035
    4.1.1: the server was unable to interpret the query); None for what is not a query at all
    (a response, or shorter than a header): nothing is answered to that."""
    if len(data) < 12:
        return None
    ident, flags = struct.unpack("!HH", data[:4])
    if flags & dns.flags.QR:
        return None
    opcode = flags & 0x7800
    return struct.pack("!HHHHHH", ident, dns.flags.QR | opcode | dns.rcode.FORMERR, 0, 0, 0, 0)


def udp_limit(query: dns.message.Message) -> int:
    """The largest UDP answer the client takes: 512 bytes, or what its EDNS OPT advertises."""
    if query.edns < 0:
        return UDP_DEFAULT_PAYLOAD
    return min(max(query.payload, UDP_DEFAULT_PAYLOAD), UDP_MAX_PAYLOAD)


def wire_reply(zone: Zone, query: dns.message.Message, max_size: int = 65535) -> tuple[dns.message.Message, bytes]:
    """The reply to `query` and its wire form, at most `max_size` bytes: when the full answer is
    larger, the reply keeps its question (and EDNS), drops its records and sets TC."""
    reply = zone.respond(query)
    try:
        return reply, reply.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        reply.answer.clear()
        reply.authority.clear()
        reply.additional.clear()
        reply.flags |= dns.flags.TC
        return reply, reply.to_wire(max_size=max_size)


def _log_entry(reply: dns.message.Message | None, client: tuple[str, int], transport: str) -> dict[str, Any]:
    """What the server's request log keeps of one question (None: a query it could not parse)."""
    name, qtype = "", ""
    if reply is not None and reply.question:
        name = reply.question[0].name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(reply.question[0].rdtype)
    rcode = dns.rcode.to_text(reply.rcode()) if reply is not None else "FORMERR"
    entry: dict[str, Any] = {"dns": name, "type": qtype, "rcode": rcode, "client": f"{client[0]}:{client[1]}",
                             "transport": transport}
    if reply is not None and reply.flags & dns.flags.TC:
        entry["truncated"] = True
    return entry


def answer_bytes(zone: Zone, data: bytes, client: tuple[str, int], transport: str,
                 log: LogFn | None = None) -> bytes | None:
    """The wire answer to one message received over `transport` ("UDP" or "TCP"); None when
    nothing is to be answered: a response, or what cannot be parsed as DNS (over UDP a FORMERR
    still answers a query whose header can be read; over TCP the caller closes the connection)."""
    try:
        query = dns.message.from_wire(data)
    except Exception:  # noqa: BLE001 - dnspython raises several kinds for malformed input
        formerr = _formerr_for(data) if transport == "UDP" else None
        if formerr is not None and log is not None:
            log(_log_entry(None, client, transport))
        return formerr
    if query.flags & dns.flags.QR:
        return None  # a response sent to a server: never answered (no loops between servers)
    limit = udp_limit(query) if transport == "UDP" else 65535
    reply, wire = wire_reply(zone, query, limit)
    if log is not None:
        log(_log_entry(reply, client, transport))
    return wire


class UdpServer(asyncio.DatagramProtocol):
    """The cluster DNS over UDP: one answer per query datagram."""

    def __init__(self, zone: Zone, log: LogFn | None = None) -> None:
        self.zone, self.log = zone, log
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = answer_bytes(self.zone, data, addr, "UDP", self.log)
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)


class TcpServer:
    """The cluster DNS over TCP (RFC 7766): length-prefixed messages, several per connection,
    answered in the order they came; an idle connection is closed after `idle_timeout`; a frame
    shorter than a DNS header, longer than `max_query` or that is not a DNS query closes the
    connection (its framing can no longer be trusted)."""

    def __init__(self, zone: Zone, log: LogFn | None = None, *, idle_timeout: float = TCP_IDLE_TIMEOUT_S,
                 max_query: int = TCP_MAX_QUERY, max_connections: int = TCP_MAX_CONNECTIONS) -> None:
        self.zone, self.log = zone, log
        self.idle_timeout, self.max_query, self.max_connections = idle_timeout, max_query, max_connections
        self.open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        self.open += 1
        try:
            if self.open > self.max_connections:
                return
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.idle_timeout)
                    (length,) = struct.unpack("!H", head)
                    if not 12 <= length <= self.max_query:
                        return
                    data = await asyncio.wait_for(reader.readexactly(length), self.idle_timeout)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                    return
                wire = answer_bytes(self.zone, data, (peer[0], peer[1]), "TCP", self.log)
                if wire is None:
                    return
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            self.open -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


async def serve_udp(zone: Zone, host: str, port: int, log: LogFn | None = None) -> asyncio.DatagramTransport:
    """Answer DNS over UDP on host:port; returns the transport (close it to stop)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: UdpServer(zone, log), local_addr=(host, port))
    return transport  # type: ignore[return-value]


async def serve_tcp(zone: Zone, host: str | None = None, port: int = 53, log: LogFn | None = None, *,
                    sock: Any = None, **options: Any) -> asyncio.base_events.Server:
    """Answer DNS over TCP on host:port (or a bound socket); returns the asyncio server."""
    server = TcpServer(zone, log, **options)
    if sock is not None:
        return await asyncio.start_server(server.handle, sock=sock)
    return await asyncio.start_server(server.handle, host, port, reuse_address=True)


def warm_up() -> None:
    """Load now everything answering loads (dnspython imports record types on first use): a
    server confined after loading may not be able to read the code any more."""
    zone = Zone({"a.lab": _Address(5, ("192.0.2.1",))}, {"b.lab": _Alias(5, "a.lab")})
    for name, qtype in (("a.lab", "A"), ("b.lab", "A"), ("a.lab", "AAAA"), ("c.lab", "TXT"),
                        ("x.cluster.local", "A"), ("cluster.local", "SOA")):
        query = dns.message.make_query(name, qtype, use_edns=0, payload=1232)
        answer_bytes(zone, query.to_wire(), ("192.0.2.2", 1), "UDP")
        answer_bytes(zone, query.to_wire(), ("192.0.2.2", 1), "TCP")
    answer_bytes(zone, b"\x00\x01\x00\x00\x00\x01" + b"\x00" * 6 + b"\xff", ("192.0.2.2", 1), "UDP")  # FORMERR
