"""The cluster DNS (dataplane/clusterdns.py): the records a scenario gives (services, pods by name
and by dashed address, world names shared by several hosts, aliases as CNAMEs), the TTLs they
carry, the answers (NXDOMAIN with an SOA, NODATA, FORMERR, names in any case with or without a
trailing dot), the zone file's round trip and errors, truncation on UDP, and the UDP and TCP
servers on loopback (pipelined queries, a malformed frame, an idle connection)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from dataplane.clusterdns import (Record, TcpServer, UdpServer, Zone, ZoneError, answer_bytes, serve_tcp, udp_limit,
                                  warm_up, zone_from_scenario)
from dataplane.scenario import CLUSTER_DNS_TTL, Scenario, load_scenario
from tests.support.scenario_files import write_scenario

SCENARIO = """\
name: cdns
settings: {dnsTTL: 40}
namespaces:
  - name: kube-system
  - name: shop
pods:
  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}, {port: 53}]}
  - {name: web-1, namespace: shop, labels: {app: web}, ports: [{port: 8080}]}
  - {name: client, namespace: shop, labels: {app: client}}
world:
  - {name: www-a, address: 203.0.113.20, dnsNames: [www.example.com, Static.Example.com], aliases: [shop.example.com]}
  - {name: www-b, address: 203.0.113.21, dnsNames: [www.example.com], ttl: 12}
  - {name: api, address: 198.51.100.7, dnsNames: [api.partner.example.net], ttl: 300, aliases: [partner-api.example.org]}
  - {name: unnamed, address: 198.51.100.9}
services:
  - {name: web, namespace: shop, clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""


@pytest.fixture()
def scenario(tmp_path: Path) -> Scenario:
    return load_scenario(write_scenario(tmp_path, SCENARIO))


@pytest.fixture()
def zone(scenario: Scenario) -> Zone:
    return zone_from_scenario(scenario)


def a(owner: str, ttl: int, address: str) -> Record:
    return Record(owner, "A", ttl, address)


def test_services_and_pods_have_cluster_names(scenario: Scenario, zone: Zone) -> None:
    assert zone.resolve("web.shop.svc.cluster.local", "A").records == (a("web.shop.svc.cluster.local", 5, "10.96.0.10"),)
    web1 = scenario.pods["shop/web-1"].ip
    assert zone.resolve("web-1.shop.svc.cluster.local", "A").records == (a("web-1.shop.svc.cluster.local", 5, web1),)
    dashed = web1.replace(".", "-") + ".shop.pod.cluster.local"
    assert zone.resolve(dashed, "A").records == (a(dashed, CLUSTER_DNS_TTL, web1),)
    dns_pod = scenario.pods["kube-system/kube-dns"].ip
    assert zone.resolve("kube-dns.kube-system.svc.cluster.local", "A").addresses == (dns_pod,)
    assert zone.resolve("client.shop.svc.cluster.local", "A").addresses == (scenario.pods["shop/client"].ip,)
    # A name of another namespace, or a pod address under the wrong namespace, does not exist.
    assert zone.resolve("web.kube-system.svc.cluster.local", "A").rcode == dns.rcode.NXDOMAIN
    assert zone.resolve(web1.replace(".", "-") + ".kube-system.pod.cluster.local", "A").rcode == dns.rcode.NXDOMAIN
    # Short names are the resolver's business (search path), never the server's.
    assert zone.resolve("web", "A").rcode == zone.resolve("web.shop", "A").rcode == dns.rcode.NXDOMAIN


def test_world_names_shared_names_and_ttls(zone: Zone) -> None:
    shared = zone.resolve("www.example.com", "A")
    assert shared.rcode == 0
    # Two hosts declare the name: both addresses, with the smaller of their TTLs (12 < dnsTTL 40).
    assert shared.records == (a("www.example.com", 12, "203.0.113.20"), a("www.example.com", 12, "203.0.113.21"))
    assert zone.resolve("static.example.com", "A").records == (a("static.example.com", 40, "203.0.113.20"),)
    assert zone.resolve("api.partner.example.net", "A").records == (a("api.partner.example.net", 300, "198.51.100.7"),)
    # A world host's own name is the lab's label, not a DNS name.
    for label in ("www-a", "api", "unnamed"):
        assert zone.resolve(label, "A").rcode == dns.rcode.NXDOMAIN


def test_default_world_ttl_is_the_settings_default(tmp_path: Path) -> None:
    zone = zone_from_scenario(load_scenario(write_scenario(tmp_path, SCENARIO.replace("settings: {dnsTTL: 40}\n", ""))))
    assert zone.resolve("static.example.com", "A").records[0].ttl == 30  # DEFAULT_DNS_TTL
    assert zone.resolve("nowhere.example.com", "A").authority[0].ttl == 30


def test_an_alias_is_a_cname_followed_by_the_targets_addresses(zone: Zone) -> None:
    answer = zone.resolve("shop.example.com", "A")
    assert answer.rcode == 0
    assert answer.records == (Record("shop.example.com", "CNAME", 40, "www.example.com."),
                              a("www.example.com", 12, "203.0.113.20"), a("www.example.com", 12, "203.0.113.21"))
    assert answer.addresses == ("203.0.113.20", "203.0.113.21")
    partner = zone.resolve("partner-api.example.org", "A")
    assert [r.type for r in partner.records] == ["CNAME", "A"] and partner.records[0].ttl == 300
    # Asked for the CNAME itself, or another type: the chain alone.
    assert zone.resolve("shop.example.com", "CNAME").records == (Record("shop.example.com", "CNAME", 40, "www.example.com."),)
    assert [r.type for r in zone.resolve("shop.example.com", "AAAA").records] == ["CNAME"]
    # On the wire: the CNAME first, then the A records of its target.
    reply = zone.respond(dns.message.make_query("shop.example.com", "A"))
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in reply.answer] == [
        ("shop.example.com.", "CNAME"), ("www.example.com.", "A")]
    assert sorted(rd.address for rd in reply.answer[1]) == ["203.0.113.20", "203.0.113.21"]


