"""Plumbing for the L7 real-traffic tests: a lab whose backend pod is protected by the same
CiliumNetworkPolicy the proxy's loopback tests use (`tests.support.loopback.POLICY`, so the
attack corpus keeps its meaning), raw HTTP clients whose sockets live in a pod's namespace, the
backend's own record of what it received, and the oracle's judgement of a request.

Topology (namespace shop):
    frontend   app=frontend   the client; may reach backend:8080 through the L7 proxy, and
                              backend:9090 at L3/L4 only (no L7 rules: not redirected)
    backend    app=backend    HTTP on 8080 (redirected) and 9090 (plain)
    stranger   app=stranger   no policy lets it reach the backend (dropped at L3/L4)
"""

from __future__ import annotations

import json
import socket
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataplane import lab as labmod
from dataplane import topology
from dataplane.datapath import FlowEvent
from dataplane.flowrecord import Flow
from dataplane.lab import Lab
from dataplane.logfiles import read_all, request_log
from dataplane.abi import Direction, PROXY_PORT
from dataplane.policy import PolicyEngine
from l7.ruleset import L7RuleSet
from dataplane.scenario import Scenario, parse_scenario
from dataplane.timescale import scaled
from dataplane.yamlsource import load_documents
from tests.support.http import Client, Resp
from tests.support.loopback import POLICY as CORPUS_POLICY_TEMPLATE

L7_PORT = 8080  # backend port behind the proxy
PLAIN_PORT = 9090  # backend port allowed at L3/L4 only
ACCESS_DENIED = b"Access denied\r\n"
# Seconds of an ordinary machine; the helpers here scale them to this one (dataplane/timescale.py).
IO_TIMEOUT = 5.0  # per socket operation: a proxy that hangs fails the test, it never hangs it
# A connect expected to be dropped (costs the whole timeout; its expiry is the expected outcome, so
# a slow machine needs no more of it).
CONNECT_DROP_TIMEOUT = 1.5

TOPOLOGY = f"""\
name: l7
namespaces:
  - {{name: shop, labels: {{team: shop}}}}
pods:
  - {{name: frontend, namespace: shop, labels: {{app: frontend}}, ports: [{{port: 80}}]}}
  - {{name: backend, namespace: shop, labels: {{app: backend}}, ports: [{{port: {L7_PORT}}}, {{port: {PLAIN_PORT}}}]}}
  - {{name: stranger, namespace: shop, labels: {{app: stranger}}, ports: [{{port: 80}}]}}
"""

# The loopback corpus' policy (GET|HEAD /public(/.*)?, POST|PUT /upload, ...) on port 8080.
L7_POLICY = CORPUS_POLICY_TEMPLATE.replace("PORT", str(L7_PORT))

PLAIN_POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: backend-plain, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: backend}}}}
  ingress:
    - fromEndpoints: [{{matchLabels: {{app: frontend}}}}]
      toPorts:
        - ports: [{{port: "{PLAIN_PORT}", protocol: TCP}}]
"""

L7_POLICY_NAME = "CiliumNetworkPolicy shop/backend-l7"


def make_scenario(name: str, policies: tuple[str, ...] = (L7_POLICY, PLAIN_POLICY)) -> Scenario:
    text = TOPOLOGY
    docs = [textwrap.dedent(p).strip() for p in policies if p.strip()]
    if docs:
        text += "policies:\n" + "".join("  - " + textwrap.indent(d, "    ")[4:] + "\n" for d in docs)
    (doc,) = load_documents(text, "l7.yaml")
    return parse_scenario(doc, Path("l7.yaml")).with_name(name)


def l7_policy(http_rules: str, name: str = "backend-l7") -> str:
    """A CiliumNetworkPolicy for backend:8080 from frontend with the given `http:` list (YAML)."""
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: backend}}}}
  ingress:
    - fromEndpoints: [{{matchLabels: {{app: frontend}}}}]
      toPorts:
        - ports: [{{port: "{L7_PORT}", protocol: TCP}}]
          rules:
            http:
{textwrap.indent(textwrap.dedent(http_rules).strip(), "              ")}
"""


# --------------------------------------------------------------------------- clients


