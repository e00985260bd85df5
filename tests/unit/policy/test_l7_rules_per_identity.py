"""Two policies redirect one port of an endpoint for two different peers: each peer gets its
own L7 rule set, and a request is judged by its own peer's rules (the second peer's rules must
not be lost after the first peer's are merged)."""

from __future__ import annotations

from pathlib import Path

from dataplane.policy.engine import Flow, PolicyEngine
from dataplane.scenario import HttpRequest, parse_scenario
from dataplane.yamlsource import load_documents

SCENARIO = """\
name: l7-peers
namespaces:
  - {name: x}
pods:
  - {name: api, namespace: x, labels: {app: api}, ports: [{port: 8080}]}
  - {name: web, namespace: x, labels: {app: web}}
  - {name: report, namespace: x, labels: {app: report}}
policies:
""" + "".join(f"""\
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: {peer}-rules, namespace: x}}
    spec:
      endpointSelector: {{matchLabels: {{app: api}}}}
      ingress:
        - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
          toPorts:
            - ports: [{{port: "8080", protocol: TCP}}]
              rules:
                http: [{{method: {method}, path: "/{peer}/.*"}}]
""" for peer, method in (("web", "POST"), ("report", "GET")))


def test_each_redirected_peer_keeps_its_own_l7_rules() -> None:
    (doc,) = load_documents(SCENARIO, "l7-peers.yaml")
    engine = PolicyEngine(parse_scenario(doc, Path("l7-peers.yaml")))
    api = engine.scenario.pods["x/api"].ip
    ids = engine.identities.pod_identity
    (l7,) = engine.map_state().l7.values()
    assert sorted(ident for ident, _ in l7.rules) == sorted([ids["x/web"], ids["x/report"]])

    def outcome(peer: str, method: str, path: str) -> str:
        return engine.verdict(Flow(f"x/{peer}", api, "TCP", 8080, HttpRequest(method, path, {"Host": "api"}))).outcome

    assert outcome("web", "POST", "/web/a") == "allowed" and outcome("web", "GET", "/report/a") == "denied"
    assert outcome("report", "GET", "/report/a") == "allowed" and outcome("report", "POST", "/web/a") == "denied"
