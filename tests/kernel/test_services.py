"""Services on real traffic: a ClusterIP over three pod servers (each answers with its own name).

Connections from a client pod spread over the backends, each landing exactly where the Python
twin of the datapath's hash says; a policy that lets the client reach one backend pod makes a
connection through the ClusterIP succeed exactly when it lands on that pod (Cilium judges the
backend); sessionAffinity ClientIP keeps the client on one backend; a service without backends
drops with its own reason; and the service's DNS names resolve inside the pods (the cluster DNS,
a kube-dns pod)."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dataplane.abi import PROTO_TCP, DropReason, FlowVerdict
from dataplane.lab import Lab
from dataplane.mapstate import ServiceEntry
from dataplane.policy import Flow, PolicyEngine
from dataplane.probes import Observation, run_probe
from dataplane.scenario import PolicyRef, PolicySource, Probe, Step, make_probe, parse_scenario
from dataplane.services import pick_backend
from dataplane.tracing import trace_in_lab
from dataplane.yamlsource import load_documents
from dataplane.timescale import scaled
from tests.conftest import unique_lab

pytestmark = pytest.mark.kernel

TOPOLOGY = """
name: svc
namespaces:
  - name: shop
  - name: other
  - name: kube-system
pods:
  - {name: web-1, namespace: shop, labels: {app: web, instance: "1"}, ports: [{port: 8080, name: http}]}
  - {name: web-2, namespace: shop, labels: {app: web, instance: "2"}, ports: [{port: 8080, name: http}]}
  - {name: web-3, namespace: shop, labels: {app: web, instance: "3"}, ports: [{port: 8080, name: http}]}
  - {name: client, namespace: shop, labels: {app: client}}
  - {name: stranger, namespace: other, labels: {app: client}}
  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}]}
