"""Host policies (CiliumClusterwideNetworkPolicy with nodeSelector) on real traffic: pods and a
world host reach servers in the lab node's own namespace, and the host endpoint's ingress
policy decides, the kernel agreeing with the oracle on every probe.

One lab; each case is a PolicyEngine with its own policies, switched in by map updates.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from dataplane.abi import IDENTITY_HOST
from dataplane.policy import Flow, PolicyEngine
from dataplane.policy.host import HOST_ENDPOINT_ID
from dataplane.probes import run_probe
from dataplane.scenario import GATEWAY_IP, HttpRequest, Probe, make_probe, parse_scenario
from dataplane.yamlsource import load_documents
from tests.conftest import REPO, unique_lab
from tests.support.cli_lab import l7lab
from tests.support.kernel_lab import PASS_TIMEOUT, KernelLab, close_lab, open_lab

LAB_PREFIX = "hp"

TOPOLOGY = """\
name: host-policy-kernel
node:
  name: worker-1
  labels: {node-access: ssh}
  ports: [{port: 22}, {port: 8081}, {port: 5353, protocol: UDP}]
namespaces:
  - {name: shop}
  - {name: ops}
pods:
  - {name: client, namespace: shop, labels: {app: client}, ports: [{port: 80}]}
  - {name: admin, namespace: ops, labels: {app: admin}, ports: [{port: 80}]}
world:
  - {name: outside, address: 203.0.113.10, ports: [{port: 80}]}
"""

SSH_FROM_OPS = """\
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-ssh}
spec:
  nodeSelector: {matchLabels: {node-access: ssh}}
  ingress:
    - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: ops}}]
      toPorts: [{ports: [{port: "22", protocol: TCP}]}]
    - fromEntities: [cluster]
      toPorts: [{ports: [{port: "5353", protocol: UDP}]}]
"""

OTHER_NODES = SSH_FROM_OPS.replace("node-access: ssh", "node-access: none").replace("host-ssh", "elsewhere")

DENY_CLIENT = """\
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-deny}
spec:
  nodeSelector: {}
  ingress:
    - fromEntities: [all]
  ingressDeny:
    - fromEndpoints: [{matchLabels: {app: client}}]
