"""SCTP under policy, on real traffic: a probe is an association attempt (an INIT from a raw
socket of the source pod, allowed when the server's INIT-ACK with the INIT's tag comes back),
with no SCTP stack in the kernel. A Kubernetes NetworkPolicy naming one SCTP port allows that
port only: not another SCTP port, not TCP on the same number; a Cilium port of protocol ANY
covers SCTP; the kernel agrees with the oracle on every probe; what reached a server is in its
request log; the kernel's flow records and Hubble's JSON name SCTP with its ports.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from dataplane.flows import Directory, kernel_flows
from dataplane.hubble import hubble_flows
from dataplane.lab import lab_dir, lab_prefix
from dataplane.logfiles import read_all, request_log
from dataplane.podserver import kernel_has_sctp
from dataplane.policy import Flow, PolicyEngine
from dataplane.scenario import make_probe as scenario_probe
from dataplane.probes import run_probe
from tests.support.kernel_lab import DROP_TIMEOUT, PASS_TIMEOUT, KernelLab, cnp, knp, make_probe, oracle_probe
from tests.support.kernel_lab import make_scenario as scenario_from

LAB_PREFIX = "sc"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)

TOPOLOGY = """\
name: sctp
node:
  ports: [{port: 9100, protocol: SCTP}]
namespaces:
  - {name: x}
pods:
  - {name: client, namespace: x, labels: {app: client}}
  - {name: other, namespace: x, labels: {app: other}}
  - name: server
    namespace: x
    labels: {app: server}
    ports: [{port: 9000, protocol: SCTP}, {port: 9001, protocol: SCTP}, {port: 9000, protocol: TCP}]
  - {name: bare, namespace: x, labels: {app: bare}}
world:
  - {name: peer, address: 198.51.100.38, ports: [{port: 3868, protocol: SCTP}]}