def test_nxdomain_carries_the_soa_of_its_zone(zone: Zone) -> None:
    missing = zone.resolve("nothing.shop.svc.cluster.local", "A")
    assert missing.rcode == dns.rcode.NXDOMAIN and missing.records == ()
    (soa,) = missing.authority
    assert soa.owner == "cluster.local" and soa.type == "SOA" and soa.ttl == CLUSTER_DNS_TTL
    assert soa.data.split()[-1] == str(CLUSTER_DNS_TTL)  # the SOA minimum: the negative TTL
    world = zone.resolve("nothing-here.example.com", "A")
    assert world.rcode == dns.rcode.NXDOMAIN and world.authority[0].owner == "" and world.authority[0].ttl == 40
    reply = zone.respond(dns.message.make_query("nothing.shop.svc.cluster.local", "A"))
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.flags & dns.flags.AA and not reply.answer
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in reply.authority] == [("cluster.local.", "SOA")]


@pytest.mark.parametrize("name", ["www.example.com", "web.shop.svc.cluster.local", "shop.example.com"])
@pytest.mark.parametrize("qtype", ["AAAA", "TXT", "MX"])
def test_known_names_of_another_type_are_nodata(zone: Zone, name: str, qtype: str) -> None:
    answer = zone.resolve(name, qtype)
    assert answer.rcode == dns.rcode.NOERROR
    assert all(r.type == "CNAME" for r in answer.records)  # an alias keeps its CNAME, nothing else
    reply = zone.respond(dns.message.make_query(name, qtype))
    assert reply.rcode() == dns.rcode.NOERROR and not any(r.rdtype == dns.rdatatype.from_text(qtype) for r in reply.answer)


def test_names_between_the_cluster_domain_and_its_records_exist_without_records(zone: Zone) -> None:
    for name in ("svc.cluster.local", "shop.svc.cluster.local", "kube-system.pod.cluster.local", "cluster.local"):
        answer = zone.resolve(name, "A")
        assert (answer.rcode, answer.records) == (dns.rcode.NOERROR, ()), name
    assert zone.resolve("cluster.local", "SOA").records[0].type == "SOA"
    assert zone.resolve("nosuchns.svc.cluster.local", "A").rcode == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("spelling", ["WWW.Example.COM", "www.example.com.", "Www.Example.Com."])
def test_names_are_case_insensitive_with_or_without_the_trailing_dot(zone: Zone, spelling: str) -> None:
    assert zone.resolve(spelling, "a").addresses == ("203.0.113.20", "203.0.113.21")
    reply = zone.respond(dns.message.make_query(spelling, "A"))
    assert reply.rcode() == 0 and reply.answer[0].name == dns.message.make_query(spelling, "A").question[0].name
    assert reply.answer[0].name.to_text().rstrip(".") == spelling.rstrip(".")  # the owner as the question spelled it


