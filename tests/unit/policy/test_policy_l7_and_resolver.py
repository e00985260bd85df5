"""L7 matching primitives, identities, ipcache and the map state the resolver emits."""

from __future__ import annotations

import pytest

from dataplane.mapstate import lookup_policy
from dataplane.abi import Direction, IDENTITY_FIRST_CIDR, IDENTITY_HOST, IDENTITY_WORLD, PROXY_PORT, Verdict
from dataplane.policy import L7Policy
from l7.dns import DnsRule, fqdn_matches
from l7.http import HttpRule
from l7.regex import compile_regex

from tests.support.policy import CILIUM_TOPOLOGY as TOPO
from tests.support.policy import L7_API, cnp, engine


@pytest.mark.parametrize("pattern,name,expected", [
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "WWW.Example.COM.", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("*", "anything.at.all", True),
    ("api-*.example.com", "api-v1.example.com", True),
    ("api-*.example.com", "api.example.com", False),
    ("*.*.example.com", "a.b.example.com", True),
    ("www.example.com", "wwwxexample.com", False),  # dots are literal
])
def test_fqdn_patterns(pattern, name, expected):
    assert fqdn_matches(name, match_pattern=pattern) is expected


def test_http_rule_full_match():
    rule = HttpRule(method="GET|HEAD", path="/a/[0-9]+")
    assert rule.matches("GET", "/a/12", {})
    assert rule.matches("HEAD", "/a/1", {})
    assert not rule.matches("GETX", "/a/1", {})
    assert not rule.matches("GET", "/a/1/", {})
    with pytest.raises(ValueError, match="invalid RE2 regex"):
        compile_regex("(?<=x)")


def test_dns_rule():
    assert DnsRule(match_name="a.example.com").matches("A.example.com.")
    assert not DnsRule(match_pattern="*.example.com").matches("example.com")


def test_identities_are_deterministic_and_reserved_ones_fixed():
    e1, e2 = engine(), engine()
    assert e1.identities.pod_identity == e2.identities.pod_identity
    assert min(e1.identities.pod_identity.values()) == 256
    # x/a, y/a, z/a differ by namespace: 9 distinct label sets
    assert len(set(e1.identities.pod_identity.values())) == 9
    state = e1.map_state()
    assert state.ipcache["0.0.0.0/0"] == IDENTITY_WORLD
    for address in e1.scenario.node_addresses():
        assert state.ipcache[f"{address}/32"] == IDENTITY_HOST
    for key, pod in e1.scenario.pods.items():
        assert state.ipcache[f"{pod.ip}/32"] == e1.identities.pod_identity[key]
    assert [ep.endpoint_id for ep in state.endpoints.values()] == list(range(1, 10))
    assert [ep.name for ep in state.endpoints.values()] == list(e1.scenario.pods)


def test_same_labels_share_an_identity():
    topo = "name: t\npods:\n  - {name: a, labels: {app: x}}\n  - {name: b, labels: {app: x}}\n  - {name: c, labels: {app: y}}\n"
    eng = engine(topology=topo)
    ids = eng.identities.pod_identity
    assert ids["default/a"] == ids["default/b"] != ids["default/c"]


def test_cidr_identities_include_except_prefixes():
    eng = engine(cnp("""
    endpointSelector: {}
    egress:
      - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]
      - toCIDR: [0.0.0.0/0]
    """), TOPO)
    ipc = eng.map_state().ipcache
    assert ipc["203.0.113.0/24"] == IDENTITY_FIRST_CIDR
    assert ipc["203.0.113.128/25"] == IDENTITY_FIRST_CIDR + 1
    assert ipc["0.0.0.0/0"] == IDENTITY_WORLD


def test_redirect_entry_rule_attribution_and_typed_l7():
    eng = engine(L7_API, TOPO)
    state = eng.map_state()
    api = eng.endpoint_id("shop/api")
    front = eng.identities.pod_identity["shop/frontend"]
    verdict, found = lookup_policy(state, api, Direction.INGRESS, front, 6, 8080)
    assert verdict == Verdict.REDIRECT
    (key, entry), = found
    assert entry.proxy_port == PROXY_PORT
    attr = state.rules[entry.rule_ids[0]]
    assert (attr.policy, attr.rule_index, attr.section) == ("CiliumNetworkPolicy shop/p", 0, "ingress")
    l7 = state.l7[(api, int(Direction.INGRESS), PROXY_PORT)]
    assert isinstance(l7, L7Policy)
    rules = l7.lookup(front, 8080)
    assert not rules.allow_all and len(rules.http) == 3
    assert rules.match_http("GET", "/api/x", {})[0]
    assert l7.lookup(front, 9999) is None


def test_allow_localhost_entry_and_enforcement_flags():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress: [{}]
    """), TOPO)
    state = eng.map_state()
    api = eng.endpoint_id("shop/api")
    assert state.endpoints[api].ingress_enforced and not state.endpoints[api].egress_enforced
    verdict, _ = lookup_policy(state, api, Direction.INGRESS, IDENTITY_HOST, 6, 8080)
    assert verdict == Verdict.ALLOW
    front = eng.endpoint_id("shop/frontend")
    assert not state.endpoints[front].ingress_enforced
    assert not [k for k in state.policy if k.endpoint_id == front]


def test_deny_range_is_pushed_down_onto_narrower_allows():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEndpoints: [{matchLabels: {app: frontend}}]
        toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    ingressDeny:
      - fromEndpoints: [{matchLabels: {app: frontend}}]
        toPorts: [{ports: [{port: "8000", endPort: 8191, protocol: TCP}]}]
    """), TOPO)
    state = eng.map_state()
    api = eng.endpoint_id("shop/api")
    exact = [e for k, e in state.policy.items() if k.endpoint_id == api and k.port == 8080 and k.port_prefix == 16]
    assert exact and exact[0].verdict == Verdict.DENY


def test_decision_json_and_trace():
    eng = engine(L7_API, TOPO)
    from dataplane.policy import Flow, explain_text
    from dataplane.scenario import HttpRequest
    d = eng.verdict(Flow("shop/frontend", eng.scenario.pods["shop/api"].ip, "TCP", 8080, HttpRequest("POST", "/api/x")))
    j = d.to_json()
    assert j["outcome"] == "denied" and j["ingress"] == "REDIRECT" and j["egress"] == "not enforced"
    text = explain_text(d)
    assert "CiliumNetworkPolicy shop/p" in text and "403" in text and "matches no HTTP rule" in text
