"""Cilium semantics. Sources (read, not copied): docs.cilium.io security/policy (language,
layer3, layer7, intro: enforcement modes), cilium/cilium pkg/policy (repository.go: which rules
turn default-deny on; l4.go: L7 merge with wildcard L3/L4 rules), pkg/fqdn/matchpattern,
pkg/k8s/apis/cilium.io/utils (namespace scoping of CNP selectors), PR #12890 (CCNP `{}`)."""

from __future__ import annotations

from tests.support.policy import CILIUM_TOPOLOGY as TOPO
from tests.support.policy import L7_API, ccnp, cnp, engine, looked_up, outcome



def test_l7_http_full_match_case_sensitive():
    eng = engine(L7_API, TOPO)
    ok = lambda m, p, h=None: outcome(eng, "shop/frontend", "shop/api", 8080, method=m, path=p, headers=h)
    assert ok("GET", "/api/items") == "allowed"
    assert ok("GET", "/api/") == "allowed"
    assert ok("GET", "/apix") == "denied"
    assert ok("GET", "/v1/api/items") == "denied"  # full match: no prefix/suffix slack
    assert ok("get", "/api/items") == "denied"  # case-sensitive method
    assert ok("HEAD", "/api/items") == "denied"
    assert ok("POST", "/submit", {"X-Token": "s3cret"}) == "allowed"
    assert ok("PUT", "/submit", {"x-token": "s3cret"}) == "allowed"  # header names are case-insensitive
    assert ok("POST", "/submit", {"X-Token": "other"}) == "denied"
    assert ok("POST", "/submit") == "denied"
    assert ok("POST", "/submit?x=1", {"X-Token": "s3cret"}) == "denied"  # path includes the query
    assert ok("DELETE", "/x", {"Host": "admin.shop", "X-Admin": "1"}) == "allowed"
    assert ok("DELETE", "/x", {"Host": "adminXshop", "X-Admin": "1"}) == "denied"
    assert ok("DELETE", "/x", {"Host": "admin.shop"}) == "denied"  # header presence required


def test_l7_scoping_other_namespace_and_other_port():
    eng = engine(L7_API, TOPO)
    assert outcome(eng, "ops/frontend", "shop/api", 8080, method="GET", path="/api/x") == "dropped"
    assert outcome(eng, "shop/frontend", "shop/api", 9090) == "dropped"


def test_cnp_selector_naming_namespace_crosses_namespaces():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEndpoints: [{matchLabels: {app: frontend, k8s:io.kubernetes.pod.namespace: ops}}]
    """), TOPO)
    assert outcome(eng, "ops/frontend", "shop/api", 8080) == "allowed"
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "dropped"


def test_ccnp_selectors_are_not_scoped():
    eng = engine(ccnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEndpoints: [{matchLabels: {app: frontend}}]
    """), TOPO)
    assert outcome(eng, "ops/frontend", "shop/api", 8080) == "allowed"
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "allowed"
    assert outcome(eng, "other", "shop/api", 8080) == "dropped"


def test_cnp_empty_endpoint_selector_is_its_namespace():
    eng = engine(cnp("""
    endpointSelector: {}
    ingress:
      - fromEndpoints: [{}]
    """), TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "allowed"
    assert outcome(eng, "ops/frontend", "shop/api", 8080) == "dropped"
    assert outcome(eng, "shop/api", "ops/frontend", 80) == "allowed"  # ops is not selected


def test_cnp_ingress_empty_rule_selects_endpoint_but_allows_nothing():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress: [{}]
    """), TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "dropped"
    assert eng.map_state().endpoints[2].ingress_enforced


def test_cnp_empty_ingress_list_does_not_enforce():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress: []
    """), TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "allowed"


def test_l4_only_rule_applies_to_every_peer():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - toPorts: [{ports: [{port: "9090"}]}]
    """), TOPO)
    assert outcome(eng, "ops/frontend", "shop/api", 9090) == "allowed"
    assert outcome(eng, "other", "shop/api", 9090) == "allowed"
    assert outcome(eng, "ops/frontend", "shop/api", 8080) == "dropped"


def test_l4_allow_plus_l7_same_port_same_peer_lets_every_request_through():
    eng = engine(L7_API + "---\n" + cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEndpoints: [{matchLabels: {app: frontend}}]
        toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    """, name="l4"), TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 8080, method="DELETE", path="/anything") == "allowed"
    d = eng.verdict(__import__("dataplane.policy", fromlist=["Flow"]).Flow(
        "shop/frontend", eng.scenario.pods["shop/api"].ip, "TCP", 8080))
    assert d.ingress == "REDIRECT"  # still goes through the proxy