def test_formerr_for_several_questions_or_another_opcode(zone: Zone) -> None:
    two = dns.message.make_query("www.example.com", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("static.example.com"), dns.rdataclass.IN, dns.rdatatype.A))
    assert len(two.question) == 2
    assert zone.respond(two).rcode() == dns.rcode.FORMERR
    notify = dns.message.make_query("www.example.com", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    reply = zone.respond(notify)
    assert reply.rcode() == dns.rcode.FORMERR and reply.opcode() == dns.opcode.NOTIFY
    # Bytes that are not a DNS message but have a query's header: FORMERR over UDP, with the id.
    garbage = struct.pack("!HHHHHH", 0x4242, 0, 1, 0, 0, 0) + b"\xff\xff"
    wire = answer_bytes(zone, garbage, ("192.0.2.1", 5353), "UDP")
    assert wire is not None and struct.unpack("!HH", wire[:4]) == (0x4242, dns.flags.QR | dns.rcode.FORMERR)
    # Too short for a header, or a response: no answer at all.
    assert answer_bytes(zone, b"\x00\x01", ("192.0.2.1", 5353), "UDP") is None
    response = dns.message.make_response(dns.message.make_query("www.example.com", "A")).to_wire()
    assert answer_bytes(zone, response, ("192.0.2.1", 5353), "UDP") is None


def test_zone_file_round_trip_and_errors(zone: Zone, tmp_path: Path) -> None:
    path = tmp_path / "zone.json"
    path.write_text(json.dumps(zone.to_json()))
    loaded = Zone.load(str(path))
    assert loaded.to_json() == zone.to_json()
    for name, qtype in (("shop.example.com", "A"), ("www.example.com", "A"), ("svc.cluster.local", "A"),
                        ("nothing.example.com", "A"), ("web.shop.svc.cluster.local", "AAAA")):
        assert loaded.resolve(name, qtype) == zone.resolve(name, qtype)
    bad = zone.to_json()
    bad["addresses"]["www.example.com"]["addresses"][0] = "not-an-address"
    with pytest.raises(ZoneError, match=r"zone.json: addresses.www.example.com.addresses\[0\]: expected an IPv4 address"):
        Zone.from_json(bad, str(path))
    bad = zone.to_json()
    bad["aliases"]["shop.example.com"]["ttl"] = -1
    with pytest.raises(ZoneError, match=r"aliases.shop.example.com.ttl: expected a TTL"):
        Zone.from_json(bad)
    with pytest.raises(ZoneError, match="format: expected 1"):
        Zone.from_json({"addresses": {}})
    path.write_text("{")
    with pytest.raises(ZoneError, match="zone.json: not JSON"):
        Zone.load(str(path))
    with pytest.raises(ZoneError, match="cannot read the zone file"):
        Zone.load(str(tmp_path / "missing.json"))


def many_hosts(tmp_path: Path, count: int) -> Zone:
    world = "\n".join(f"  - {{name: h{i}, address: 203.0.113.{i + 1}, dnsNames: [big.example.com]}}" for i in range(count))
    text = f"name: big\npods:\n  - {{name: p, labels: {{app: p}}}}\nworld:\n{world}\n"
    return zone_from_scenario(load_scenario(write_scenario(tmp_path, text)))


def test_udp_answers_past_512_bytes_are_truncated_unless_edns_allows_them(tmp_path: Path) -> None:
    zone = many_hosts(tmp_path, 40)  # 40 A records: ~16 bytes each past the first, well over 512
    plain = dns.message.make_query("big.example.com", "A")
    assert udp_limit(plain) == 512
    wire = answer_bytes(zone, plain.to_wire(), ("192.0.2.1", 1), "UDP")
    assert wire is not None and len(wire) <= 512
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC and not reply.answer and reply.question[0].name.to_text() == "big.example.com."
    # EDNS with room for it: the whole answer over UDP.
    edns = dns.message.make_query("big.example.com", "A", use_edns=0, payload=1232)
    reply = dns.message.from_wire(answer_bytes(zone, edns.to_wire(), ("192.0.2.1", 1), "UDP"))
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 40
    # EDNS advertising less than it needs: truncated to what it advertised.
    small = dns.message.make_query("big.example.com", "A", use_edns=0, payload=600)
    wire = answer_bytes(zone, small.to_wire(), ("192.0.2.1", 1), "UDP")
    assert len(wire) <= 600 and dns.message.from_wire(wire).flags & dns.flags.TC
    # Over TCP the same question is answered whole.
    reply = dns.message.from_wire(answer_bytes(zone, plain.to_wire(), ("192.0.2.1", 1), "TCP"))
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 40


def test_udp_server_on_loopback(zone: Zone) -> None:
    logged: list[dict] = []

    async def run() -> dns.message.Message:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: UdpServer(zone, logged.append),
                                                           local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        try:
            query = dns.message.make_query("web.shop.svc.cluster.local", "A")
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.setblocking(False)
            client.connect(("127.0.0.1", port))
            try:
                await loop.sock_sendall(client, query.to_wire())
                data = await asyncio.wait_for(loop.sock_recv(client, 65535), 10)
            finally:
                client.close()
            return dns.message.from_wire(data)
        finally:
            transport.close()

    reply = asyncio.run(run())
    assert [rd.address for rd in reply.answer[0]] == ["10.96.0.10"] and reply.answer[0].ttl == 5
    assert logged[0]["dns"] == "web.shop.svc.cluster.local" and logged[0]["rcode"] == "NOERROR"
    assert logged[0]["type"] == "A" and logged[0]["transport"] == "UDP" and logged[0]["client"].startswith("127.0.0.1:")


async def _tcp_server(zone: Zone, log: list[dict], **options: object) -> tuple[asyncio.base_events.Server, int]:
    server = await serve_tcp(zone, "127.0.0.1", 0, log.append, **options)
    return server, server.sockets[0].getsockname()[1]


def frame(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


async def read_frame(reader: asyncio.StreamReader) -> dns.message.Message:
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), 10))