"""


def engine_with(name: str, *policies: str) -> PolicyEngine:
    text = TOPOLOGY
    if policies:
        text += "policies:\n" + "".join("  - " + textwrap.indent(p, "    ").lstrip() + "\n" for p in policies)
    (doc,) = load_documents(text, "host-policy.yaml")
    return PolicyEngine(parse_scenario(doc, Path("host-policy.yaml")).with_name(name))


@pytest.fixture(scope="module")
def hlab(datapath) -> KernelLab:  # noqa: ANN001 - session fixture
    name = unique_lab(LAB_PREFIX)
    klab = open_lab(engine_with(name).scenario, datapath, name)
    try:
        yield klab
    finally:
        close_lab(klab)


def node_probe(klab: KernelLab, src: str, port: int, protocol: str = "TCP", to: str = "node") -> Probe:
    """A probe to the node, expecting what the oracle says (the runner checks the kernel meets it)."""
    http = HttpRequest("GET", "/") if protocol == "TCP" else None
    p = make_probe(klab.scenario, src, f"{to}:{port}", protocol, http)
    expected = klab.engine.verdict(Flow.from_probe(p)).expectation
    return replace(p, expect=expected, timeout=PASS_TIMEOUT if expected != "dropped" else 0.5)


def outcomes(klab: KernelLab, probes: list[Probe]) -> dict[tuple[str, int, str], str]:
    result = klab.run(probes)
    assert not result.disagreements(), result.disagreements()
    return {(r.probe.source, r.probe.destination.port, r.probe.protocol): r.observed.outcome for r in result.results}


CASES = [("shop/client", 22, "TCP"), ("ops/admin", 22, "TCP"), ("ops/admin", 8081, "TCP"),
         ("shop/client", 5353, "UDP"), ("outside", 22, "TCP")]


def test_without_a_host_policy_the_node_is_reached_and_has_no_endpoint(hlab: KernelLab) -> None:
    hlab.switch(engine_with(hlab.lab.name))
    assert HOST_ENDPOINT_ID not in hlab.engine.map_state().endpoints
    got = outcomes(hlab, [node_probe(hlab, s, p, proto) for s, p, proto in CASES])
    assert set(got.values()) == {"allowed"}, got


def test_host_ingress_policy_allows_its_peers_and_default_denies_the_rest(hlab: KernelLab) -> None:
    hlab.switch(engine_with(hlab.lab.name, SSH_FROM_OPS))
    host = hlab.engine.map_state().endpoints[HOST_ENDPOINT_ID]
    assert host.identity == IDENTITY_HOST and host.ingress_enforced
    got = outcomes(hlab, [node_probe(hlab, s, p, proto) for s, p, proto in CASES])
    assert got == {("shop/client", 22, "TCP"): "dropped",    # not from ops
                   ("ops/admin", 22, "TCP"): "allowed",      # fromEndpoints ops, port 22
                   ("ops/admin", 8081, "TCP"): "dropped",    # no rule for 8081: default deny
                   ("shop/client", 5353, "UDP"): "allowed",  # fromEntities: [cluster]
                   ("outside", 22, "TCP"): "dropped"}        # world is not cluster


def test_the_pods_gateway_address_is_the_host_endpoint_too(hlab: KernelLab) -> None:
    """The node's second address (every pod's gateway) cannot be used to go around the policy."""
    hlab.switch(engine_with(hlab.lab.name, SSH_FROM_OPS))
    client = make_probe(hlab.scenario, "shop/client", "node:22", "TCP", HttpRequest("GET", "/"))
    to_gateway = replace(client, destination=replace(client.destination, ip=GATEWAY_IP), timeout=0.5)
    observed = asyncio.run(run_probe(to_gateway, hlab.netns("shop/client")))
    assert observed.outcome == "dropped", observed
    admin = make_probe(hlab.scenario, "ops/admin", "node:22", "TCP", HttpRequest("GET", "/"))
    observed = asyncio.run(run_probe(replace(admin, destination=replace(admin.destination, ip=GATEWAY_IP),
                                             timeout=PASS_TIMEOUT), hlab.netns("ops/admin")))
    assert observed.outcome == "allowed", observed


def test_host_ingress_deny_wins_over_allow(hlab: KernelLab) -> None:
    hlab.switch(engine_with(hlab.lab.name, DENY_CLIENT))
    got = outcomes(hlab, [node_probe(hlab, s, p, proto) for s, p, proto in CASES])
    assert got[("shop/client", 22, "TCP")] == "dropped" and got[("shop/client", 5353, "UDP")] == "dropped"
    assert got[("ops/admin", 8081, "TCP")] == "allowed" and got[("outside", 22, "TCP")] == "allowed"
    # Allowed in, nothing listening: the node's TCP reset and ICMP port unreachable get back.
    closed = outcomes(hlab, [node_probe(hlab, "ops/admin", 9999, "TCP"), node_probe(hlab, "ops/admin", 9999, "UDP")])
    assert set(closed.values()) == {"refused"}, closed


def test_a_host_policy_that_selects_another_node_changes_nothing(hlab: KernelLab) -> None:
    hlab.switch(engine_with(hlab.lab.name, OTHER_NODES))
    assert HOST_ENDPOINT_ID not in hlab.engine.map_state().endpoints
    assert hlab.engine.map_state().policy == engine_with(hlab.lab.name).map_state().policy
    got = outcomes(hlab, [node_probe(hlab, s, p, proto) for s, p, proto in CASES])
    assert set(got.values()) == {"allowed"}, got


def test_pods_still_reach_each_other(hlab: KernelLab) -> None:
    """A host policy judges only what reaches the node: pod-to-pod traffic passes as before."""
    hlab.switch(engine_with(hlab.lab.name, SSH_FROM_OPS))
    probe = make_probe(hlab.scenario, "shop/client", "ops/admin:80", "TCP", HttpRequest("GET", "/"))
    got = outcomes(hlab, [replace(probe, timeout=PASS_TIMEOUT)])
    assert got == {("shop/client", 80, "TCP"): "allowed"}


HOST_EGRESS = """\
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-out}
spec:
  nodeSelector: {matchLabels: {node-access: ssh}}
  egress:
    - toEndpoints: [{matchLabels: {app: admin}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""

HOST_EGRESS_WORLD = HOST_EGRESS.replace("host-out", "host-out-world").replace(
    "toEndpoints: [{matchLabels: {app: admin}}]", "toEntities: [world]")


def from_node(klab: KernelLab, dst: str, port: int) -> Probe:
    p = make_probe(klab.scenario, "node", f"{dst}:{port}", "TCP", HttpRequest("GET", "/"))
    expected = klab.engine.verdict(Flow.from_probe(p)).expectation
    return replace(p, expect=expected, timeout=PASS_TIMEOUT if expected != "dropped" else 0.5)


def from_node_outcomes(klab: KernelLab) -> dict[str, str]:
    result = klab.run([from_node(klab, d, 80) for d in ("ops/admin", "shop/client", "outside")])
    assert not result.disagreements(), result.disagreements()
    return {r.probe.destination.name: r.observed.outcome for r in result.results}


def test_the_node_reaches_pods_and_world_hosts_without_a_host_policy(hlab: KernelLab) -> None:
    hlab.switch(engine_with(hlab.lab.name))
    assert from_node_outcomes(hlab) == {"ops/admin": "allowed", "shop/client": "allowed", "outside": "allowed"}


def test_host_egress_policy_judges_what_the_node_sends(hlab: KernelLab) -> None:
    hlab.switch(engine_with(hlab.lab.name, HOST_EGRESS))
    host = hlab.engine.map_state().endpoints[HOST_ENDPOINT_ID]
    assert host.egress_enforced and not host.ingress_enforced
    assert from_node_outcomes(hlab) == {"ops/admin": "allowed",    # toEndpoints app=admin, port 80
                                        "shop/client": "dropped",  # default deny at host egress
                                        "outside": "dropped"}      # toward a world host too
    # Host ingress is not enforced by an egress-only policy: pods reach the node, and the
    # node's replies pass by conntrack although its egress allows nothing toward them.
    got = outcomes(hlab, [node_probe(hlab, "shop/client", 8081), node_probe(hlab, "outside", 22)])
    assert set(got.values()) == {"allowed"}, got
    # The node's ICMP port unreachable is RELATED to the pod's flow: it passes host egress.
    closed = outcomes(hlab, [node_probe(hlab, "shop/client", 9999, "UDP")])
    assert closed == {("shop/client", 9999, "UDP"): "refused"}
    hlab.switch(engine_with(hlab.lab.name, HOST_EGRESS, HOST_EGRESS_WORLD))
    assert from_node_outcomes(hlab) == {"ops/admin": "allowed", "shop/client": "dropped", "outside": "allowed"}


def test_policy_get_shows_the_host_endpoint_of_a_running_lab() -> None:
    """`l7lab up` of scenarios/host-policy.yaml, `l7lab apply` of its host firewall: `l7lab policy
    get LAB host` reads the host endpoint's entries back from the kernel, equal to the
    resolver's; before the apply there is no host endpoint to show."""
    name = unique_lab("hg")
    up = l7lab("up", str(REPO / "scenarios" / "host-policy.yaml"), "--name", name)
    assert up.returncode == 0, up.stderr
    try:
        before = l7lab("policy", "get", name, "host", "--json")
        assert before.returncode == 1 and "no endpoint 'host'" in before.stderr, before.stderr
        applied = l7lab("apply", "--lab", name, str(REPO / "scenarios" / "policies" / "host-firewall.yaml"))
        assert applied.returncode == 0, applied.stderr
        out = l7lab("policy", "get", name, "host", "--json")
        assert out.returncode == 0, out.stderr
        (ep,) = json.loads(out.stdout)["endpoints"]
        assert (ep["endpoint"], ep["endpoint_id"], ep["identity"]) == ("host", HOST_ENDPOINT_ID, IDENTITY_HOST)
        assert ep["differences"] == 0 and ep["ingress_enforced"] is True
        ports = {(r["direction"], r["ports"], r["verdict"]) for r in ep["entries"]}
        assert {("ingress", "22/TCP", "allow"), ("ingress", "10250/TCP", "allow")} <= ports
    finally:
        l7lab("down", name)
