"""Helpers for the policy tests: build a scenario and an engine from YAML strings and ask the
oracle about flows by pod name; the topologies and policies several policy test modules share."""

from __future__ import annotations

import textwrap
from pathlib import Path

from dataplane.scenario import HttpRequest, parse_scenario
from dataplane.yamlsource import load_documents
from dataplane.errors import ErrorList, SourceError
from dataplane.policy import Flow, PolicyEngine, parse_documents

# The upstream Kubernetes network policy e2e layout (test/e2e/network/netpol): namespaces x, y,
# z; pods a, b, c in each; ports 80 and 81, TCP and UDP.
NETPOL_TOPOLOGY = """\
name: netpol
namespaces:
  - {name: x, labels: {ns: x}}
  - {name: y, labels: {ns: y}}
  - {name: z, labels: {ns: z}}
pods:
""" + "".join(
    f"  - {{name: {p}, namespace: {n}, labels: {{pod: {p}}}, ports: [{{port: 80, name: serve-80-tcp}}, "
    f"{{port: 81, name: serve-81-tcp}}, {{port: 80, protocol: UDP, name: serve-80-udp}}, "
    f"{{port: 81, protocol: UDP, name: serve-81-udp}}]}}\n"
    for n in "xyz" for p in "abc")


# Every pod of namespace x in default deny for ingress; the other namespaces open.
DENY_ALL_INGRESS_X = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
"""

def scenario(topology: str, policies: str = "", extra: str = "", settings: str = ""):
    text = topology
    if settings:
        text += "settings:\n" + textwrap.indent(textwrap.dedent(settings), "  ")
    if policies.strip():
        docs = [d for d in textwrap.dedent(policies).split("\n---\n") if d.strip()]
        text += "policies:\n" + "".join("  - " + textwrap.indent(d.strip(), "    ")[4:] + "\n" for d in docs)
    text += textwrap.dedent(extra)
    (doc,) = load_documents(text, "x.yaml")
    return parse_scenario(doc, Path("x.yaml"))


def engine(policies: str = "", topology: str = NETPOL_TOPOLOGY, settings: str = "", extra: str = "") -> PolicyEngine:
    return PolicyEngine(scenario(topology, policies, extra, settings))


def outcome(eng: PolicyEngine, src: str, dst: str, port: int = 80, protocol: str = "TCP",
            method: str | None = None, path: str = "/", headers: dict | None = None, dns: str = "") -> str:
    """Outcome of src -> dst:port; dst is a pod key/name, a world host name, or an IP."""
    sc = eng.scenario
    key = sc.pod_key(dst)
    if key is not None:
        ip, name = sc.pods[key].ip, sc.pods[key].name
    elif dst in sc.world:
        ip, name = sc.world[dst].address, dst
    else:
        ip, name = dst, ""
    http = HttpRequest(method, path, dict(headers or {})) if method else None
    src_key = sc.pod_key(src) or src
    return eng.verdict(Flow(src_key, ip, protocol, port, http, dns, name)).outcome


def matrix(eng: PolicyEngine, port: int = 80, protocol: str = "TCP") -> dict[tuple[str, str], str]:
    pods = list(eng.scenario.pods)
    return {(s, d): outcome(eng, s, d, port, protocol) for s in pods for d in pods if s != d}


def policy_docs(text: str, source: str = "policies/x.yaml"):
    return parse_documents(load_documents(textwrap.dedent(text), source))


def policy_errors(text: str) -> list[str]:
    """Every error parsing the policy documents in `text` reports; [] when they parse."""
    try:
        policy_docs(text)
    except ErrorList as exc:
        return [str(e) for e in exc.errors]
    except SourceError as exc:
        return [str(exc)]
    return []


# A Cilium-flavoured topology: two namespaces, a frontend in each, an API pod with TCP and UDP
# ports, and world hosts with DNS names (for toFQDNs).
CILIUM_TOPOLOGY = """\
name: cilium
namespaces:
  - {name: shop, labels: {team: shop}}
  - {name: ops, labels: {team: ops}}
pods:
  - {name: frontend, namespace: shop, labels: {app: frontend}, ports: [{port: 80}]}
  - {name: api, namespace: shop, labels: {app: api}, ports: [{port: 8080}, {port: 9090}, {port: 53, protocol: UDP}]}
  - {name: frontend, namespace: ops, labels: {app: frontend}, ports: [{port: 80}]}
world:
  - {name: www, address: 203.0.113.10, dnsNames: [www.example.com], ports: [{port: 80}, {port: 443}]}
  - {name: deep, address: 203.0.113.11, dnsNames: [a.b.example.com], ports: [{port: 80}]}
  - {name: apex, address: 203.0.113.12, dnsNames: [example.com], ports: [{port: 80}]}
  - {name: other, address: 198.51.100.5, dnsNames: [www.example.org], ports: [{port: 80}]}
"""


def cnp(spec: str, name: str = "p", namespace: str = "shop") -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")


def ccnp(spec: str, name: str = "c") -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")


L7_API = cnp("""
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
            - {method: GET, path: "/api/.*"}
            - {method: "PUT|POST", path: /submit, headers: ["X-Token: s3cret"]}
            - {method: DELETE, host: "admin\\\\.shop", headerMatches: [{name: X-Admin}]}
""")


# Two pods of namespace x; a admits only b (NetworkPolicy allow-b). Tests of policy changes
# prepend `name: ...` and append their own `steps:`.
TWO_PODS_ALLOW_B = """\
namespaces:
  - {name: x}
pods:
  - {name: a, namespace: x, labels: {app: a}, ports: [{port: 80}]}
  - {name: b, namespace: x, labels: {app: b}, ports: [{port: 80}]}
policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: allow-b, namespace: x}
    spec:
      podSelector: {matchLabels: {app: a}}
      ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]
"""


def looked_up(eng: PolicyEngine, *hosts: str) -> None:
    """As if a lookup through the DNS proxy had taught every DNS name of these world hosts (the
    FQDN learner's effect): toFQDNs selectors then select their addresses."""
    names = dict(eng.snapshot().fqdn_names)
    for host in hosts:
        h = eng.scenario.world[host]
        names[h.address] = tuple(sorted({*names.get(h.address, ()), *(n.lower() for n in h.dns_names)}))
    eng.commit(eng.propose_fqdn(names))
