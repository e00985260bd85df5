"""World hosts anywhere outside the cluster, on real traffic: the machine's own addresses, its
default gateway, the cloud metadata endpoint and 10.0.0.0/8 around the pod CIDR.

A world host is a namespace of the lab behind the node's world link; only the lab's namespaces
route to it. So a world host that has an address of the machine's own network (read, never
changed, from the root namespace) is what a pod reaches at that address: the answer comes from
the world host's server, and nothing arrives in the root namespace (listeners there on the same
port see nothing), which keeps its addresses, routes and rules as they were. An address no world
host has is unreachable from the lab: the node has no route out.

Flows start from world hosts too (ingress from outside the cluster), judged by fromCIDR,
fromCIDRSet, fromEntities: world and Kubernetes ipBlock, the kernel agreeing with the oracle on
every probe.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from dataplane.policy import PolicyEngine
from dataplane.probes import run_probe
from dataplane.scenario import Destination, HttpRequest, Probe, Scenario, make_probe, parse_scenario
from dataplane.yamlsource import load_documents
from tests.conftest import unique_lab
from tests.support.kernel_lab import HERE, PASS_TIMEOUT, KernelLab, close_lab, cnp, knp, open_lab

METADATA = "169.254.169.254"
POD_CIDRS = ("10.200.0.0/24", "10.201.0.0/24", "172.31.254.0/24", "192.168.254.0/24")
# Candidates, in case the machine holds one: each case's prefixes treat them all alike
# (10.12.0.0/14 holds every collector, 10.64.0.0/10 every office).
COLLECTORS = ("10.12.0.7", "10.13.0.7", "10.14.0.7")
OFFICES = ("10.64.3.20", "10.65.3.20", "10.66.3.20")
MAX_MACHINE_HOSTS = 6  # a machine with many addresses: the first few stand for all


def _ip_json(*args: str) -> list[dict]:
    """`ip -j ARGS` in the root namespace: read-only queries only."""
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")


@dataclass(frozen=True)
class MachineNetwork:
    """The root namespace's IPv4 addresses (loopback left out) and default gateways."""

    addresses: tuple[str, ...]
    gateways: tuple[str, ...]

    @classmethod
    def read(cls) -> "MachineNetwork":
        addresses = [a["local"] for link in _ip_json("-4", "addr", "show") for a in link.get("addr_info", [])
                     if not ipaddress.ip_address(a["local"]).is_loopback]
        gateways = [r["gateway"] for r in _ip_json("-4", "route", "show", "default") if "gateway" in r]
        return cls(tuple(dict.fromkeys(addresses)), tuple(dict.fromkeys(gateways)))


def root_state() -> dict[str, list]:
    """What the lab must never change in the root namespace: its IPv4 addresses, the routes of
    every table and the policy routing rules (fields that do not drift on their own)."""
    addresses = sorted((link["ifname"], a["local"], a["prefixlen"]) for link in _ip_json("-4", "addr", "show")
                       for a in link.get("addr_info", []))
    routes = sorted(json.dumps({k: r.get(k) for k in ("type", "dst", "gateway", "dev", "table", "prefsrc", "scope")},
                               sort_keys=True) for r in _ip_json("-4", "route", "show", "table", "all"))
    rules = sorted(json.dumps(r, sort_keys=True) for r in _ip_json("-4", "rule", "show"))
    return {"addresses": addresses, "routes": routes, "rules": rules}


def _usable(address: str, pod_cidr: ipaddress.IPv4Network) -> bool:
    """An address of the machine the lab can give a world host (not the pods' gateway, which
    is the node's own address in every lab, nor inside the pod CIDR chosen)."""
    addr = ipaddress.ip_address(address)
    return address not in ("169.254.1.1", METADATA) and addr not in pod_cidr and not addr.is_multicast


@dataclass
class WorldLab:
    klab: KernelLab
    machine: MachineNetwork
    hosts: dict[str, str]  # world host name -> address, the machine's addresses and gateways
    port: int  # the port the machine's world hosts serve, and the root listeners bind
    root_tcp: socket.socket
    root_udp: socket.socket
    before: dict[str, list]
    collector: str
    office: str


