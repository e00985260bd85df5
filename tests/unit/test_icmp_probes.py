"""Ping probes without a kernel: the `icmp` field of a scenario probe and its errors, the echo
messages the prober builds and reads (checked against scapy's), the oracle's answer for a
ping, ICMP flow records in Hubble's shape, and `validate` naming the IPv6 `icmps` fields that
can never match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.all import ICMP  # type: ignore[import-untyped]

from dataplane.abi import PROTO_ICMP, Direction, DropReason, FlowVerdict, Hook
from dataplane.ciliummonitor import monitor_line
from dataplane.datapath import FlowEvent
from dataplane.flowrecord import Flow as FlowRecord
from dataplane.flowrecord import record_from_json
from dataplane.flows import kernel_flow
from dataplane.hubble import compact, hubble_flows
from dataplane.icmp import echo_request, parse_echo_reply, type_code_text
from dataplane.policy import Flow, PolicyEngine
from dataplane.flows import Directory
from dataplane.mapstate import EndpointState, MapState
from dataplane.scenario import IcmpMessage, load_scenario, make_probe
from tests.support.scenario_files import scenario_errors as errors_of, write_scenario as write

REPO = Path(__file__).resolve().parents[2]
NODE = "l7lab-icmp"
WHEN = 1796108353.004943
DIRECTORY = Directory({"10.200.0.2": "shop/web", "10.200.0.3": "shop/api"}, {"10.200.0.1": "node"}, {})

BASE = """\
name: demo
namespaces:
  - name: shop
pods:
  - {name: web, namespace: shop, labels: {app: web}, ports: [{port: 80}]}
  - {name: api, namespace: shop, labels: {app: api}, ports: [{port: 8080}]}
world:
  - {name: partner, address: 203.0.113.10, ports: [{port: 443}]}
steps:
  - name: check
    probes:
