"""CiliumNetworkPolicy `icmps` rules and ICMP under every other rule, as Cilium has them. Sources
(read, not copied): cilium/cilium pkg/policy/api/icmp.go (fields, family, type names),
rule_validation.go (icmps and toPorts exclude each other, at most 40 fields), pkg/policy/rule.go
(mergeIngress/mergeEgress: an L3-only rule is protocol ANY port 0; toPorts ANY expands to TCP,
UDP, SCTP; an ICMP field is protocol ICMP with the type as the port); the Kubernetes
NetworkPolicy API (a peer without ports allows every protocol)."""

from __future__ import annotations

import pytest

from dataplane.abi import IDENTITY_ANY, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Direction, Verdict
from dataplane.mapstate import PolicyKey
from dataplane.policy import Flow
from dataplane.policy.api import PortSpec
from dataplane.policy.notices import icmpv6_notes

from dataplane.errors import ErrorList, SourceError
from tests.support.policy import cnp, engine, outcome, policy_docs

CNP_HEAD = cnp("endpointSelector: {matchLabels: {app: api}}", name="api").rstrip("\n") + "\n"


def one_error(text: str) -> str:
    with pytest.raises((ErrorList, SourceError)) as info:
        policy_docs(text)
    errors = info.value.errors if isinstance(info.value, ErrorList) else [info.value]
    assert len(errors) == 1, errors
    return str(errors[0])

def ping(eng, src: str, dst: str) -> str:  # noqa: ANN001 - a PolicyEngine
    return outcome(eng, src, dst, 8, "ICMP")


def ports_of(text: str) -> list[tuple[PortSpec, ...]]:
    (policy,) = policy_docs(text)
    return [pr.ports for spec in policy.specs for rule in spec.rules for pr in rule.port_rules]


def test_icmp_fields_by_number_string_and_name_per_family() -> None:
    got = ports_of(cnp("""
    endpointSelector: {}
    ingress:
      - icmps:
          - fields: [{type: 8}, {type: "0", family: IPv4}, {type: EchoRequest}, {type: Echo}]
          - fields: [{type: EchoRequest, family: IPv6}, {type: 135, family: IPv6}]
    """))
    assert got == [(PortSpec("ICMP", 8), PortSpec("ICMP", 0), PortSpec("ICMP", 8), PortSpec("ICMP", 8)),
                   (PortSpec("ICMPv6", 128), PortSpec("ICMPv6", 135))]
    assert PortSpec("ICMP", 8).describe() == "ICMP type 8 (EchoRequest)"


@pytest.mark.parametrize(("fields", "path", "words"), [
    ("[{type: EchoRequst}]", "icmps[0].fields[0].type", "ICMP type 'EchoRequst' not found in IPv4"),
    ("[{type: NeighborSolicitation}]", "icmps[0].fields[0].type", "is an IPv6 type: set family: IPv6"),
    ("[{type: Photuris, family: IPv6}]", "icmps[0].fields[0].type", "is an IPv4 type: set family: IPv4"),
    ("[{type: 256}]", "icmps[0].fields[0].type", "ICMP type 256 is out of range: expected 0-255"),
    ("[{type: true}]", "icmps[0].fields[0].type", "expected an ICMP type 0-255 or a type name"),
    ("[{type: 8, family: ipv4}]", "icmps[0].fields[0].family", "expected family IPv4 or IPv6, got 'ipv4'"),
    ("[{family: IPv4}]", "icmps[0].fields[0]", "type is required"),
    ("[{type: 8, code: 0}]", "icmps[0].fields[0].code", "unknown field 'code'"),
    ("{type: 8}", "icmps[0].fields", "expected a list of ICMP fields"),
])
def test_malformed_icmp_fields(fields: str, path: str, words: str) -> None:
    err = one_error(CNP_HEAD + f"  ingress:\n    - icmps: [{{fields: {fields}}}]\n")
    assert f"spec.ingress[0].{path}:" in err and words in err, err


def test_icmps_and_to_ports_exclude_each_other_in_every_section() -> None:
    for section in ("ingress", "egress", "ingressDeny", "egressDeny"):
        err = one_error(CNP_HEAD + f"  {section}:\n    - icmps: [{{fields: [{{type: 8}}]}}]\n"
                                   "      toPorts: [{ports: [{port: '80'}]}]\n")
        assert f"spec.{section}[0].icmps: icmps and toPorts cannot be used together in one rule" in err


def test_too_many_fields() -> None:
    fields = ", ".join("{type: 8}" for _ in range(41))
    err = one_error(CNP_HEAD + f"  ingress:\n    - icmps: [{{fields: [{fields}]}}]\n")
    assert "41 ICMP fields, more than the limit of 40" in err


