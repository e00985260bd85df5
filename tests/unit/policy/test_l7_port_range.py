"""HTTP rules on a port range (`port` + `endPort` with `rules.http`): every port of the range is
redirected and judged by the range's rules, a single-port rule inside the range adds its rules
on its own port only, the proxy's state file keeps the ranges, and DNS rules on a range stay an
error, as in Cilium."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.abi import Direction
from dataplane.errors import ErrorList, SourceError
from dataplane.mapstate import MapState
from dataplane.policy.engine import Flow, PolicyEngine
from dataplane.policy.parse import parse_documents
from dataplane.scenario import HttpRequest, parse_scenario
from dataplane.yamlsource import load_documents

SCENARIO = """\
name: l7-range
namespaces:
  - {name: x}
pods:
  - {name: client, namespace: x, labels: {app: client}}
  - name: api
    namespace: x
    labels: {app: api}
    ports: [{port: 8079}, {port: 8080}, {port: 8083}, {port: 8084}, {port: 8089}, {port: 8090}]
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: range, namespace: x}
    spec:
      endpointSelector: {matchLabels: {app: api}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
            - ports: [{port: "8080", endPort: 8089, protocol: TCP}]
              rules: {http: [{method: GET, path: "/api/.*"}]}
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
            - ports: [{port: "8084", protocol: TCP}]
              rules: {http: [{method: POST, path: "/upload"}]}
"""


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    (doc,) = load_documents(SCENARIO, "l7-range.yaml")
    return PolicyEngine(parse_scenario(doc, Path("l7-range.yaml")))


def _outcome(engine: PolicyEngine, port: int, method: str, path: str) -> str:
    api = engine.scenario.pods["x/api"].ip
    return engine.verdict(Flow("x/client", api, "TCP", port, HttpRequest(method, path, {"Host": "api"}))).outcome


@pytest.mark.parametrize("port", [8080, 8083, 8089])
def test_every_port_of_the_range_applies_the_range_rules(engine: PolicyEngine, port: int) -> None:
    assert _outcome(engine, port, "GET", "/api/items") == "allowed"
    assert _outcome(engine, port, "GET", "/admin") == "denied"
    assert _outcome(engine, port, "POST", "/upload") == "denied"


def test_a_single_port_rule_inside_the_range_adds_its_rules_there_only(engine: PolicyEngine) -> None:
    assert _outcome(engine, 8084, "POST", "/upload") == "allowed"
    assert _outcome(engine, 8084, "GET", "/api/items") == "allowed"
    assert _outcome(engine, 8084, "DELETE", "/api/items") == "denied"


@pytest.mark.parametrize("port", [8079, 8090])
def test_ports_outside_the_range_are_dropped(engine: PolicyEngine, port: int) -> None:
    assert _outcome(engine, port, "GET", "/api/items") == "dropped"


def test_the_proxy_state_holds_range_sets_that_do_not_overlap_the_single_port(engine: PolicyEngine) -> None:
    state = engine.map_state()
    (l7,) = state.l7.values()
    client = engine.identities.pod_identity["x/client"]
    assert sorted(l7.ranges) == [(client, 8080, 8083), (client, 8085, 8089)]
    assert sorted(l7.rules) == [(client, 8084)]
    # The proxy reads the state file: ranges survive the round trip and resolve every port.
    again = MapState.from_json(state.to_json())
    api = engine.endpoint_id("x/api")
    for port in range(8080, 8090):
        got = again.l7_rules(api, Direction.INGRESS, client, port)
        assert got is not None and got == state.l7_rules(api, Direction.INGRESS, client, port)
    assert again.l7_rules(api, Direction.INGRESS, client, 8090) is None


def test_dns_rules_on_a_port_range_are_an_error() -> None:
    text = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-range, namespace: x}
spec:
  endpointSelector: {}
  egress:
    - toPorts: [{ports: [{port: "53", endPort: 54, protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
"""
    with pytest.raises((ErrorList, SourceError)) as exc:
        parse_documents(load_documents(text, "dns.yaml"))
    assert "spec.egress[0].toPorts[0].ports[0].endPort: DNS rules cannot be used with a port range" in str(exc.value)
