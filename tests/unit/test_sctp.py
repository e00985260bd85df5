"""SCTP without a kernel: CRC32c against the published test vectors, INIT / INIT-ACK / ABORT
as the prober and the pod servers build and read them (checked against scapy's SCTP layer),
the server's answer to an INIT, SCTP ports and probes in scenarios and their errors, and the
oracle's answer for an SCTP probe."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from scapy.all import SCTP, raw  # type: ignore[import-untyped]

from dataplane import sctp
from dataplane.logfiles import read_all
from dataplane.podserver import _SctpResponder, open_log
from dataplane.policy import Flow, PolicyEngine
from dataplane.probes import _icmp_error_for
from dataplane.scenario import Port, load_scenario
from tests.support.scenario_files import scenario_errors as errors_of, write_scenario as write

BASE = """\
name: demo
pods:
  - name: web
    labels: {app: web}
  - name: db
    labels: {app: db}
    ports: [{port: 5432}, {port: 9000, protocol: SCTP, name: sigtran}, {port: 9001, protocol: SCTP}]
world:
  - {name: peer, address: 198.51.100.38, ports: [{port: 3868, protocol: SCTP}]}
services:
  - {name: db-svc, selector: {app: db}, ports: [{port: 5432}]}
policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: db-sctp}
    spec:
      podSelector: {matchLabels: {app: db}}
      ingress:
        - ports: [{port: 9000, protocol: SCTP}]
steps:
  - name: check
    probes:
"""


def with_probes(*lines: str) -> str:
    return BASE + "".join(f"      - {x}\n" for x in lines)


# ---------------------------------------------------------------------------------- packets

@pytest.mark.parametrize("data, crc", [
    (b"123456789", 0xE3069283),          # the CRC-32C check value
    (bytes(32), 0x8A9136AA),             # RFC 3720 B.4: 32 bytes of zeros
    (b"\xff" * 32, 0x62A8AB43),          # 32 bytes of ones
    (bytes(range(32)), 0x46DD794E),      # incrementing
    (bytes(range(31, -1, -1)), 0x113FDB5C),  # decrementing
])
def test_crc32c_known_vectors(data: bytes, crc: int) -> None:
    assert sctp.crc32c(data) == crc


def test_init_is_what_scapy_reads_and_checksums_alike() -> None:
    packet = sctp.init(40000, 9000, 0xDEADBEEF, 7)
    parsed = SCTP(packet)
    assert (parsed.sport, parsed.dport, parsed.tag) == (40000, 9000, 0)
    assert parsed.payload.type == 1 and parsed.payload.init_tag == 0xDEADBEEF and parsed.payload.init_tsn == 7
    parsed.chksum = None  # scapy computes it again
    assert raw(parsed) == packet
    assert sctp.parse(packet) == sctp.Packet(40000, 9000, 0, sctp.INIT, 0, 0xDEADBEEF)
    with pytest.raises(ValueError):
        sctp.init(40000, 9000, 0, 7)


def test_init_ack_answers_the_init_with_its_tag_and_a_cookie() -> None:
    request = sctp.parse(sctp.init(40000, 9000, 0xDEADBEEF, 7))
    assert request is not None
    answer = sctp.init_ack(request, 0x01020304, 99, b"l7lab x/db")
    parsed = SCTP(answer)
    assert (parsed.sport, parsed.dport, parsed.tag) == (9000, 40000, 0xDEADBEEF)
    assert parsed.payload.type == 2 and parsed.payload.init_tag == 0x01020304
    assert any(p.type == sctp.STATE_COOKIE and p.cookie == b"l7lab x/db" for p in parsed.payload.params)
    parsed.chksum = None
    assert raw(parsed) == answer
    assert sctp.parse(answer) == sctp.Packet(9000, 40000, 0xDEADBEEF, sctp.INIT_ACK, 0, 0x01020304)


def test_abort_for_an_init_carries_the_initiate_tag_without_the_t_bit() -> None:
    request = sctp.parse(sctp.init(40000, 9002, 0xCAFE, 1))
    assert request is not None
    parsed = SCTP(sctp.abort_for(request))
    assert (parsed.sport, parsed.dport, parsed.tag) == (9002, 40000, 0xCAFE)
    assert parsed.payload.type == 6 and parsed.payload.TCB == 0  # scapy names the T bit TCB


def test_a_packet_with_a_wrong_checksum_or_cut_short_is_ignored() -> None:
    packet = bytearray(sctp.init(40000, 9000, 5, 1))
    assert sctp.checksum_ok(bytes(packet))
    packet[-1] ^= 1
    assert not sctp.checksum_ok(bytes(packet)) and sctp.parse(bytes(packet)) is None
    good = sctp.init(40000, 9000, 5, 1)
    assert sctp.parse(good[:20]) is None and sctp.parse(good[:8]) is None


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload


class FakeRaw:
    """Where the responder sends its answers (the raw socket's `sendto`)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sent.append((data, addr))
        return len(data)


def test_the_server_answers_an_init_by_port_and_logs_it(tmp_path: Path) -> None:
    out = FakeRaw()
    log = open_log(str(tmp_path / "requests.jsonl"), None)
    responder = _SctpResponder(out, [9000], {"endpoint": "x/db"}, log, answer=True)  # type: ignore[arg-type]
    responder.handle(ipv4("10.200.0.2", "10.200.0.3", 132, sctp.init(40000, 9000, 0xAB, 1)))
    responder.handle(ipv4("10.200.0.2", "10.200.0.3", 132, sctp.init(40001, 9002, 0xCD, 1)))
    # Not an INIT (an ABORT, a bad checksum): no answer, no record.
    responder.handle(ipv4("10.200.0.2", "10.200.0.3", 132, sctp.abort_for(sctp.parse(sctp.init(9000, 40000, 1, 1)))))
    responder.handle(ipv4("10.200.0.2", "10.200.0.3", 132, sctp.init(40002, 9000, 0xEF, 1)[:-1] + b"\x00"))
    answers = [(sctp.parse(data), addr) for data, addr in out.sent]
    assert [(p.chunk_name, p.sport, p.dport, p.tag, addr) for p, addr in answers] == [
        ("INIT_ACK", 9000, 40000, 0xAB, ("10.200.0.2", 0)), ("ABORT", 9002, 40001, 0xCD, ("10.200.0.2", 0))]
    assert log is not None
    log.close()
    records = read_all(tmp_path / "requests.jsonl")
    assert records == [
        {"endpoint": "x/db", "sctp": "INIT", "client": "10.200.0.2:40000", "server": "10.200.0.3", "server_port": 9000,
         "answer": "INIT_ACK"},
        {"endpoint": "x/db", "sctp": "INIT", "client": "10.200.0.2:40001", "server": "10.200.0.3", "server_port": 9002,
         "answer": "ABORT"}]
    # With the kernel's SCTP stack answering, the server only logs.
    quiet = FakeRaw()
    _SctpResponder(quiet, [9000], {"endpoint": "x/db"}, None, answer=False).handle(  # type: ignore[arg-type]
        ipv4("10.200.0.2", "10.200.0.3", 132, sctp.init(40000, 9000, 0xAB, 1)))
    assert quiet.sent == []


def test_an_icmp_protocol_unreachable_quoting_the_init_is_recognised() -> None:
    init = sctp.init(40000, 9000, 0xAB, 1)
    quoted = ipv4("10.200.0.2", "10.200.0.4", 132, init)[:28]  # the IP header and 8 bytes of it
    error = ipv4("10.200.0.4", "10.200.0.2", 1, bytes([3, 2, 0, 0, 0, 0, 0, 0]) + quoted)
    assert _icmp_error_for(error, "10.200.0.4", 40000, 9000) == 2
    assert _icmp_error_for(error, "10.200.0.4", 40001, 9000) is None  # another flow's
    assert _icmp_error_for(error, "10.200.0.5", 40000, 9000) is None
    echo = ipv4("10.200.0.4", "10.200.0.2", 1, bytes([0, 0, 0, 0, 0, 0, 0, 0]) + quoted)
    assert _icmp_error_for(echo, "10.200.0.4", 40000, 9000) is None


# -------------------------------------------------------------------------------- scenarios

def test_sctp_ports_and_probes_load(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, with_probes("{from: web, to: db, protocol: SCTP, expect: allowed}",
                                                   "{from: web, to: db:9001, protocol: SCTP, expect: dropped}",
                                                   "{from: web, to: peer, protocol: SCTP, expect: allowed}",
                                                   "{from: web, to: peer:3869, protocol: SCTP, expect: refused}")))
    assert Port(9000, "SCTP", "sigtran") in sc.pods["default/db"].ports
    assert sc.world["peer"].ports == (Port(3868, "SCTP"),)
    probes = sc.steps[0].probes
    # Without a port, the destination's first SCTP port.
    assert [(p.protocol, p.destination.port) for p in probes] == [("SCTP", 9000), ("SCTP", 9001), ("SCTP", 3868),
                                                                  ("SCTP", 3869)]
    assert probes[0].request_text == "SCTP INIT"
    engine = PolicyEngine(sc)
    flow = Flow.from_probe(probes[0])
    assert (flow.protocol, flow.port, flow.http) == ("SCTP", 9000, None)
    assert [engine.verdict(Flow.from_probe(p)).outcome for p in probes] == ["allowed", "dropped", "allowed", "refused"]


