"""Plumbing for the real-traffic differential tests: one lab per module, cases switched by map
updates, probes answered by the kernel and judged against the oracle.

A module builds ONE lab on the x/y/z a/b/c topology of the upstream Kubernetes netpol e2e suite
(plus world hosts in the documentation ranges). A case is a scenario with the same pods and
addresses but its own policies and settings; `KernelLab.switch(engine)` points the lab at a new
PolicyEngine and writes its map state as a diff against what was there (no reattach), so every
case also exercises the loader's diffing `sync`.

Probe timeouts: a probe the oracle expects to be dropped gets a short timeout (it costs the whole
timeout); one the oracle expects to pass gets a long one, so a slow answer on a loaded machine
is never mistaken for a drop, and a kernel drop of an oracle-allowed flow still fails the test.
"""

from __future__ import annotations

import asyncio
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from dataplane import lab as labmod
from dataplane import topology
from dataplane.errors import SourceLocation
from dataplane.lab import Lab
from dataplane.policy import Flow, PolicyEngine
from dataplane.probes import Observation, run_probe
from dataplane.runner import KernelExecutor, ProbeResult, run_scenario
from dataplane.scenario import Destination, Probe, Scenario, Step, parse_scenario
from dataplane.yamlsource import load_documents

DROP_TIMEOUT = 0.4  # for probes the oracle expects to be dropped
PASS_TIMEOUT = 3.0  # for probes the oracle expects to be answered
HERE = SourceLocation("tests/support/kernel_lab.py")

PORTS_ALL = (("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 81))
PORTS_TWO = (("TCP", 80), ("UDP", 81))
# Port 82 is declared nowhere: an allowed flow is "refused" (TCP reset / ICMP port unreachable,
# the latter a RELATED packet that must pass conntrack even where policy denies new ICMP flows).

WORLD = {"w1": "203.0.113.10", "w2": "203.0.113.130", "w3": "198.51.100.7"}


def _pod_line(ns: str, pod: str) -> str:
    return (f"  - {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}, ports: [{{port: 80, name: serve-80-tcp}}, "
            f"{{port: 81, name: serve-81-tcp}}, {{port: 80, protocol: UDP, name: serve-80-udp}}, "
            f"{{port: 81, protocol: UDP, name: serve-81-udp}}]}}\n")


# The upstream Kubernetes network policy e2e layout (test/e2e/network/netpol): namespaces x, y,
# z; pods a, b, c in each; ports 80 and 81, TCP and UDP; plus three world hosts.
NETPOL_WORLD_TOPOLOGY = (
    "name: netpol\n"
    "namespaces:\n"
    "  - {name: x, labels: {ns: x}}\n"
    "  - {name: y, labels: {ns: y}}\n"
    "  - {name: z, labels: {ns: z}}\n"
    "pods:\n" + "".join(_pod_line(n, p) for n in "xyz" for p in "abc")
    + "world:\n" + "".join(
        f"  - {{name: {name}, address: {ip}, ports: [{{port: 80}}, {{port: 81}}, {{port: 80, protocol: UDP}}, "
        f"{{port: 81, protocol: UDP}}]}}\n" for name, ip in WORLD.items()))

PODS = [f"{n}/{p}" for n in "xyz" for p in "abc"]


def make_scenario(policies: str = "", settings: str = "", steps: str = "",
                  topology_text: str = NETPOL_WORLD_TOPOLOGY) -> Scenario:
    """A scenario from YAML strings: policies separated by '---', settings and steps as YAML."""
    text = topology_text
    if settings.strip():
        text += "settings:\n" + textwrap.indent(textwrap.dedent(settings).strip() + "\n", "  ")
    docs = [d for d in textwrap.dedent(policies).split("\n---\n") if d.strip()]
    if docs:
        text += "policies:\n" + "".join("  - " + textwrap.indent(d.strip(), "    ")[4:] + "\n" for d in docs)
    if steps.strip():
        text += textwrap.dedent(steps)
    (doc,) = load_documents(text, "case.yaml")
    return parse_scenario(doc, Path("case.yaml"))


def knp(name: str, namespace: str, spec: str) -> str:
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")


def cnp(name: str, namespace: str, spec: str) -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")


def ccnp(name: str, spec: str) -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: {name}}}\n"
            "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")


def target(scenario: Scenario, name: str, port: int) -> Destination:
    if name in scenario.pods:
        return Destination("pod", name, scenario.pods[name].ip, port)
    host = scenario.world[name]
    return Destination("world", name, host.address, port)


def oracle_outcome(engine: PolicyEngine, src: str, dst: str, port: int, protocol: str) -> str:
    probe = make_probe(engine.scenario, src, dst, port, protocol, "allowed", 1.0)
    return engine.verdict(Flow.from_probe(probe)).outcome