def test_icmps_key_protocol_icmp_and_the_type_as_port() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {pod: a}}
    ingress:
      - fromEndpoints: [{matchLabels: {pod: b}}]
        icmps: [{fields: [{type: EchoRequest}, {type: EchoReply}, {type: EchoRequest, family: IPv6}]}]
    """, namespace="x"))
    ep = eng.endpoint_id("x/a")
    keys = {k for k in eng.map_state().policy if k.endpoint_id == ep and k.direction == Direction.INGRESS}
    b = eng.identities.pod_identity["x/b"]
    # Type 0 is port 0 alone, never "every port"; the IPv6 field makes no entry.
    assert {(k.identity, k.protocol, k.port, k.port_prefix) for k in keys if k.identity == b} == \
        {(b, PROTO_ICMP, 8, 16), (b, PROTO_ICMP, 0, 16)}
    assert ping(eng, "x/b", "x/a") == "allowed"
    assert ping(eng, "x/c", "x/a") == "dropped"
    assert outcome(eng, "x/b", "x/a", 0, "ICMP") == "allowed"  # an echo reply's type
    assert outcome(eng, "x/b", "x/a", 13, "ICMP") == "dropped"  # a timestamp request
    assert outcome(eng, "x/b", "x/a", 80, "TCP") == "dropped"


def test_icmps_without_l3_apply_to_every_peer() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {pod: a}}
    egress: [{icmps: [{fields: [{type: 8}]}]}]
    """, namespace="x"))
    ep = eng.endpoint_id("x/a")
    assert PolicyKey(ep, Direction.EGRESS, IDENTITY_ANY, PROTO_ICMP, 8, 16) in eng.map_state().policy
    assert ping(eng, "x/a", "y/c") == "allowed"
    assert outcome(eng, "x/a", "y/c", 80, "TCP") == "dropped"


def test_l3_only_rules_allow_icmp_to_ports_never_do() -> None:
    l3 = engine(cnp("""
    endpointSelector: {matchLabels: {pod: a}}
    ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
    """, namespace="x"))
    assert ping(l3, "x/b", "x/a") == "allowed"
    for ports in ('[{port: "80", protocol: TCP}]', '[{port: "0"}]', '[{port: "0", protocol: ANY}]'):
        eng = engine(cnp(f"""
        endpointSelector: {{matchLabels: {{pod: a}}}}
        ingress:
          - fromEndpoints: [{{matchLabels: {{pod: b}}}}]
            toPorts: [{{ports: {ports}}}]
        """, namespace="x"))
        assert ping(eng, "x/b", "x/a") == "dropped", ports
        assert outcome(eng, "x/b", "x/a", 80, "TCP") == "allowed", ports
    # Protocol ANY on port 0 is TCP, UDP and SCTP on every port: three entries, no wildcard.
    ep = eng.endpoint_id("x/a")
    b = eng.identities.pod_identity["x/b"]
    assert {(k.protocol, k.port_prefix) for k in eng.map_state().policy
            if k.endpoint_id == ep and k.identity == b} == {(PROTO_TCP, 0), (PROTO_UDP, 0), (PROTO_SCTP, 0)}


def test_kubernetes_peers_without_ports_allow_icmp() -> None:
    open_peer = engine("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: k, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
""")
    assert ping(open_peer, "x/b", "x/a") == "allowed"
    assert ping(open_peer, "x/c", "x/a") == "dropped"
    with_ports = engine("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: k, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{protocol: TCP}, {protocol: UDP}]}]
""")
    assert ping(with_ports, "x/b", "x/a") == "dropped"


def test_icmp_deny_wins_over_l3_allow() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {pod: a}}
    ingress: [{fromEntities: [all]}]
    ingressDeny: [{fromEndpoints: [{matchLabels: {pod: b}}], icmps: [{fields: [{type: EchoRequest}]}]}]
    """, namespace="x"))
    ep = eng.endpoint_id("x/a")
    b = eng.identities.pod_identity["x/b"]
    assert eng.map_state().policy[PolicyKey(ep, Direction.INGRESS, b, PROTO_ICMP, 8, 16)].verdict == Verdict.DENY
    assert ping(eng, "x/b", "x/a") == "dropped"
    assert ping(eng, "x/c", "x/a") == "allowed"
    assert outcome(eng, "x/b", "x/a", 0, "ICMP") == "allowed"
    assert outcome(eng, "x/b", "x/a", 80, "TCP") == "allowed"


def test_explain_says_an_ipv6_field_can_never_match() -> None:
    text = cnp("""
    endpointSelector: {matchLabels: {pod: a}}
    ingress:
      - fromEndpoints: [{matchLabels: {pod: b}}]
        icmps: [{fields: [{type: 8}, {type: EchoRequest, family: IPv6}]}]
    """, namespace="x")
    eng = engine(text)
    sc = eng.scenario
    decision = eng.verdict(Flow("x/b", sc.pods["x/a"].ip, "ICMP", 8))
    assert decision.outcome == "allowed"
    assert decision.trace[0] == f"flow: pod x/b -> {sc.pods['x/a'].ip} ICMP type 8 (EchoRequest)"
    notes = [line for line in decision.trace if "note:" in line]
    assert notes == ["  note: CiliumNetworkPolicy x/p spec.ingress[0]: icmps ICMPv6 type 128 (EchoRequest) can never "
                     "match: the lab carries no IPv6 (IPv6 packets are dropped as UNSUPPORTED_L3)"]
    assert any("proto=ICMP port=8 -> ALLOW" in line for line in decision.trace)
    assert icmpv6_notes(policy_docs(text)) == [notes[0].removeprefix("  note: ")]
    # A TCP flow is not told about ICMP.
    assert not [line for line in eng.verdict(Flow("x/b", sc.pods["x/a"].ip, "TCP", 80)).trace if "note:" in line]