def _topology(pod_cidr: str, hosts: dict[str, str], port: int, collector: str, office: str) -> str:
    world = "".join(f"  - {{name: {name}, address: {addr}, ports: [{{port: {port}}}, {{port: {port}, protocol: UDP}}]}}\n"
                    for name, addr in hosts.items())
    return textwrap.dedent(f"""\
        name: worldhosts
        settings: {{podCIDR: {pod_cidr}}}
        namespaces:
          - {{name: prod}}
          - {{name: mon}}
        pods:
          - {{name: app, namespace: prod, labels: {{app: app}}, ports: [{{port: 8080}}, {{port: 8080, protocol: UDP}}]}}
          - {{name: agent, namespace: mon, labels: {{app: agent}}, ports: [{{port: 4317}}]}}
        world:
          - {{name: metadata, address: {METADATA}, ports: [{{port: 80}}]}}
          - {{name: collector, address: {collector}, ports: [{{port: 4317}}]}}
          - {{name: office, address: {office}}}
          - {{name: internet, address: 203.0.113.50}}
        """) + world


def make_world_scenario(wl: WorldLab, policies: str = "") -> Scenario:
    """The lab's topology with these policies ('---' between documents)."""
    text = _topology(str(wl.klab.scenario.settings.pod_cidr), wl.hosts, wl.port, wl.collector, wl.office)
    docs = [d for d in textwrap.dedent(policies).split("\n---\n") if d.strip()]
    if docs:
        text += "policies:\n" + "".join("  - " + textwrap.indent(d.strip(), "    ")[4:] + "\n" for d in docs)
    (doc,) = load_documents(text, "worldhosts.yaml")
    return parse_scenario(doc, Path("worldhosts.yaml"))


@pytest.fixture(scope="module")
def world(datapath) -> Iterator[WorldLab]:  # noqa: ANN001 - session fixture
    machine = MachineNetwork.read()
    taken = [ipaddress.ip_address(a) for a in machine.addresses + machine.gateways]
    pod_cidr = next(ipaddress.ip_network(c) for c in POD_CIDRS if not any(a in ipaddress.ip_network(c) for a in taken))
    hosts = {f"machine-{i}": a for i, a in enumerate(a for a in machine.addresses if _usable(a, pod_cidr))}
    hosts |= {f"gateway-{i}": g for i, g in enumerate(g for g in machine.gateways if _usable(g, pod_cidr))}
    hosts = dict(list(hosts.items())[:MAX_MACHINE_HOSTS])
    assert hosts, f"the machine has no IPv4 address or default gateway to stand in for: {machine}"
    collector = next(c for c in COLLECTORS if c not in machine.addresses + machine.gateways)
    office = next(o for o in OFFICES if o not in machine.addresses + machine.gateways)
    # Listeners in the root namespace on every address, on the port the world hosts serve:
    # anything of the lab's traffic that reached the machine's own stack would arrive here.
    root_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    root_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        root_tcp.bind(("0.0.0.0", 0))
        port = root_tcp.getsockname()[1]
        root_udp.bind(("0.0.0.0", port))
        root_tcp.listen(16)
        root_tcp.setblocking(False)
        root_udp.setblocking(False)
        before = root_state()
        (doc,) = load_documents(_topology(str(pod_cidr), hosts, port, collector, office), "worldhosts.yaml")
        klab = open_lab(parse_scenario(doc, Path("worldhosts.yaml")), datapath, unique_lab("wh"))
        try:
            yield WorldLab(klab, machine, hosts, port, root_tcp, root_udp, before, collector, office)
        finally:
            close_lab(klab)
    finally:
        root_tcp.close()
        root_udp.close()


def probe(wl: WorldLab, src: str, dst: str, port: int, protocol: str = "TCP", expect: str = "allowed",
          path: str = "/") -> Probe:
    http = HttpRequest("GET", path) if protocol == "TCP" else None
    p = make_probe(wl.klab.scenario, src, f"{dst}:{port}", protocol, http, expect)
    return replace(p, timeout=PASS_TIMEOUT if expect != "dropped" else 0.5)


def assert_root_saw_nothing(wl: WorldLab) -> None:
    with pytest.raises(BlockingIOError):
        conn, peer = wl.root_tcp.accept()
        conn.close()
        pytest.fail(f"a connection from {peer} reached the root namespace")
    with pytest.raises(BlockingIOError):
        data, peer = wl.root_udp.recvfrom(65535)
        pytest.fail(f"a datagram from {peer} reached the root namespace: {data[:60]!r}")