def test_tcp_two_pipelined_queries_on_one_connection(zone: Zone) -> None:
    logged: list[dict] = []

    async def run() -> tuple[dns.message.Message, dns.message.Message, dns.message.Message]:
        server, port = await _tcp_server(zone, logged)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            first = dns.message.make_query("shop.example.com", "A")
            second = dns.message.make_query("nothing.example.com", "A")
            writer.write(frame(first) + frame(second))  # both before reading either answer
            await writer.drain()
            one, two = await read_frame(reader), await read_frame(reader)
            assert (one.id, two.id) == (first.id, second.id)
            # The connection stays open for another query afterwards.
            third = dns.message.make_query("web.shop.svc.cluster.local", "A")
            writer.write(frame(third))
            await writer.drain()
            three = await read_frame(reader)
            writer.close()
            return one, two, three
        finally:
            server.close()
            await server.wait_closed()

    one, two, three = asyncio.run(run())
    assert [dns.rdatatype.to_text(r.rdtype) for r in one.answer] == ["CNAME", "A"]
    assert two.rcode() == dns.rcode.NXDOMAIN and two.authority
    assert [rd.address for rd in three.answer[0]] == ["10.96.0.10"]
    assert [(e["dns"], e["transport"]) for e in logged] == [("shop.example.com", "TCP"), ("nothing.example.com", "TCP"),
                                                          ("web.shop.svc.cluster.local", "TCP")]


@pytest.mark.parametrize("bad", [
    b"\x00\x05hello",                                      # shorter than a DNS header
    b"\xff\xff" + b"x" * 16,                                # longer than any query the server takes
    struct.pack("!H", 14) + struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + b"\xff\xff",  # a header, then garbage
    b"GET / HTTP/1.1\r\nHost: kube-dns\r\n\r\n",          # not DNS at all
])
def test_tcp_malformed_frame_closes_the_connection(zone: Zone, bad: bytes) -> None:
    async def run() -> tuple[dns.message.Message, bytes]:
        server, port = await _tcp_server(zone, [], idle_timeout=30)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            good = dns.message.make_query("www.example.com", "A")
            writer.write(frame(good) + bad)
            await writer.drain()
            answered = await read_frame(reader)
            rest = await asyncio.wait_for(reader.read(), 10)  # EOF: the server closed, well before the idle timeout
            writer.close()
            return answered, rest
        finally:
            server.close()
            await server.wait_closed()

    answered, rest = asyncio.run(run())
    assert answered.rcode() == 0 and rest == b""