class PodClient(Client):
    """The raw HTTP client of the loopback tests (same response parser), its socket opened inside
    a pod's network namespace so its packets cross the node like the pod's own traffic."""

    def __init__(self, netns: str, dst: tuple[str, int], timeout: float = IO_TIMEOUT,
                 connect_timeout: float = IO_TIMEOUT) -> None:
        sock = topology.socket_in(netns)
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(scaled(connect_timeout))
        try:
            sock.connect(dst)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(scaled(timeout))
        self.sock = sock
        self.buf = b""


def backend_json(resp: Resp) -> dict[str, Any]:
    """The backend pod server's JSON answer (asserting that the backend itself answered)."""
    assert resp.status == 200, resp
    assert resp.headers.get("x-l7lab-backend") == "shop/backend", resp.headers
    return json.loads(resp.body)


def assert_denied(resp: Resp) -> None:
    assert resp.status == 403, resp
    assert resp.body == ACCESS_DENIED, resp
    assert "x-l7lab-backend" not in resp.headers


# --------------------------------------------------------------------------- the lab


@dataclass
class L7Lab:
    lab: Lab
    datapath: Any  # dataplane.datapath.Datapath

    @property
    def engine(self) -> PolicyEngine:
        return self.lab.policy

    def ip(self, pod: str) -> str:
        return self.lab.record.endpoints[pod].ip

    def netns(self, pod: str) -> str:
        return self.lab.record.endpoints[pod].netns

    def client(self, src: str = "shop/frontend", port: int = L7_PORT, dst: str = "shop/backend",
               **kw: Any) -> PodClient:
        return PodClient(self.netns(src), (self.ip(dst), port), **kw)

    def requests_log_path(self, pod: str = "shop/backend") -> Path:
        ns = self.netns(pod).removeprefix(labmod.lab_prefix(self.lab.name))
        return request_log(labmod.lab_dir(self.lab.name), ns)

    def backend_requests(self, pod: str = "shop/backend") -> list[dict[str, Any]]:
        """Every request the pod's server really received (its own JSON-lines log, rotated or not)."""
        return read_all(self.requests_log_path(pod))

    def proxy_events(self) -> list[Flow]:
        """The proxy's L7 records (its events file) so far."""
        path = self.lab.proxy_events_file
        if not path.exists():
            return []
        return [Flow.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def wait_proxy_events(self, count: int, timeout: float = IO_TIMEOUT) -> list[Flow]:
        """The proxy writes a record once a response is done, possibly just after the client has
        it: wait (bounded) until at least `count` records are there."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            events = self.proxy_events()
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.01)

    def identity(self, pod: str) -> int:
        return self.engine.map_state().identity_of(self.ip(pod))

    def backend_rules(self) -> L7RuleSet | None:
        """The oracle's L7 rule set for frontend -> backend:8080 (ingress of the backend)."""
        state = self.engine.map_state()
        ep = next(e for e in state.endpoints.values() if e.name == "shop/backend")
        l7 = state.l7.get((ep.endpoint_id, int(Direction.INGRESS), PROXY_PORT))
        return l7.lookup(self.identity("shop/frontend"), L7_PORT) if l7 is not None else None

    def rules_allow(self, record: dict[str, Any]) -> bool:
        """Would the current rules allow what the backend logged (method, path with query, headers)?"""
        rules = self.backend_rules()
        if rules is None:
            return False
        allowed, _, _ = rules.match_http(record["method"], record["path"], record["headers"])
        return allowed

    def events_for(self, events: list[FlowEvent], src: str, dst: str, dport: int) -> list[FlowEvent]:
        return [e for e in events if e.src == self.ip(src) and e.dst == self.ip(dst) and e.dport == dport]


def open_l7_lab(datapath: Any, name: str, policies: tuple[str, ...] = (L7_POLICY, PLAIN_POLICY)) -> L7Lab:
    scenario = make_scenario(name, policies)
    lab = Lab(scenario, datapath=datapath, policy=PolicyEngine(scenario))
    lab.up()
    datapath.flush_conntrack()
    datapath.poll_events()
    return L7Lab(lab, datapath)


def close_l7_lab(l7: L7Lab) -> None:
    name = l7.lab.name
    l7.lab.down()
    assert not topology.list_netns(labmod.lab_prefix(name)), f"namespaces left behind by {name}"