def test_the_machines_own_addresses_are_world_hosts_inside_the_lab(world: WorldLab) -> None:
    """A pod reaches the world hosts that have the machine's addresses and its gateway's: their
    own servers answer (TCP and UDP), the request arrives from the pod's address, and nothing
    arrives in the root namespace; flows from those world hosts reach the pod too."""
    klab, port = world.klab, world.port
    klab.switch(PolicyEngine(make_world_scenario(world)))
    app = klab.scenario.pods["prod/app"].ip
    probes = [probe(world, "prod/app", name, port, proto) for name in world.hosts for proto in ("TCP", "UDP")]
    probes += [probe(world, name, "prod/app", 8080, "TCP") for name in world.hosts]
    out = klab.run(probes)
    assert not out.disagreements() and all(r.passed for r in out.results), \
        [(r.probe.source, str(r.probe.destination), r.observed.outcome, r.observed.detail) for r in out.results if not r.passed]
    for r in out.results:
        if r.probe.protocol == "TCP" and r.probe.source == "prod/app":
            # The world host's own server answered (the runner checks its name), and saw the pod.
            assert r.observed.body["endpoint"] == r.probe.destination.name
            assert r.observed.body["client"].rsplit(":", 1)[0] == app
        elif r.probe.protocol == "UDP":
            assert r.observed.body["endpoint"] == r.probe.destination.name
            assert r.observed.body["client"].rsplit(":", 1)[0] == app
    assert_root_saw_nothing(world)
    assert root_state() == world.before


def test_the_metadata_address_and_10_8_outside_the_pod_cidr(world: WorldLab) -> None:
    """169.254.169.254 and an address of 10.0.0.0/8 outside the pod CIDR are world hosts like
    any other, both ways."""
    world.klab.switch(PolicyEngine(make_world_scenario(world)))
    out = world.klab.run([probe(world, "prod/app", "metadata", 80, path="/latest/meta-data/"),
                          probe(world, "prod/app", "collector", 4317),
                          probe(world, "metadata", "prod/app", 8080), probe(world, "collector", "mon/agent", 4317),
                          probe(world, "collector", "prod/app", 8080, "UDP")])
    assert all(r.passed for r in out.results), out.disagreements()
    meta = out.results[0].observed.body
    assert (meta["endpoint"], meta["path"]) == ("metadata", "/latest/meta-data/")


def test_an_address_no_world_host_has_is_unreachable_from_the_lab(world: WorldLab) -> None:
    """The node routes only to the lab's own endpoints: an address of the machine's network that
    no world host has (and the machine's address on a port its world host does not serve) gets
    nowhere, and nothing reaches the root namespace."""
    klab = world.klab
    klab.switch(PolicyEngine(make_world_scenario(world)))
    networks = [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
                for link in _ip_json("-4", "addr", "show") for a in link.get("addr_info", [])
                if not ipaddress.ip_address(a["local"]).is_loopback]
    declared = {h.address for h in klab.scenario.world.values()} | set(world.machine.addresses + world.machine.gateways)
    # An address of the machine's own network that is neither the machine's nor its gateway's.
    elsewhere = next((str(a) for net in networks for a in list(net.hosts())[:64] if str(a) not in declared),
                     "192.0.2.77")
    app_ns = klab.netns("prod/app")
    for protocol in ("TCP", "UDP"):
        lost = Probe("prod/app", Destination("world", "nowhere", elsewhere, world.port), protocol, "dropped", None, 0.5, HERE)
        observed = asyncio.run(run_probe(lost, app_ns))
        assert observed.outcome == "dropped", (elsewhere, protocol, observed)
    # Routes for world addresses live only in the lab: the node's unicast routes are the /32s of
    # its endpoints (no default route), each through a lab link.
    endpoints = {e.ip for e in klab.lab.record.endpoints.values()}
    links = {e.ifname for e in klab.lab.record.endpoints.values()}
    node_routes = [r for r in json.loads(subprocess.run(["ip", "-n", klab.lab.record.node, "-j", "-4", "route", "show",
                                                         "table", "all"], check=True, capture_output=True,
                                                        text=True).stdout) if r.get("type", "unicast") == "unicast"]
    assert {r["dst"] for r in node_routes} == endpoints
    assert all(r["dev"] in links for r in node_routes)
    assert_root_saw_nothing(world)
    assert root_state() == world.before