"""


def make_scenario(policies: str = ""):  # noqa: ANN201 - a Scenario
    return scenario_from(policies, topology_text=TOPOLOGY)


def server_log(klab: KernelLab, endpoint: str = "x/server") -> list[dict]:
    ns = klab.netns(endpoint).removeprefix(lab_prefix(klab.lab.name))
    return read_all(request_log(lab_dir(klab.lab.name), ns))


def probes(engine: PolicyEngine, cases: list[tuple[str, str, int, str]]):  # noqa: ANN201
    """Oracle-judged probes for (source, destination, port, protocol)."""
    return [oracle_probe(engine, s, d, port, proto) for s, d, port, proto in cases]


def test_without_policy_an_init_is_answered_and_logged(klab: KernelLab) -> None:
    """No policy: the server answers an INIT on a declared port with an INIT-ACK and logs it;
    an INIT to an undeclared port gets an ABORT (`refused`), one to a pod with no SCTP at all
    an ICMP protocol unreachable from its kernel (`refused` too); a world host answers SCTP."""
    engine = PolicyEngine(make_scenario())
    klab.switch(engine)
    out = klab.run(probes(engine, [("x/client", "x/server", 9000, "SCTP"), ("x/client", "x/server", 9002, "SCTP"),
                                         ("x/client", "x/bare", 9000, "SCTP"), ("x/client", "peer", 3868, "SCTP"),
                                         ("peer", "x/server", 9001, "SCTP")]))
    assert not out.disagreements(), out.disagreements()
    assert [r.observed.outcome for r in out.results] == ["allowed", "refused", "refused", "allowed", "allowed"]
    assert out.results[1].observed.detail.startswith("ABORT")
    # A pod with no SCTP port runs no SCTP responder: its kernel answers, an ICMP protocol
    # unreachable without an SCTP stack, an ABORT with one.
    assert ("ABORT" if kernel_has_sctp() else "ICMP protocol unreachable") in out.results[2].observed.detail
    client_ip = klab.lab.record.endpoints["x/client"].ip
    sport = out.results[0].observed.extra["sport"]
    log = server_log(klab)
    assert {"endpoint": "x/server", "sctp": "INIT", "client": f"{client_ip}:{sport}", "server_port": 9000,
            "answer": "INIT_ACK"}.items() <= next(r for r in log if r.get("client") == f"{client_ip}:{sport}").items()
    refused = f"{client_ip}:{out.results[1].observed.extra['sport']}"
    assert [r["answer"] for r in log if r.get("client") == refused] == ["ABORT"]


def test_network_policy_allows_one_sctp_port(klab: KernelLab) -> None:
    """A NetworkPolicy port {port: 9000, protocol: SCTP}: SCTP 9000 from the client passes;
    SCTP 9001, TCP 9000 and SCTP 9000 from another pod are dropped and never reach the server."""
    engine = PolicyEngine(make_scenario(knp("server-sctp", "x", """
        podSelector: {matchLabels: {app: server}}
        policyTypes: [Ingress]
        ingress:
          - from: [{podSelector: {matchLabels: {app: client}}}]
            ports: [{port: 9000, protocol: SCTP}]
        """)))
    klab.switch(engine)
    out = klab.run(probes(engine, [("x/client", "x/server", 9000, "SCTP"), ("x/client", "x/server", 9001, "SCTP"),
                                         ("x/client", "x/server", 9000, "TCP"), ("x/other", "x/server", 9000, "SCTP")]))
    assert not out.disagreements(), out.disagreements()
    assert [r.observed.outcome for r in out.results] == ["allowed", "dropped", "dropped", "dropped"]
    assert out.results[0].kernel_verdict == "FORWARD"
    assert [r.kernel_verdict for r in out.results[1:]] == ["DROP"] * 3
    clients = {r.get("client") for r in server_log(klab)}
    ips = {e: klab.lab.record.endpoints[e].ip for e in ("x/client", "x/other")}
    reached = [f"{ips[r.probe.source]}:{r.observed.extra['sport']}" in clients for r in out.results if r.probe.protocol == "SCTP"]
    assert reached == [True, False, False]


def test_cilium_protocol_any_covers_sctp(klab: KernelLab) -> None:
    """A CiliumNetworkPolicy port of protocol ANY is TCP, UDP and SCTP: SCTP 9001 from `other`
    passes, SCTP 9000 does not; egress by toCIDR with an SCTP port lets the client reach the
    world host on that port only."""
    engine = PolicyEngine(make_scenario(cnp("any-9001", "x", """
        endpointSelector: {matchLabels: {app: server}}
        ingress:
          - fromEndpoints: [{matchLabels: {app: other}}]
            toPorts: [{ports: [{port: "9001", protocol: ANY}]}]
        """) + "\n---\n" + cnp("client-out", "x", """
        endpointSelector: {matchLabels: {app: client}}
        egress:
          - toCIDR: [198.51.100.38/32]
            toPorts: [{ports: [{port: "3868", protocol: SCTP}]}]
        """)))
    klab.switch(engine)
    out = klab.run(probes(engine, [("x/other", "x/server", 9001, "SCTP"), ("x/other", "x/server", 9000, "SCTP"),
                                         ("x/client", "peer", 3868, "SCTP"), ("x/client", "peer", 3868, "TCP"),
                                         ("x/client", "x/server", 9001, "SCTP")]))
    assert not out.disagreements(), out.disagreements()
    assert [r.observed.outcome for r in out.results] == ["allowed", "dropped", "allowed", "dropped", "dropped"]


def test_sctp_flow_records_name_the_protocol_and_ports(klab: KernelLab) -> None:
    """The kernel's events of an SCTP probe become flow records of protocol SCTP with the
    probe's ports, shown by Hubble under l4.SCTP; a dropped INIT is a Drop record."""
    engine = PolicyEngine(make_scenario(knp("server-sctp", "x", """
        podSelector: {matchLabels: {app: server}}
        policyTypes: [Ingress]
        ingress:
          - ports: [{port: 9000, protocol: SCTP}]
        """)))
    klab.switch(engine)
    src = klab.netns("x/client")
    allowed = asyncio.run(run_probe(make_probe(engine.scenario, "x/client", "x/server", 9000, "SCTP", "allowed",
                                               PASS_TIMEOUT), src, 40123))
    dropped = asyncio.run(run_probe(make_probe(engine.scenario, "x/client", "x/server", 9001, "SCTP", "dropped",
                                               DROP_TIMEOUT), src, 40124))
    assert (allowed.outcome, dropped.outcome) == ("allowed", "dropped")
    flows = kernel_flows(klab.datapath.poll_events(), engine.map_state(), Directory.of_lab(klab.lab))
    sctp = [f for f in flows if f.l4.protocol == "SCTP"]
    request = next(f for f in sctp if (f.source.port, f.destination.port) == (40123, 9000))
    assert request.verdict.value == "FORWARD"
    drop = next(f for f in sctp if (f.source.port, f.destination.port) == (40124, 9001))
    assert drop.verdict.value == "DROP"
    shown = hubble_flows(drop, "node")[0]
    assert shown["l4"] == {"SCTP": {"source_port": 40124, "destination_port": 9001}}
    assert shown["verdict"] == "DROPPED"


