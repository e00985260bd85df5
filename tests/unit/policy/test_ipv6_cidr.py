"""IPv6 CIDRs in policies (Cilium's connectivity suite writes `toCIDR: [0.0.0.0/0, ::/0]`): they
parse, the IPv4 part applies, the IPv6 part selects nothing in the IPv4-only lab, a rule whose
peers are all IPv6 allows nothing while its section still enforces default deny, and validate
and explain say so."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.errors import ErrorList, SourceError
from dataplane.policy.api import CIDRPeer
from dataplane.policy.engine import Flow, PolicyEngine
from dataplane.policy.notices import policy_notices
from dataplane.policy.parse import parse_documents
from dataplane.scenario import parse_scenario
from dataplane.yamlsource import load_documents

BASE = """\
name: ipv6-cidrs
namespaces:
  - {name: x}
pods:
  - {name: client, namespace: x, labels: {app: client}}
  - {name: server, namespace: x, labels: {app: server}, ports: [{port: 80}]}
world:
  - {name: outside, address: 203.0.113.40, ports: [{port: 80}]}
policies:
"""


def _engine(policy: str) -> PolicyEngine:
    (doc,) = load_documents(BASE + policy, "ipv6.yaml")
    return PolicyEngine(parse_scenario(doc, Path("ipv6.yaml")))


def _egress(engine: PolicyEngine, to: str) -> str:
    ip = engine.scenario.world["outside"].address if to == "outside" else engine.scenario.pods[to].ip
    return engine.verdict(Flow("x/client", ip, "TCP", 80)).outcome


CNP = """\
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: egress, namespace: x}}
    spec:
      endpointSelector: {{matchLabels: {{app: client}}}}
      egress:
        - {rule}
"""


def test_dual_stack_to_cidr_allows_ipv4_world_and_nothing_more() -> None:
    engine = _engine(CNP.format(rule='toCIDR: ["0.0.0.0/0", "::/0"]'))
    (policy,) = engine.policies.values()
    (rule,) = policy.specs[0].rules
    assert rule.peers == (CIDRPeer("0.0.0.0/0"), CIDRPeer("::/0"))
    assert _egress(engine, "outside") == "allowed"
    # toCIDR never selects pods: egress to a pod stays in default deny.
    assert _egress(engine, "x/server") == "dropped"


def test_ipv6_only_peers_allow_nothing_and_still_enforce_default_deny() -> None:
    for rule in ('toCIDR: ["::/0"]', 'toCIDRSet: [{cidr: "2001:db8::/32", except: ["2001:db8:1::/48"]}]'):
        engine = _engine(CNP.format(rule=rule))
        state = engine.map_state()
        client = engine.endpoint_id("x/client")
        assert state.endpoints[client].egress_enforced
        assert not [k for k in state.policy if k.endpoint_id == client and k.direction.name == "EGRESS"]
        assert _egress(engine, "outside") == "dropped"
        assert _egress(engine, "x/server") == "dropped"
        # No IPv6 prefix reaches the ipcache the datapath gets.
        assert all(":" not in prefix for prefix in state.ipcache)


def test_ipv6_to_cidr_with_ports_is_not_a_port_only_rule() -> None:
    """A rule naming only IPv6 peers and ports must not become "any peer on these ports"."""
    engine = _engine(CNP.format(rule='{toCIDR: ["::/0"], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}'))
    assert _egress(engine, "outside") == "dropped"


def test_kubernetes_ipv6_ip_block_is_accepted_and_selects_nothing() -> None:
    engine = _engine("""\
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: v6, namespace: x}
    spec:
      podSelector: {matchLabels: {app: client}}
      policyTypes: [Egress]
      egress:
        - to: [{ipBlock: {cidr: "::/0", except: ["fd00::/8"]}}]
""")
    assert _egress(engine, "outside") == "dropped"
    assert _egress(engine, "x/server") == "dropped"


def test_explain_says_the_ipv6_part_can_never_match() -> None:
    engine = _engine(CNP.format(rule='toCIDR: ["0.0.0.0/0", "::/0"]'))
    decision = engine.verdict(Flow("x/client", engine.scenario.world["outside"].address, "TCP", 80))
    notes = [line for line in decision.trace if "IPv6" in line]
    assert len(notes) == 1 and "::/0" in notes[0] and "can never match" in notes[0], decision.trace


def test_notices_name_the_rule_and_the_default_deny_of_an_ipv6_only_rule() -> None:
    (doc,) = load_documents(CNP.format(rule='toCIDR: ["::/0"]').replace("  - ", "", 1).replace("\n    ", "\n"),
                            "p.yaml")
    (line,) = policy_notices(parse_documents([doc]))
    assert line.startswith("CiliumNetworkPolicy x/egress spec.egress[0]: IPv6 CIDR ::/0 accepted")
    assert "default deny for egress" in line
    (doc,) = load_documents(CNP.format(rule='toCIDR: ["10.0.0.0/8"]').replace("  - ", "", 1).replace("\n    ", "\n"),
                            "p.yaml")
    assert policy_notices(parse_documents([doc])) == []


@pytest.mark.parametrize("cidr, excepts, message", [
    ("2001:db8::/32", ["10.0.0.0/8"], "must be a strict subnet of 2001:db8::/32"),
    ("10.0.0.0/8", ["2001:db8::/48"], "must be a strict subnet of 10.0.0.0/8"),
    ("2001:db8::zz/32", [], "invalid CIDR '2001:db8::zz/32'"),
])
def test_mixed_families_and_bad_ipv6_are_errors(cidr: str, excepts: list[str], message: str) -> None:
    text = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bad, namespace: x}}
spec:
  endpointSelector: {{}}
  egress:
    - toCIDRSet: [{{cidr: "{cidr}", except: {excepts}}}]
"""
    with pytest.raises((ErrorList, SourceError)) as exc:
        parse_documents(load_documents(text, "bad.yaml"))
    assert message in str(exc.value) and "toCIDRSet[0]" in str(exc.value)