INGRESS_CASES = [
    ("from-cidr", cnp("in", "prod", """
        endpointSelector: {matchLabels: {app: app}}
        ingress: [{fromCIDR: [10.0.0.0/8], toPorts: [{ports: [{port: "8080", protocol: TCP}]}]}]
        """), {"office": "allowed", "collector": "allowed", "internet": "dropped", "metadata": "dropped",
               "mon/agent": "dropped"}),
    ("from-cidr-set-except", cnp("in", "prod", """
        endpointSelector: {matchLabels: {app: app}}
        ingress: [{fromCIDRSet: [{cidr: 0.0.0.0/0, except: [10.64.0.0/10]}]}]
        """), {"office": "dropped", "collector": "allowed", "internet": "allowed", "metadata": "allowed",
               "mon/agent": "dropped"}),
    ("from-entities-world", cnp("in", "prod", """
        endpointSelector: {matchLabels: {app: app}}
        ingress: [{fromEntities: [world]}]
        """), {"office": "allowed", "internet": "allowed", "metadata": "allowed", "mon/agent": "dropped"}),
    ("ip-block-except", knp("in", "prod", """
        podSelector: {matchLabels: {app: app}}
        ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.12.0.0/14]}}]}]
        """), {"office": "allowed", "collector": "dropped", "internet": "dropped", "mon/agent": "dropped"}),
]


@pytest.mark.parametrize("name, policy, expected", INGRESS_CASES, ids=[c[0] for c in INGRESS_CASES])
def test_ingress_from_world_hosts_on_the_kernel(world: WorldLab, name: str, policy: str,
                                                expected: dict[str, str]) -> None:
    """Ingress from outside the cluster: each source's probe meets Cilium's answer (hand-written)
    and the kernel agrees with the oracle; CIDR rules never select the pod in 10.0.0.0/8."""
    world.klab.switch(PolicyEngine(make_world_scenario(world, policy)))
    probes = [probe(world, src, "prod/app", 8080, "TCP", expect) for src, expect in expected.items()]
    out = world.klab.run(probes)
    got = {r.probe.source: r.observed.outcome for r in out.results}
    assert got == expected, out.disagreements()
    assert not out.disagreements() and all(r.oracle == r.observed.outcome for r in out.results)


def test_egress_to_cidr_10_8_selects_the_collector_not_the_pod(world: WorldLab) -> None:
    """toCIDR 10.0.0.0/8 reaches the collector outside the cluster and not the agent pod whose
    address lies inside it; 169.254.169.254/32 reaches the metadata host on port 80 only."""
    world.klab.switch(PolicyEngine(make_world_scenario(world, cnp("out", "prod", f"""
        endpointSelector: {{}}
        egress:
          - toCIDR: [{METADATA}/32]
            toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
          - toCIDR: [10.0.0.0/8]
            toPorts: [{{ports: [{{port: "4317", protocol: TCP}}]}}]
        """))))
    out = world.klab.run([probe(world, "prod/app", "collector", 4317), probe(world, "prod/app", "metadata", 80),
                          probe(world, "prod/app", "mon/agent", 4317, expect="dropped"),
                          probe(world, "prod/app", "internet", 443, expect="dropped")])
    assert all(r.passed for r in out.results), out.disagreements()
    assert [r.kernel_verdict for r in out.results] == ["FORWARD", "FORWARD", "DROP", "DROP"]


def test_a_flow_from_a_world_host_is_traced(world: WorldLab) -> None:
    """`run --explain` traces a probe that starts from a world host: its packet enters through
    the world link and the ingress policy of the pod decides it, as the oracle says."""
    from dataplane.tracing import trace_in_lab  # noqa: PLC0415

    world.klab.switch(PolicyEngine(make_world_scenario(world, INGRESS_CASES[0][1])))
    for src, verdict in (("office", "FORWARD"), ("internet", "DROP")):
        data = asyncio.run(trace_in_lab(world.klab.lab, world.klab.engine, probe(world, src, "prod/app", 8080))).to_json()
        assert data["kernel"]["verdict"] == verdict and data["kernel"]["direction"] == "INGRESS", data["kernel"]
        assert data["kernel"]["endpoint"] == "prod/app" and data["disagreements"] == []
        assert data["client"]["ip"] == world.klab.scenario.world[src].address