"""


def with_probes(*lines: str) -> str:
    return BASE + "".join(f"      - {x}\n" for x in lines)


def lab_state() -> MapState:
    st = MapState()
    st.endpoints[11] = EndpointState(11, "shop/web", "10.200.0.2", 256, False, False, labels=(("app", "web"),))
    st.endpoints[12] = EndpointState(12, "shop/api", "10.200.0.3", 257, True, False, labels=(("app", "api"),))
    return st


def test_an_icmp_probe_is_a_ping_to_an_address(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, with_probes("{from: web, to: api, icmp: {type: echo}, expect: allowed}",
                                                   "{from: web, to: partner, protocol: ICMP, expect: dropped}")))
    first, second = sc.steps[0].probes
    assert (first.protocol, first.icmp, first.destination.port, str(first.destination)) == \
        ("ICMP", IcmpMessage("echo"), 0, "shop/api")
    assert (second.protocol, second.icmp, second.destination.ip) == ("ICMP", IcmpMessage("echo"), "203.0.113.10")
    assert first.request_text == "ICMP echo request (ping)"
    flow = Flow.from_probe(first)
    assert (flow.protocol, flow.port, flow.http) == ("ICMP", 8, None)
    assert PolicyEngine(sc).verdict(flow).outcome == "allowed"
    # The command line's words make the same probe (explain, trace).
    cli = make_probe(sc, "web", "api", "ICMP")
    assert (cli.protocol, cli.icmp, cli.destination) == (first.protocol, first.icmp, first.destination)


@pytest.mark.parametrize(("probe", "words"), [
    ("{from: web, to: 'api:8080', icmp: {type: echo}, expect: allowed}",
     "steps[0].probes[0].to: an ICMP echo request goes to an address, not a port: write 'api' without ':8080'"),
    ("{from: web, to: api, icmp: {type: echo}, expect: refused}",
     "steps[0].probes[0].expect: an ICMP echo request is answered by the destination's kernel or not at all"),
    ("{from: web, to: api, icmp: {type: echo}, expect: denied}", "expect allowed, audited or dropped, not 'denied'"),
    ("{from: web, to: api, icmp: {type: echo}, protocol: UDP, expect: allowed}",
     "steps[0].probes[0].protocol: an ICMP probe sends ICMP: protocol must be ICMP (or left out)"),
    ("{from: web, to: api, icmp: {type: echo}, http: {path: /}, expect: allowed}",
     "steps[0].probes[0].http: a probe sends either an ICMP echo request or an HTTP request, not both"),
    ("{from: web, to: api, icmp: {type: timestamp}, expect: allowed}", "steps[0].probes[0].icmp.type"),
])
def test_icmp_probe_errors(tmp_path: Path, probe: str, words: str) -> None:
    errs = errors_of(write(tmp_path, with_probes(probe)))
    assert any(words in e for e in errs), errs


def test_echo_messages_match_scapys() -> None:
    message = echo_request(0x1234, 7, b"l7lab-probe abc")
    ours = ICMP(message)
    built = ICMP(bytes(ICMP(type=8, code=0, id=0x1234, seq=7) / b"l7lab-probe abc"))
    assert (ours.type, ours.id, ours.seq, ours.chksum) == (8, 0x1234, 7, built.chksum)
    reply = bytes(ICMP(type=0, id=0x1234, seq=7) / b"l7lab-probe abc")
    assert parse_echo_reply(reply) == (0x1234, 7, b"l7lab-probe abc")
    assert parse_echo_reply(message) is None  # a request is no reply
    assert parse_echo_reply(reply[:2] + b"\x00\x00" + reply[4:]) is None  # a wrong checksum
    assert parse_echo_reply(reply[:6]) is None


def test_hubble_names_icmp_types_and_codes_as_gopacket_does() -> None:
    assert [type_code_text(t, c) for t, c in ((8, 0), (0, 0), (3, 3), (11, 0), (3, 99), (8, 1), (42, 0))] == [
        "EchoRequest", "EchoReply", "DestinationUnreachable(Port)", "TimeExceeded(TTLExceeded)",
        "DestinationUnreachable(Code: 99)", "EchoRequest(Code: 1)", "42(0)"]


def ping_event(verdict: FlowVerdict, reason: DropReason = DropReason.NONE, icmp_type: int = 8) -> FlowEvent:
    # The datapath's tuple of an echo request: sport 0, dport the echo id (lib/parse.h).
    return FlowEvent(ts_ns=1, src="10.200.0.2", dst="10.200.0.3", sport=0, dport=4242, protocol=PROTO_ICMP,
                     verdict=verdict, reason=reason, direction=Direction.INGRESS, src_identity=256,
                     dst_identity=257, src_endpoint=11, dst_endpoint=12, rule_id=0, proxy_port=0, tcp_flags=0,
                     hook=Hook.FROM_CONTAINER, ifindex=5, length=98, icmp_type=icmp_type, icmp_code=0)


def test_icmp_flow_records_carry_type_code_and_echo_id() -> None:
    record = kernel_flow(ping_event(FlowVerdict.DROP, DropReason.POLICY_DENIED), lab_state(), DIRECTORY, WHEN)
    assert (record.source.port, record.destination.port) == (0, 0)  # ICMP has no ports
    assert record.l4.icmp is not None and (record.l4.icmp.type, record.l4.icmp.code, record.l4.icmp.echo_id) == (8, 0, 4242)
    again = record_from_json(json.loads(json.dumps(record.to_json())))
    assert isinstance(again, FlowRecord) and again.l4 == record.l4
    verdict, drop = hubble_flows(record, NODE)
    assert verdict["l4"] == {"ICMPv4": {"type": 8}} and verdict["Summary"] == "ICMPv4 EchoRequest"
    assert compact(drop).endswith("Policy denied DROPPED (ICMPv4 EchoRequest)")
    assert monitor_line(drop).endswith(": 10.200.0.2 -> 10.200.0.3 EchoRequest")
    reply = kernel_flow(ping_event(FlowVerdict.FORWARD, icmp_type=0), lab_state(), DIRECTORY, WHEN)
    assert hubble_flows(reply, NODE)[0]["l4"] == {"ICMPv4": {}}  # type 0, code 0: protojson leaves zeros out


def test_validate_notes_ipv6_icmp_fields(tmp_path: Path) -> None:
    policy = REPO / "scenarios" / "policies" / "icmp-client-ingress-from-client2.yaml"
    out = subprocess.run([sys.executable, "-m", "dataplane.cli", "validate", "--json", str(policy),
                          str(REPO / "scenarios" / "connectivity.yaml")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["valid"] and list(report["notices"]) == [str(policy)]
    (note,) = report["notices"][str(policy)]
    assert note.startswith("CiliumNetworkPolicy cilium-test/client-ingress-from-client2-icmp spec.ingress[0]: "
                           "icmps ICMPv6 type 128 (EchoRequest) can never match")
    text = subprocess.run([sys.executable, "-m", "dataplane.cli", "validate", str(REPO / "scenarios" / "icmp.yaml")],
                          cwd=REPO, capture_output=True, text=True)
    assert text.returncode == 0 and "icmp.yaml: valid\n  notice: " in text.stdout