def test_sctp_under_an_l7_redirect_is_dropped_fail_closed(klab: KernelLab) -> None:
    """DNS rules on a port of protocol ANY redirect SCTP too; the proxy has no SCTP side, so the
    datapath drops the INIT (no proxy socket), and the oracle says so, while DNS over UDP on
    the same port goes through the proxy."""
    engine = PolicyEngine(make_scenario(cnp("dns-any", "x", """
        endpointSelector: {matchLabels: {app: server}}
        ingress:
          - toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
        """)))
    klab.switch(engine)
    out = klab.run(probes(engine, [("x/client", "x/server", 53, "SCTP"), ("x/client", "x/server", 9000, "SCTP")]))
    assert not out.disagreements(), out.disagreements()
    assert [r.observed.outcome for r in out.results] == ["dropped", "dropped"]
    assert "PROXY_SOCKET_MISSING" in (out.results[0].kernel or ""), out.results[0].kernel
    assert "POLICY_DENIED" in (out.results[1].kernel or ""), out.results[1].kernel


def test_sctp_to_and_from_the_node(klab: KernelLab) -> None:
    """The node's own server answers SCTP on the node's declared SCTP ports (an ABORT on the
    others), and the node's stack (identity host) can open an association to a pod."""
    engine = PolicyEngine(make_scenario())
    klab.switch(engine)
    sc = engine.scenario
    cases = [("x/client", "node:9100", "allowed"), ("x/client", "node:9101", "refused"), ("node", "x/server:9000", "allowed")]
    batch = [replace(probe, expect=engine.verdict(Flow.from_probe(probe)).expectation,
                     timeout=PASS_TIMEOUT) for probe in (scenario_probe(sc, s, to, "SCTP") for s, to, _ in cases)]
    assert [p.expect for p in batch] == [want for _, _, want in cases]  # the oracle's answers
    out = klab.run(batch)
    assert not out.disagreements(), out.disagreements()
    assert [r.observed.outcome for r in out.results] == [want for _, _, want in cases]


@pytest.mark.parametrize("port, expect", [(9000, "allowed"), (9001, "dropped")])
def test_an_sctp_probe_is_traced(klab: KernelLab, port: int, expect: str) -> None:
    """`explain` on an SCTP probe: the kernel's trace of the INIT agrees with the oracle."""
    from dataplane.tracing import trace_in_lab  # noqa: PLC0415

    engine = PolicyEngine(make_scenario(knp("server-sctp", "x", """
        podSelector: {matchLabels: {app: server}}
        policyTypes: [Ingress]
        ingress:
          - ports: [{port: 9000, protocol: SCTP}]
        """)))
    klab.switch(engine)
    trace = asyncio.run(trace_in_lab(klab.lab, engine, oracle_probe(engine, "x/client", "x/server", port, "SCTP"))).to_json()
    assert trace["outcome"] == expect and trace["disagreements"] == [], trace
    texts = [s["title"] for s in trace["steps"]]
    assert any("proto=SCTP" in t and f"port={port}" in t for t in texts), texts
