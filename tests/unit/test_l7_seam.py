"""The L7 seam: the oracle and the proxy give the same verdict, with the same attribution.

One scenario with every shape of L7 policy -- HTTP rules on methods, paths with queries, hosts
and headers; two sets on one connection (the client's egress and the server's ingress); an
allow-all set (an L4-only allow next to L7 rules); a DNS-only set on a TCP port; a REDIRECT
without a set; DNS rules with names and patterns -- and a table of requests. Each request goes
through the oracle (`PolicyEngine.verdict`, as `l7lab explain` asks it) and through the proxy's
side (`proxy.state.Snapshot` over the same engine's `map_state()`, after the proxy's own wire
parsing: `proxy.http.parse_request`, `proxy.dns.asked_name`), and the two verdicts must be
identical: allowed or not, why, the rules that allowed it and the policies named.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import dns.message
import pytest

from dataplane.abi import Direction, PROTO_TCP, PROTO_UDP, PROXY_PORT
from dataplane.policy import Decision, Flow, PolicyEngine
from dataplane.scenario import HttpRequest, parse_scenario
from dataplane.yamlsource import load_documents
from l7.decide import AppliedSet, decide, protocol_for
from l7.protocol import for_transport, protocols
from l7.ruleset import L7RuleSet
from proxy.dns import asked_name
from l7.http import HttpError
from proxy.http import parse_request
from proxy.state import RequestVerdict, Snapshot

SCENARIO = """\
name: seam
namespaces:
  - name: lab
pods:
  - {name: client, namespace: lab, labels: {app: client}, ports: [{port: 80}]}
  - {name: web, namespace: lab, labels: {app: web}, ports: [{port: 80}]}
  - {name: api, namespace: lab, labels: {app: api}, ports: [{port: 8080}]}
  - {name: open, namespace: lab, labels: {app: open}, ports: [{port: 80}]}
  - {name: bare, namespace: lab, labels: {app: bare}, ports: [{port: 80}]}
  - {name: kube-dns, namespace: lab, labels: {app: kube-dns}, ports: [{port: 53, protocol: UDP}]}
  - {name: resolver, namespace: lab, labels: {app: resolver}, ports: [{port: 53, protocol: UDP}, {port: 53}]}
policies:
"""

POLICIES = [
    # The client's egress: HTTP rules towards api (a first set), DNS rules towards the two DNS
    # servers (on resolver for any protocol: a DNS-only set on TCP too), plain allows elsewhere.
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-egress, namespace: lab}
    spec:
      endpointSelector: {matchLabels: {app: client}}
      egress:
        - toEndpoints: [{matchLabels: {app: api}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{method: GET}, {method: DELETE, path: /v1/admin}]}}]
        - toEndpoints: [{matchLabels: {app: kube-dns}}]
          toPorts: [{ports: [{port: "53", protocol: UDP}],
                     rules: {dns: [{matchName: www.example.com}, {matchPattern: "*.example.org"}]}}]
        - toEndpoints: [{matchLabels: {app: resolver}}]
          toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchName: www.example.com}]}}]
        - toEndpoints: [{matchLabels: {app: web}}, {matchLabels: {app: open}}, {matchLabels: {app: bare}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """,
    # A second DNS policy: rules of all policies add up, each attributed to its own.
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-dns-partner, namespace: lab}
    spec:
      endpointSelector: {matchLabels: {app: client}}
      egress:
        - toEndpoints: [{matchLabels: {app: kube-dns}}]
          toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "api-*.partner.test"}]}}]
    """,
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web-http, namespace: lab}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http:
                  - {method: GET, path: "/public(/.*)?"}
                  - {method: GET, path: "/search\\\\?q=[a-z]+"}
                  - {path: /host, host: "web:80"}
                  - {path: /token, headers: ["X-Token: s3cret"]}
                  - {path: /flag, headerMatches: [{name: X-Flag}]}
                  - {method: "POST|PUT", path: /upload}
    """,
    # The second set of client -> api: the server's own ingress rules.
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: api-ingress, namespace: lab}
    spec:
      endpointSelector: {matchLabels: {app: api}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{path: "/v1/.*"}]}}]
    """,
    # open: L7 rules and an L4-only allow for the same peer and port: the set is allow-all.
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: open-l7, namespace: lab}
    spec:
      endpointSelector: {matchLabels: {app: open}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{path: /only}]}}]
    """,
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: open-l4, namespace: lab}
    spec:
      endpointSelector: {matchLabels: {app: open}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """,
    # bare: a REDIRECT whose L7 set the test removes from the map state (no set: refused).
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: bare-http, namespace: lab}
    spec:
      endpointSelector: {matchLabels: {app: bare}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{path: /}]}}]
    """,
]