@pytest.mark.parametrize("probe, words", [
    ("{from: web, to: db:9000, protocol: SCTP, expect: denied}", "'denied' is an HTTP answer (403); a SCTP probe"),
    ("{from: web, to: web, protocol: SCTP, expect: allowed}", "'web' declares no SCTP port; write web:PORT"),
    ("{from: web, to: db:9000, protocol: SCTP, http: {path: /}, expect: allowed}", "an HTTP request needs protocol TCP"),
    ("{from: web, to: db-svc:9000, protocol: SCTP, expect: allowed}", "service default/db-svc has no port 9000/SCTP"),
    ("{from: web, to: db, protocol: SCTPX, expect: allowed}", "protocol"),
])
def test_sctp_probe_errors(tmp_path: Path, probe: str, words: str) -> None:
    errs = errors_of(write(tmp_path, with_probes(probe)))
    assert any(words in e for e in errs), errs


def test_an_sctp_port_declared_twice_is_an_error_but_tcp_on_the_same_number_is_not(tmp_path: Path) -> None:
    text = BASE.replace("{port: 9001, protocol: SCTP}", "{port: 9000, protocol: SCTP}") + "      - {from: web, to: db, expect: allowed}\n"
    errs = errors_of(write(tmp_path, text))
    assert any("port 9000/SCTP is declared twice" in e for e in errs), errs
    ok = BASE.replace("{port: 5432}", "{port: 9000}") + "      - {from: web, to: db, expect: allowed}\n"
    assert Port(9000, "TCP") in load_scenario(write(tmp_path, ok)).pods["default/db"].ports


def test_the_shipped_sctp_scenario_passes_on_the_oracle() -> None:
    """scenarios/sctp.yaml's expectations are the oracle's answers (the kernel run is in
    tests/kernel/test_scenarios.py)."""
    path = Path(__file__).resolve().parents[2] / "scenarios" / "sctp.yaml"
    sc = load_scenario(path)
    engine = PolicyEngine(sc)
    checked = 0
    for step in sc.steps:
        if step.probes:
            for probe in step.probes:
                assert engine.verdict(Flow.from_probe(probe)).expectation == probe.expect, (str(probe.location), probe)
                checked += probe.protocol == "SCTP"
        else:
            engine.apply_step(step)
    assert checked >= 10


def test_sctp_under_an_l7_redirect_is_dropped_by_the_oracle(tmp_path: Path) -> None:
    """DNS rules on a port of protocol ANY redirect SCTP too, which no proxy side receives: the
    datapath drops it (no proxy socket), so the oracle answers dropped, with the reason."""
    policy = """\
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: dns-any}
    spec:
      endpointSelector: {matchLabels: {app: db}}
      ingress:
        - toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
"""
    head, rest = BASE.split("policies:\n")
    text = (head.replace("{port: 9001, protocol: SCTP}", "{port: 53, protocol: SCTP}, {port: 53, protocol: UDP}")
            + "policies:\n" + policy + "steps:" + rest.split("steps:", 1)[1])
    sc = load_scenario(write(tmp_path, text + "      - {from: web, to: db:53, protocol: SCTP, expect: dropped}\n"
                                              "      - {from: web, to: db, dns: {name: db}, expect: allowed}\n"))
    engine = PolicyEngine(sc)
    sctp_probe, dns_probe = sc.steps[0].probes
    decision = engine.verdict(Flow.from_probe(sctp_probe))
    assert decision.outcome == "dropped"
    assert any("no SCTP side" in line and "fail closed" in line for line in decision.trace), decision.trace
    assert engine.verdict(Flow.from_probe(dns_probe)).outcome == "allowed"