def test_wildcard_l4_allow_merges_into_peer_l7_set():
    eng = engine(L7_API + "---\n" + cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    """, name="l4any"), TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 8080, method="DELETE", path="/x") == "allowed"
    assert outcome(eng, "ops/frontend", "shop/api", 8080, method="DELETE", path="/x") == "allowed"


def test_deny_wins_over_allow_and_redirect():
    eng = engine(L7_API + "---\n" + cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEntities: [all]
    ingressDeny:
      - fromEndpoints: [{matchLabels: {app: frontend}}]
        toPorts: [{ports: [{port: "8000", endPort: 8100, protocol: TCP}]}]
    """, name="deny"), TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 8080, method="GET", path="/api/x") == "dropped"
    assert outcome(eng, "shop/frontend", "shop/api", 9090) == "allowed"
    d = eng.verdict(__import__("dataplane.policy", fromlist=["Flow"]).Flow(
        "shop/frontend", eng.scenario.pods["shop/api"].ip, "TCP", 8080))
    assert d.ingress == "DENY"


def test_egress_deny_to_cidr_set():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: frontend}}
    egress:
      - toEntities: [world]
    egressDeny:
      - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.10/32]}]
    """), TOPO)
    assert outcome(eng, "shop/frontend", "www") == "allowed"
    assert outcome(eng, "shop/frontend", "deep") == "dropped"
    assert outcome(eng, "shop/frontend", "other") == "allowed"
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "dropped"  # world is not the cluster


def test_entities():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEntities: [cluster]
    """), TOPO)
    assert outcome(eng, "ops/frontend", "shop/api", 8080) == "allowed"
    assert outcome(eng, "other", "shop/api", 8080) == "dropped"
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEntities: [world]
    """), TOPO)
    assert outcome(eng, "other", "shop/api", 8080) == "allowed"
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "dropped"


def test_host_entity_deny_overrides_allow_localhost():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingressDeny:
      - fromEntities: [host]
    ingress:
      - fromEntities: [all]
    """), TOPO)
    assert outcome(eng, "host", "shop/api", 8080) == "dropped"


def test_fqdn_pattern_star_within_one_label():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: frontend}}
    egress:
      - toFQDNs: [{matchPattern: "*.example.com"}]
    """), TOPO)
    assert outcome(eng, "shop/frontend", "www") == "dropped"  # no lookup has taught its address yet
    looked_up(eng, "www", "deep", "apex", "other")
    assert outcome(eng, "shop/frontend", "www") == "allowed"
    assert outcome(eng, "shop/frontend", "deep") == "dropped"
    assert outcome(eng, "shop/frontend", "apex") == "dropped"
    assert outcome(eng, "shop/frontend", "other") == "dropped"


def test_fqdn_match_name():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: frontend}}
    egress:
      - toFQDNs: [{matchName: EXAMPLE.com.}]
    """), TOPO)
    looked_up(eng, "www", "apex")
    assert outcome(eng, "shop/frontend", "apex") == "allowed"
    assert outcome(eng, "shop/frontend", "www") == "dropped"


def test_dns_rules_allow_or_refuse_queries():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: frontend}}
    egress:
      - toEndpoints: [{matchLabels: {app: api}}]
        toPorts:
          - ports: [{port: "53", protocol: UDP}]
            rules:
              dns: [{matchPattern: "*.example.com"}]
    """), TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 53, "UDP", dns="www.example.com") == "allowed"
    assert outcome(eng, "shop/frontend", "shop/api", 53, "UDP", dns="www.example.org") == "refused"


def test_enable_default_deny_false_adds_without_isolating():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    enableDefaultDeny: {ingress: false}
    ingress:
      - fromEndpoints: [{matchLabels: {app: frontend}}]
    """), TOPO)
    assert outcome(eng, "ops/frontend", "shop/api", 8080) == "allowed"
    assert not eng.map_state().endpoints[2].ingress_enforced


def test_k8s_and_cilium_policies_union():
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEndpoints: [{matchLabels: {app: frontend}}]
        toPorts: [{ports: [{port: "9090", protocol: TCP}]}]
    """) + """---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: k, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}]}]
""", TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 9090) == "allowed"
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "dropped"
    assert outcome(eng, "ops/frontend", "shop/api", 8080) == "allowed"


def test_multiple_specs():
    eng = engine("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: multi, namespace: shop}
specs:
  - endpointSelector: {matchLabels: {app: api}}
    ingress: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]
  - endpointSelector: {matchLabels: {app: frontend}}
    ingress: [{}]
""", TOPO)
    assert outcome(eng, "shop/frontend", "shop/api", 8080) == "allowed"
    assert outcome(eng, "shop/api", "shop/frontend", 80) == "dropped"