def _engine() -> PolicyEngine:
    text = SCENARIO + "".join("  - " + textwrap.indent(textwrap.dedent(p).strip(), "    ")[4:] + "\n"
                              for p in POLICIES)
    (doc,) = load_documents(text, "seam.yaml")
    engine = PolicyEngine(parse_scenario(doc, Path("seam.yaml")))
    state = engine.map_state()
    bare = engine.endpoint_id("lab/bare")
    del state.l7[(bare, int(Direction.INGRESS), PROXY_PORT)]
    return engine


@pytest.fixture(scope="module")
def seam() -> tuple[PolicyEngine, Snapshot]:
    engine = _engine()
    # The proxy reads the state file the lab writes: go through its JSON form as the proxy does.
    import json  # noqa: PLC0415
    from dataplane.mapstate import MapState  # noqa: PLC0415

    state = MapState.from_json(json.loads(json.dumps(engine.map_state().to_json())))
    return engine, Snapshot(state)


def _ip(engine: PolicyEngine, pod: str) -> str:
    return engine.scenario.pods[f"lab/{pod}"].ip


def _same(decision: Decision, verdict: RequestVerdict) -> None:
    """Identical verdicts and attribution; the oracle's outcome says what the proxy does."""
    assert decision.l7 is not None, decision.trace
    assert (decision.l7.allowed, decision.l7.why, decision.l7.rule_ids, decision.l7.policies) == \
        (verdict.allowed, verdict.why, verdict.rule_ids, verdict.policies)