def test_tcp_idle_connection_is_closed(zone: Zone) -> None:
    async def run() -> bytes:
        server, port = await _tcp_server(zone, [], idle_timeout=0.2)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = await asyncio.wait_for(reader.read(), 10)  # the server closes it: EOF, nothing sent
            writer.close()
            return data
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()) == b""


def test_tcp_server_bounds_open_connections(zone: Zone) -> None:
    async def run() -> tuple[bytes, dns.message.Message]:
        server = await serve_tcp(zone, "127.0.0.1", 0, None, max_connections=1)
        port = server.sockets[0].getsockname()[1]
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(frame(dns.message.make_query("www.example.com", "A")))
            first = await read_frame(r1)  # the first connection is being served
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            refused = await asyncio.wait_for(r2.read(), 10)
            w1.close()
            w2.close()
            return refused, first
        finally:
            server.close()
            await server.wait_closed()

    refused, first = asyncio.run(run())
    assert refused == b"" and first.rcode() == 0


def test_warm_up_answers_without_error() -> None:
    warm_up()
    assert isinstance(TcpServer(Zone()).max_query, int)


def test_a_dns_probe_over_tcp_is_judged_as_over_udp(tmp_path: Path) -> None:
    """`protocol: TCP` on a DNS probe: the question goes over a TCP connection (RFC 7766 framing);
    any answer but REFUSED is allowed, REFUSED is refused, silence is dropped."""
    from dataplane.probes import _dns_tcp_exchange  # noqa: PLC0415 - the exchange, without a pod namespace

    text = SCENARIO + ("steps:\n  - name: ask\n    probes:\n"
                       "      - {from: client, to: kube-dns, dns: {name: web.shop.svc.cluster.local}, protocol: TCP,"
                       " expect: allowed}\n")
    scenario = load_scenario(write_scenario(tmp_path, text))
    probe = scenario.steps[0].probes[0]
    assert (probe.protocol, probe.destination.port, probe.dns.name) == ("TCP", 53, "web.shop.svc.cluster.local")
    zone = zone_from_scenario(scenario)

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        query = await read_frame(reader)
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.REFUSED)
        writer.write(frame(reply))
        await writer.drain()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads, never answers

    async def ask(handler: object = None, timeout: float = 5.0) -> object:
        import dataclasses  # noqa: PLC0415
        import time  # noqa: PLC0415

        server = (await serve_tcp(zone, "127.0.0.1", 0, None) if handler is None
                  else await asyncio.start_server(handler, "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            return await _dns_tcp_exchange(dataclasses.replace(probe, timeout=timeout), reader, writer, time.monotonic())
        finally:
            server.close()
            await server.wait_closed()

    answered = asyncio.run(ask())
    assert answered.outcome == "allowed" and answered.body == {"rcode": "NOERROR", "answers": ["10.96.0.10"]}
    assert asyncio.run(ask(refuse)).outcome == "refused"
    assert asyncio.run(ask(silent, timeout=0.1)).outcome == "dropped"


def test_pods_resolv_conf_and_hosts_file_as_the_kubelet_writes_them(scenario: Scenario, tmp_path: Path) -> None:
    from dataplane.lab import Lab  # noqa: PLC0415

    lab = Lab(scenario, "cdns-unit")
    dns_pod = scenario.pods["kube-system/kube-dns"].ip
    assert lab._resolv_conf("shop").splitlines() == [
        "search shop.svc.cluster.local svc.cluster.local cluster.local", f"nameserver {dns_pod}", "options ndots:5"]
    assert lab._resolv_conf(None).startswith("nameserver 127.0.0.1\n")  # a world host: outside the cluster
    client = scenario.pods["shop/client"].ip
    lines = [line.split() for line in lab._hosts_file("client", client).splitlines() if not line.startswith("#")]
    assert lines == [["127.0.0.1", "localhost"], [scenario.node_ip, "node"], [client, "client"]]
    # Without a kube-dns pod: no DNS, a lookup fails at once.
    plain = load_scenario(write_scenario(tmp_path, SCENARIO.replace("k8s-app: kube-dns", "app: dns"), "plain.yaml"))
    assert Lab(plain, "cdns-unit")._resolv_conf("shop").startswith("nameserver 127.0.0.1\n")
