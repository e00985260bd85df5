"""End to end, between two pods: what L3/L4 enforcement and L7 redirect cost a real client.

One lab of two pods; its server is protected by a CiliumNetworkPolicy with an L3/L4 allow on
port 8081 and an L7 rule (GET /.*) on port 8082, which the datapath redirects to the lab's
proxy. Each round measures every path in the same lab, interleaved so that machine noise falls
on every path alike: first with the programs detached from the pods' veths (the baseline, port
8080), then attached again (8081, 8082). Kinds of measurement:

    request/response  sequential requests on one keep-alive connection (per request)
    connect           a new connection per request (connect, request, response, close)

and the report gives each path's median as a ratio to the baseline's. Where the tools are
installed (`scripts/bench.sh` installs them), two references join: HAProxy in the server's
namespace doing the same method/path ACL as the L7 rule, and, for new connections as the policy
grows, an iptables chain of the same size in the node namespace, built the way iptables-based
policy engines build it (conntrack ESTABLISHED first, then one rule per allowed peer and port). (The pod servers are
Python: the absolute numbers say more about them than about the datapath; the ratios show what
enforcement adds on the same servers. Two labs compared with each other differ by more than
the programs do, which is why the baseline is the same lab with its programs detached.)
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dataplane import topology
from dataplane.lab import Lab
from dataplane.mapstate import MapState, PolicyEntry, PolicyKey
from dataplane.abi import Direction, PROTO_TCP, Verdict
from dataplane.policy import PolicyEngine
from dataplane.scenario import Scenario, parse_scenario
from dataplane.yamlsource import load_documents
from tests.support.l7_lab import PodClient

ROUNDS = 9
SIZES = (10, 1_000, 10_000)  # policy entries / iptables rules, for new connections
HAPROXY_PORT = 8090  # in the server's namespace, in front of its 8080
REQUESTS = 200  # per round, keep-alive
CONNECTS = 50  # per round, one request each

SCENARIO = """\
name: bench
namespaces: [{name: bench}]
pods:
  - {name: client, namespace: bench, labels: {app: client}, ports: [{port: 80}]}
  - {name: server, namespace: bench, labels: {app: server}, ports: [{port: 8080}, {port: 8081}, {port: 8082}, {port: 8083}]}
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server, namespace: bench}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
            - ports: [{port: "8081", protocol: TCP}]
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
            - ports: [{port: "8082", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/.*"}]
"""


def scenario(name: str) -> Scenario:
    (doc,) = load_documents(SCENARIO, "bench.yaml")
    return parse_scenario(doc, Path("bench.yaml")).with_name(name)


@pytest.fixture(scope="module")
def lab(datapath) -> Iterator[Lab]:  # noqa: ANN001 - session fixture
    sc = scenario("bench-e2e")
    lab = Lab(sc, datapath=datapath, policy=PolicyEngine(sc))
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def set_programs(lab: Lab, attached: bool) -> None:
    """Attach the datapath's programs to every pod veth, or take them off (the baseline)."""
    for ep in lab.record.endpoints.values():
        if attached:
            topology.attach_tc(lab.record.node, ep.ifname, ingress_fd=lab.datapath.program_fd("from_container"),
                               egress_fd=lab.datapath.program_fd("to_container"), name=f"l7lab-{lab.name}")
        else:
            topology.detach_tc(lab.record.node, ep.ifname)


def _connect(lab: Lab, port: int) -> PodClient:
    """A raw HTTP client in the client pod's namespace (the L7 tests' own client and parser)."""
    return PodClient(lab.record.endpoints["bench/client"].netns, (lab.record.endpoints["bench/server"].ip, port),
                     timeout=10, connect_timeout=10)


def _exchange(client: PodClient, request: bytes) -> None:
    client.send(request)
    status = client.read_response().status
    if status != 200:
        raise AssertionError(f"status {status}")


def keepalive(lab: Lab, port: int) -> float:
    """Seconds per request, REQUESTS requests on one connection."""
    request = b"GET /bench HTTP/1.1\r\nHost: server\r\n\r\n"
    with _connect(lab, port) as client:
        started = time.perf_counter()
        for _ in range(REQUESTS):
            _exchange(client, request)
        return (time.perf_counter() - started) / REQUESTS


def connects(lab: Lab, port: int) -> float:
    """Seconds per new connection with one request."""
    request = b"GET /bench HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
    started = time.perf_counter()
    for _ in range(CONNECTS):
        with _connect(lab, port) as client:
            _exchange(client, request)
    return (time.perf_counter() - started) / CONNECTS


HAPROXY_CONFIG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind {ip}:{port}
    acl allowed_method method GET
    acl allowed_path path_reg ^/.*$
    http-request deny deny_status 403 unless allowed_method allowed_path
    default_backend server
backend server
    http-reuse always
    server local 127.0.0.1:8080
"""


@pytest.fixture(scope="module")
def haproxy(lab: Lab) -> Iterator[int | None]:
    """HAProxy in the server pod's namespace with the L7 rule as an ACL; None if not installed."""
    binary = shutil.which("haproxy")
    if binary is None:
        yield None
        return
    server = lab.record.endpoints["bench/server"]
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg:
        cfg.write(HAPROXY_CONFIG.format(ip=server.ip, port=HAPROXY_PORT))
    proc = subprocess.Popen(["ip", "netns", "exec", server.netns, binary, "-db", "-f", cfg.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until it listens (asked from the server's own namespace: no policy)
            probe = topology.socket_in(server.netns)
            try:
                probe.setblocking(True)
                probe.settimeout(1)
                probe.connect((server.ip, HAPROXY_PORT))
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
            finally:
                probe.close()
        yield HAPROXY_PORT
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        Path(cfg.name).unlink()


@pytest.mark.benchmark(group="end-to-end")
def test_end_to_end_cost_of_enforcement(benchmark, lab, haproxy) -> None:  # noqa: ANN001
    paths: dict[str, tuple[bool, int]] = {"no programs": (False, 8080), "L3/L4 allow": (True, 8081),
                                          "L7 redirect": (True, 8082)}
    if haproxy is not None:
        paths["HAProxy ACL"] = (False, haproxy)
    kinds: dict[str, Callable[[Lab, int], float]] = {"request/response": keepalive, "connect": connects}
    seconds: dict[tuple[str, str], list[float]] = {}
    try:
        for round_ in range(ROUNDS + 1):  # round 0 warms every path up and is not counted
            for attached in (False, True):
                set_programs(lab, attached)
                for kind, measure in kinds.items():
                    for path, (with_programs, port) in paths.items():
                        if with_programs == attached:
                            took = measure(lab, port)
                            if round_:
                                seconds.setdefault((kind, path), []).append(took)
    finally:
        set_programs(lab, True)
    benchmark.pedantic(keepalive, args=(lab, paths["L7 redirect"][1]), rounds=3)  # pytest-benchmark's own timing
    table: dict[str, float] = {}
    print("\nend to end between two pods, median per operation and ratio to no programs:")
    for kind in kinds:
        base = statistics.median(seconds[(kind, "no programs")])
        for path in paths:
            median = statistics.median(seconds[(kind, path)])
            table[f"{kind} {path}"] = round(median / base, 2)
            print(f"  {kind:>16} {path:<12} {median * 1e6:9.0f} us  {median / base:5.2f}x")
    if haproxy is None:
        print("  (HAProxy is not installed: scripts/bench.sh installs it)")
    benchmark.extra_info["ratio_to_no_programs"] = table


# --------------------------------------------------------------------------- policy size


def grown(state: MapState, server_endpoint: int, entries: int) -> MapState:
    """The lab's own state plus `entries` allows on the server's ingress for other identities."""
    policy = dict(state.policy)
    for i in range(entries):
        policy[PolicyKey(server_endpoint, Direction.INGRESS, 100_000 + i, PROTO_TCP, 1 + i % 60_000, 16)] = \
            PolicyEntry(Verdict.ALLOW, 0, ())
    return dataclasses.replace(state, policy=policy)


def iptables_rules(client_ip: str, server_ip: str, rules: int) -> str:
    """iptables-restore input: conntrack first, then `rules` per-peer allows for port 8083, the
    client's last (the worst case a linear chain has), then drop."""
    lines = ["*filter", ":L7LAB-BENCH - [0:0]",
             "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
             f"-A FORWARD -d {server_ip}/32 -p tcp --dport 8083 -j L7LAB-BENCH"]
    lines += [f"-A L7LAB-BENCH -s 10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32 -p tcp --dport 8083 -j ACCEPT"
              for i in range(rules - 1)]
    lines += [f"-A L7LAB-BENCH -s {client_ip}/32 -p tcp --dport 8083 -j ACCEPT", "-A L7LAB-BENCH -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def node_iptables(lab: Lab, restore_input: str | None) -> None:
    """Load rules into the node namespace's filter table (None: empty it). Only the lab's own
    namespace is touched."""
    node = lab.record.node
    text = restore_input if restore_input is not None else "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
    subprocess.run(["ip", "netns", "exec", node, "iptables-restore"], input=text, text=True, check=True)


@pytest.mark.benchmark(group="end-to-end")
def test_new_connections_as_the_policy_grows(benchmark, lab) -> None:  # noqa: ANN001
    """Connect + one request, at each size: BPF (the L3/L4 allow, in a policy map of that many
    entries) and, if installed, iptables (a chain of that many rules), each as a ratio to the
    same lab with no programs and no rules."""
    has_iptables = shutil.which("iptables-restore") is not None
    client, server = lab.record.endpoints["bench/client"], lab.record.endpoints["bench/server"]
    base_state = lab.policy.map_state()
    server_ep = next(i for i, ep in base_state.endpoints.items() if ep.name == "bench/server")
    seconds: dict[tuple[int, str], list[float]] = {}
    try:
        for size in SIZES:
            lab.sync_policy(grown(base_state, server_ep, size))
            rules = iptables_rules(client.ip, server.ip, size) if has_iptables else None
            for round_ in range(ROUNDS + 1):
                measured: dict[str, float] = {}
                set_programs(lab, False)
                measured["no programs"] = connects(lab, 8080)
                if rules is not None:
                    node_iptables(lab, rules)
                    measured["iptables"] = connects(lab, 8083)
                    node_iptables(lab, None)
                set_programs(lab, True)
                measured["BPF"] = connects(lab, 8081)
                if round_:
                    for path, took in measured.items():
                        seconds.setdefault((size, path), []).append(took)
    finally:
        set_programs(lab, True)
        lab.sync_policy(base_state)
        if has_iptables:
            node_iptables(lab, None)
    benchmark.pedantic(connects, args=(lab, 8081), rounds=3)
    table: dict[str, float] = {}
    print("\nnew connections (connect + one request) as the policy grows, ratio to no programs and no rules:")
    for size in SIZES:
        base = statistics.median(seconds[(size, "no programs")])
        for path in ("BPF", "iptables"):
            if (size, path) in seconds:
                median = statistics.median(seconds[(size, path)])
                table[f"{path}@{size}"] = round(median / base, 2)
                print(f"  {path:>8} {size:>6} entries {median * 1e6:9.0f} us  {median / base:5.2f}x")
    if not has_iptables:
        print("  (iptables is not installed: scripts/bench.sh installs it)")
    benchmark.extra_info["ratio_to_no_programs"] = table