HTTP_CASES = [
    # (destination, port, method, target, headers, allowed, policies named)
    ("web", 80, "GET", "/public", {}, True, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/public/a/b", {}, True, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/publicx", {}, False, ("CiliumNetworkPolicy lab/web-http",)),  # full match
    ("web", 80, "POST", "/public", {}, False, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "get", "/public", {}, False, ("CiliumNetworkPolicy lab/web-http",)),  # case-sensitive
    ("web", 80, "GET", "/PUBLIC", {}, False, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/search?q=abc", {}, True, ("CiliumNetworkPolicy lab/web-http",)),  # query in path
    ("web", 80, "GET", "/search?q=ABC", {}, False, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/search", {}, False, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/public/../search?q=abc", {}, True, ("CiliumNetworkPolicy lab/web-http",)),  # normalized
    ("web", 80, "GET", "/public/%2e%2e/private", {}, False, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "//public//a", {}, True, ("CiliumNetworkPolicy lab/web-http",)),  # slashes merged
    ("web", 80, "GET", "/host", {"Host": "web:80"}, True, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/host", {}, False, ("CiliumNetworkPolicy lab/web-http",)),  # Host "web"
    ("web", 80, "GET", "/token", {"X-Token": "s3cret"}, True, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/token", {"x-token": "s3cret"}, True, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/token", {"X-Token": "S3cret"}, False, ("CiliumNetworkPolicy lab/web-http",)),
    # A header Connection names is hop-by-hop: neither forwarded nor seen by the rules.
    ("web", 80, "GET", "/token", {"X-Token": "s3cret", "Connection": "X-Token"}, False,
     ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "GET", "/flag", {"X-Flag": ""}, True, ("CiliumNetworkPolicy lab/web-http",)),
    ("web", 80, "PUT", "/upload", {"Content-Length": "0"}, True, ("CiliumNetworkPolicy lab/web-http",)),
    # Two sets: the client's egress (GET, or DELETE /v1/admin) and api's ingress (/v1/...).
    ("api", 8080, "GET", "/v1/items", {}, True, ("CiliumNetworkPolicy lab/api-ingress",
                                                 "CiliumNetworkPolicy lab/client-egress")),
    ("api", 8080, "DELETE", "/v1/admin", {}, True, ("CiliumNetworkPolicy lab/api-ingress",
                                                    "CiliumNetworkPolicy lab/client-egress")),
    ("api", 8080, "POST", "/v1/items", {}, False, ("CiliumNetworkPolicy lab/client-egress",)),  # egress refuses
    ("api", 8080, "GET", "/v2/items", {}, False, ("CiliumNetworkPolicy lab/api-ingress",)),  # ingress refuses
    # Allow-all: an L4-only allow next to L7 rules lets every request through.
    ("open", 80, "DELETE", "/anything?x=1", {}, True, ("CiliumNetworkPolicy lab/open-l4",)),
    # A REDIRECT without a set: refused.
    ("bare", 80, "GET", "/", {}, False, ()),
]


@pytest.mark.parametrize("dest,port,method,target,headers,allowed,policies", HTTP_CASES)
def test_http_oracle_and_proxy_agree(seam, dest, port, method, target, headers, allowed, policies):
    engine, snapshot = seam
    headers = {"Host": dest, **headers}
    decision = engine.verdict(Flow("lab/client", _ip(engine, dest), "TCP", port,
                                   HttpRequest(method, target, headers), "", dest))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = parse_request(head.encode("latin-1"))  # the proxy's own parser and normalization
    cp = snapshot.connection(_ip(engine, "client"), _ip(engine, dest), port, PROTO_TCP)
    assert cp.protocol == "http"
    verdict = snapshot.judge(cp, request.method, request.path, request.match_headers())
    _same(decision, verdict)
    assert (verdict.allowed, verdict.policies) == (allowed, policies), verdict.why
    assert decision.outcome == ("allowed" if allowed else "denied"), decision.trace


@pytest.mark.parametrize("target", ["/a%2Fb", "/public#frag", "/a/..;x/b"])
def test_a_request_the_proxy_rejects_is_denied_by_both(seam, target):
    engine, _ = seam
    with pytest.raises(HttpError) as rejected:
        parse_request(f"GET {target} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    decision = engine.verdict(Flow("lab/client", _ip(engine, "web"), "TCP", 80,
                                   HttpRequest("GET", target, {"Host": "web"}), "", "web"))
    assert decision.outcome == "denied" and decision.l7 is None
    assert any(f"the proxy rejects GET {target}: {rejected.value.reason}" in line for line in decision.trace)


DNS_CASES = [
    # (server, name as asked on the wire, allowed, policies named)
    ("kube-dns", "www.example.com", True, ("CiliumNetworkPolicy lab/client-egress",)),
    ("kube-dns", "WWW.Example.COM.", True, ("CiliumNetworkPolicy lab/client-egress",)),  # case, final dot
    ("kube-dns", "api.example.org", True, ("CiliumNetworkPolicy lab/client-egress",)),
    ("kube-dns", "a.b.example.org", False, ("CiliumNetworkPolicy lab/client-dns-partner",
                                            "CiliumNetworkPolicy lab/client-egress")),  # "*" is one label
    ("kube-dns", "example.org", False, ("CiliumNetworkPolicy lab/client-dns-partner",
                                        "CiliumNetworkPolicy lab/client-egress")),
    ("kube-dns", "api-v2.partner.test", True, ("CiliumNetworkPolicy lab/client-dns-partner",)),
    ("kube-dns", "API-V2.Partner.Test", True, ("CiliumNetworkPolicy lab/client-dns-partner",)),
    ("kube-dns", "www.example.net", False, ("CiliumNetworkPolicy lab/client-dns-partner",
                                            "CiliumNetworkPolicy lab/client-egress")),
    ("resolver", "www.example.com", True, ("CiliumNetworkPolicy lab/client-egress",)),
    ("resolver", "www.example.org", False, ("CiliumNetworkPolicy lab/client-egress",)),
]


@pytest.mark.parametrize("server,name,allowed,policies", DNS_CASES +
                         # DNS rules on a port of any protocol judge a question over TCP alike.
                         [("resolver-tcp", "www.example.com", True, ("CiliumNetworkPolicy lab/client-egress",)),
                          ("resolver-tcp", "www.example.org", False, ("CiliumNetworkPolicy lab/client-egress",))])
def test_dns_oracle_and_proxy_agree(seam, server, name, allowed, policies):
    engine, snapshot = seam
    server, transport = (server[:-len("-tcp")], "TCP") if server.endswith("-tcp") else (server, "UDP")
    query = dns.message.from_wire(dns.message.make_query(name, "A").to_wire())  # as the proxy receives it
    asked = asked_name(query.question[0])
    decision = engine.verdict(Flow("lab/client", _ip(engine, server), transport, 53, None, name, server))
    cp = snapshot.connection(_ip(engine, "client"), _ip(engine, server), 53, PROTO_TCP if transport == "TCP" else PROTO_UDP)
    assert cp.protocol == "dns"
    verdict = snapshot.judge_dns(cp, asked)
    _same(decision, verdict)
    assert (verdict.allowed, verdict.policies) == (allowed, policies), verdict.why
    assert decision.outcome == ("allowed" if allowed else "refused"), decision.trace


def test_refusals_before_any_rule(seam):
    """No redirect, or a drop at L3/L4: the proxy refuses every request (fail closed) with the
    reason, and `decide` gives it without judging a rule."""
    engine, snapshot = seam
    cp = snapshot.connection(_ip(engine, "web"), _ip(engine, "client"), 80, PROTO_TCP)
    assert cp.refusal and not snapshot.judge(cp, "GET", "/", {"Host": "client"}).allowed
    assert decide("http", None, [], str, refusal="dropped") == RequestVerdict(False, "dropped")


def test_every_protocol_is_registered_once_with_its_transports():
    """The registry the proxy dispatches on: HTTP on TCP, DNS on UDP and TCP; a set holding a
    protocol's rules picks that protocol on any of its transports, an empty set falls back to
    the protocol at home on the transport (HTTP on TCP, DNS on UDP)."""
    assert {(p.name, p.transports) for p in protocols().values()} == {("http", ("TCP",)), ("dns", ("UDP", "TCP"))}
    assert [p.name for p in for_transport("TCP")] == ["http", "dns"] and \
        [p.name for p in for_transport("UDP")] == ["dns"]
    dns_only = [AppliedSet("ingress", "ns/x", L7RuleSet(dns=[(object(), 1)]))]
    assert protocol_for(dns_only, "UDP") == "dns" and protocol_for(dns_only, "TCP") == "dns"
    http_only = [AppliedSet("ingress", "ns/x", L7RuleSet(http=[(object(), 1)]))]
    assert protocol_for(http_only, "TCP") == "http"
    for transport, home in (("UDP", "dns"), ("TCP", "http")):
        assert protocol_for([AppliedSet("ingress", "ns/x", None)], transport) == home
        assert protocol_for([AppliedSet("ingress", "ns/x", L7RuleSet())], transport) == home
    assert protocol_for([], "SCTP") == ""