services:
  - {name: web, namespace: shop, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
  - {name: sticky, namespace: shop, selector: {app: web}, sessionAffinity: ClientIP,
     ports: [{port: 80, targetPort: 8080}]}
  - {name: empty, namespace: shop, selector: {app: nobody}, ports: [{port: 80}]}
  - {name: closed, namespace: shop, selector: {app: web}, ports: [{port: 53, protocol: UDP, targetPort: 5353}]}
"""

ONLY_WEB_1 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-to-web-1, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: web, instance: "1"}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""

ANSWER_TIMEOUT = 5.0  # a connection expected to be answered: generous, a slow answer is no drop
DROP_TIMEOUT = 0.5  # a connection expected to be dropped waits this out


@pytest.fixture(scope="module")
def lab(datapath) -> Iterator[Lab]:  # noqa: ANN001 - the session's Datapath
    (doc,) = load_documents(TOPOLOGY, "services-test.yaml")
    scenario = parse_scenario(doc, Path("services-test.yaml")).with_name(unique_lab("svc"))
    with Lab(scenario, datapath=datapath, policy=PolicyEngine(scenario)) as up:
        yield up


def entry(lab: Lab, name: str) -> ServiceEntry:
    svc = lab.scenario.services[f"shop/{name}"]
    return lab.policy.map_state().services[(svc.cluster_ip, 80, PROTO_TCP)]


def probe_to(lab: Lab, service: str, timeout: float) -> Probe:
    return replace(make_probe(lab.scenario, "shop/client", f"shop/{service}:80"), timeout=timeout)


def connect(lab: Lab, service: str, sports: list[int | None], timeouts: list[float]) -> list[Observation]:
    """One HTTP request through the service per source port (None: the kernel picks one)."""
    netns = lab.record.endpoints["shop/client"].netns

    async def all_of() -> list[Observation]:
        return list(await asyncio.gather(*(run_probe(probe_to(lab, service, t), netns, s)
                                           for s, t in zip(sports, timeouts))))
    return asyncio.run(all_of())


def test_connections_spread_over_backends_where_the_hash_says(lab: Lab) -> None:
    web = entry(lab, "web")
    client_ip = lab.scenario.pods["shop/client"].ip
    observed = connect(lab, "web", [None] * 30, [ANSWER_TIMEOUT] * 30)
    assert all(o.outcome == "allowed" for o in observed), [o.detail for o in observed]
    answered = [o.body["endpoint"] for o in observed]
    expected = [pick_backend(web, client_ip, o.extra["sport"]).pod for o in observed]  # type: ignore[union-attr]
    assert answered == expected
    assert len(set(answered)) > 1
    assert set(answered) <= {"shop/web-1", "shop/web-2", "shop/web-3"}
    # Every backend served on its target port, named by the port's name.
    assert {o.body["server_port"] for o in observed} == {8080}


def test_policy_is_judged_against_the_backend_pod(lab: Lab) -> None:
    """The client may reach web-1 only: through the ClusterIP it gets in exactly when its
    connection lands on web-1; the drops are the client's egress, naming the backend."""
    web = entry(lab, "web")
    client_ip = lab.scenario.pods["shop/client"].ip
    step = Step(0, "only web-1", apply=tuple(PolicySource(d) for d in load_documents(ONLY_WEB_1, "policy.yaml")))
    lab.policy.apply_step(step)
    lab.sync_policy(lab.policy.map_state())
    try:
        lab.datapath.poll_events()
        rng = random.Random(16)
        lands = {}
        for sport in rng.sample(range(33000, 60000), 400):
            lands.setdefault(pick_backend(web, client_ip, sport).pod, []).append(sport)  # type: ignore[union-attr]
        sports = lands["shop/web-1"][:4] + lands["shop/web-2"][:3] + lands["shop/web-3"][:3]
        pods = ["shop/web-1"] * 4 + ["shop/web-2"] * 3 + ["shop/web-3"] * 3
        observed = connect(lab, "web", list(sports),
                           [ANSWER_TIMEOUT if p == "shop/web-1" else DROP_TIMEOUT for p in pods])
        outcomes = [(p, o.outcome, (o.body or {}).get("endpoint") if isinstance(o.body, dict) else None)
                    for p, o in zip(pods, observed)]
        assert outcomes == [(p, "allowed", p) if p == "shop/web-1" else (p, "dropped", None) for p in pods]
        ips = {lab.scenario.pods[p].ip: p for p in pods}
        drops = {(ips.get(e.dst), e.dport, e.reason) for e in lab.datapath.poll_events()
                 if e.verdict == FlowVerdict.DROP and e.sport in sports}
        assert drops == {("shop/web-2", 8080, DropReason.POLICY_DENIED), ("shop/web-3", 8080, DropReason.POLICY_DENIED)}
    finally:
        lab.policy.apply_step(Step(1, "undo", delete=(PolicyRef("CiliumNetworkPolicy", "client-to-web-1", "shop"),)))
        lab.sync_policy(lab.policy.map_state())
        lab.datapath.flush_conntrack()


def test_session_affinity_keeps_the_client_on_one_backend(lab: Lab) -> None:
    sticky = entry(lab, "sticky")
    chosen = pick_backend(sticky, lab.scenario.pods["shop/client"].ip, 0)
    observed = connect(lab, "sticky", [None] * 12, [ANSWER_TIMEOUT] * 12)
    assert chosen is not None
    assert [o.body["endpoint"] for o in observed if isinstance(o.body, dict)] == [chosen.pod] * 12


def test_service_without_backends_drops_with_its_reason(lab: Lab) -> None:
    lab.datapath.poll_events()
    (observed,) = connect(lab, "empty", [None], [DROP_TIMEOUT])
    assert observed.outcome == "dropped"
    vip = lab.scenario.services["shop/empty"].cluster_ip
    reasons = {e.reason for e in lab.datapath.poll_events() if e.dst == vip and e.sport == observed.extra["sport"]}
    assert reasons == {DropReason.NO_SERVICE_BACKEND}


def test_a_datagram_to_a_closed_backend_port_goes_unanswered_as_the_oracle_says(lab: Lab) -> None:
    """The backend's ICMP port unreachable is not translated back to the ClusterIP: the client
    hears nothing, and the oracle says so (not `refused`, as it would to the pod directly)."""
    probe = replace(make_probe(lab.scenario, "shop/client", "closed:53", "UDP"), timeout=DROP_TIMEOUT)
    netns = lab.record.endpoints["shop/client"].netns
    observed = asyncio.run(run_probe(probe, netns))
    decision = lab.policy.verdict(Flow.from_probe(probe))
    assert (observed.outcome, decision.outcome) == ("dropped", "dropped")
    assert "not translated back" in decision.trace[-1]
    direct = replace(make_probe(lab.scenario, "shop/client", "web-1:5353", "UDP"), timeout=ANSWER_TIMEOUT)
    assert asyncio.run(run_probe(direct, netns)).outcome == lab.policy.verdict(Flow.from_probe(direct)).outcome == "refused"


def resolve(lab: Lab, pod: str, name: str) -> str | None:
    """The address `name` resolves to inside `pod` (through the cluster DNS), None if it does not."""
    out = subprocess.run(["ip", "netns", "exec", lab.record.endpoints[pod].netns, "getent", "hosts", name],
                         capture_output=True, text=True, timeout=scaled(30))
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout else None


def test_service_dns_names_resolve_inside_pods(lab: Lab) -> None:
    vip = lab.scenario.services["shop/web"].cluster_ip
    for name in ("web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local"):
        assert resolve(lab, "shop/client", name) == vip, name
    # The bare name is the service's only inside its own namespace.
    assert resolve(lab, "other/stranger", "web") is None
    assert resolve(lab, "other/stranger", "web.shop.svc.cluster.local") == vip



def test_a_traced_probe_to_a_service_follows_the_translated_flow(lab: Lab) -> None:
    """`explain` on the kernel: the probe reaches the backend the oracle judges, and the trace
    sees the flow on both sides of the translation (the client's hook and the backend's)."""
    probe = replace(make_probe(lab.scenario, "shop/client", "web", backend="web-2"), timeout=ANSWER_TIMEOUT)
    trace = asyncio.run(trace_in_lab(lab, lab.policy, probe))
    web2 = lab.scenario.pods["shop/web-2"]
    assert trace.outcome == "allowed" and not trace.disagreements, (trace.outcome, trace.disagreements)
    assert trace.oracle["translation"] == f"service shop/web {probe.destination.ip}:80/TCP -> pod shop/web-2 {web2.ip}:8080"
    client = lab.scenario.pods["shop/client"].ip
    vip = probe.destination.ip
    titles = [s.title for s in trace.steps if s.layer == "kernel"]
    syn = f"SYN TCP {client}:{trace.client[1]} (shop/client) -> "
    assert any("from_container" in t and syn + f"{vip}:80" in t for t in titles)  # the client sends to the VIP
    assert any("to_container" in t and syn + f"{web2.ip}:8080 (shop/web-2)" in t for t in titles)  # web-2 gets it
    # web-2's answer reaches the client from the ClusterIP.
    assert any("to_container" in t and f"SYN-ACK TCP {vip}:80 -> {client}:{trace.client[1]}" in t for t in titles)