def make_probe(scenario: Scenario, src: str, dst: str, port: int, protocol: str, expect: str,
               timeout: float) -> Probe:
    return Probe(src, target(scenario, dst, port), protocol, expect, None, timeout, HERE)


def oracle_probe(engine: PolicyEngine, src: str, dst: str, port: int, protocol: str) -> Probe:
    """A probe whose expectation is the oracle's answer (so `passed` means kernel == oracle)."""
    expect = oracle_outcome(engine, src, dst, port, protocol)
    return make_probe(engine.scenario, src, dst, port, protocol, expect,
                      DROP_TIMEOUT if expect == "dropped" else PASS_TIMEOUT)


def pair_probes(engine: PolicyEngine, pairs: Iterable[tuple[str, str]],
                ports: Iterable[tuple[str, int]] = PORTS_TWO) -> list[Probe]:
    ports = tuple(ports)
    return [oracle_probe(engine, s, d, port, proto) for s, d in pairs for proto, port in ports]


CLOSED_PORT_SOURCES = ("x/a", "y/b", "w1")  # few: the host-wide ICMP error budget is small


def closed_port_probes(engine: PolicyEngine) -> list[Probe]:
    pairs = [(s, d) for s in CLOSED_PORT_SOURCES for d in PODS if s != d] + [("x/a", "w2")]
    return pair_probes(engine, pairs, (("TCP", 82), ("UDP", 82)))


def all_pod_pairs(sources: Iterable[str] = PODS, destinations: Iterable[str] = PODS) -> list[tuple[str, str]]:
    dsts = list(destinations)
    return [(s, d) for s in sources for d in dsts if s != d]


@dataclass
class Outcomes:
    """The results of one batch, by (source, destination, port, protocol)."""

    results: list[ProbeResult] = field(default_factory=list)

    def __getitem__(self, key: tuple[str, str, int, str]) -> str:
        src, dst, port, proto = key
        for r in self.results:
            p = r.probe
            if (p.source, p.destination.name, p.destination.port, p.protocol) == (src, dst, port, proto):
                return r.observed.outcome
        raise KeyError(key)

    def disagreements(self) -> list[str]:
        return [f"{r.probe.source} -> {r.probe.destination} {r.probe.protocol}: kernel {r.observed.outcome} "
                f"({r.observed.detail}; event: {r.kernel}), oracle {r.oracle}"
                for r in self.results if not r.passed]


class KernelLab:
    """One enforcing lab shared by a module's cases."""

    def __init__(self, lab: Lab, datapath) -> None:  # noqa: ANN001 - a Datapath
        self.lab = lab
        self.datapath = datapath

    @property
    def engine(self) -> PolicyEngine:
        return self.lab.policy

    @property
    def scenario(self) -> Scenario:
        return self.engine.scenario

    def switch(self, engine: PolicyEngine, flush: bool = True):  # noqa: ANN201 - SyncStats
        """A new case: its engine becomes the lab's policy; map updates only. Conntrack is
        flushed (as at a lab restart) so no flow of the previous case is remembered, unless
        `flush` is False."""
        self.lab.policy = engine
        stats = self.lab.sync_policy(engine.map_state())
        if flush:
            self.datapath.flush_conntrack()
        self.datapath.poll_events()
        return stats

    def apply(self, step: Step, flush: bool = True) -> None:
        """A policy step of the current engine (apply/delete/relabel), synced as a diff."""
        self.engine.apply_step(step)
        self.lab.sync_policy(self.engine.map_state())
        if flush:
            self.datapath.flush_conntrack()

    def run(self, probes: list[Probe]) -> Outcomes:
        """Real traffic for every probe, judged against the oracle (ProbeResult.passed)."""
        sc = replace(self.scenario, steps=(Step(0, "probes", probes=tuple(probes)),))
        report = run_scenario(sc, KernelExecutor(self.lab, self.engine), self.lab.name)
        return Outcomes(report.results)

    def observe(self, src: str, dst: str, port: int, protocol: str, timeout: float) -> Observation:
        """One probe outside the runner (its events stay in the ring buffer for the caller)."""
        probe = make_probe(self.scenario, src, dst, port, protocol, "allowed", timeout)
        return asyncio.run(run_probe(probe, self.lab.record.endpoints[src].netns))

    def netns(self, endpoint: str) -> str:
        return self.lab.record.endpoints[endpoint].netns


def open_lab(scenario: Scenario, datapath, name: str) -> KernelLab:  # noqa: ANN001
    lab = Lab(scenario.with_name(name), datapath=datapath, policy=PolicyEngine(scenario.with_name(name)))
    lab.up()  # (the lab lifts the per-namespace ICMP error rate limit itself)
    return KernelLab(lab, datapath)


def close_lab(klab: KernelLab) -> None:
    name = klab.lab.name
    klab.lab.down()
    left = topology.list_netns(labmod.lab_prefix(name))
    assert not left, f"namespaces left behind by {name}: {left}"
    assert not labmod.record_path(name).exists()
