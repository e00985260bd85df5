"""End to end, between two pods: what L3/L4 enforcement and L7 redirect cost a real client.

One lab of two pods; its server is protected by a CiliumNetworkPolicy with an L3/L4 allow on
port 8081 and an L7 rule (GET /.*) on port 8082, which the datapath redirects to the lab's
proxy. Each round measures every path in the same lab, interleaved so that machine noise falls
on every path alike: first with the programs detached from the pods' veths (the baseline, port
8080), then attached again (8081, 8082). Kinds of measurement:

    request/response  sequential requests on one keep-alive connection (per request)
    connect           a new connection per request (connect, request, response, close)

and the report gives each path's median as a ratio to the baseline's. (The pod servers are
Python: the absolute numbers say more about them than about the datapath; the ratios show what
enforcement adds on the same servers. Two labs compared with each other differ by more than
the programs do, which is why the baseline is the same lab with its programs detached.)
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dataplane import topology
from dataplane.lab import Lab
from dataplane.policy import PolicyEngine
from dataplane.scenario import Scenario, parse_scenario
from dataplane.yamlsource import load_documents

ROUNDS = 9
REQUESTS = 200  # per round, keep-alive
CONNECTS = 50  # per round, one request each

SCENARIO = """\
name: bench
namespaces: [{name: bench}]
pods:
  - {name: client, namespace: bench, labels: {app: client}, ports: [{port: 80}]}
  - {name: server, namespace: bench, labels: {app: server}, ports: [{port: 8080}, {port: 8081}, {port: 8082}]}
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


def _read_response(sock: socket.socket, buf: bytearray) -> None:
    """One response with Content-Length (the pod server's JSON); leftover bytes stay in buf."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a response")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed inside a response")
        rest += data
    if status != 200:
        raise AssertionError(f"status {status}")
    buf[:] = rest[length:]


def _connect(lab: Lab, port: int) -> socket.socket:
    sock = topology.socket_in(lab.record.endpoints["bench/client"].netns)
    sock.setblocking(True)
    sock.settimeout(10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((lab.record.endpoints["bench/server"].ip, port))
    return sock


def keepalive(lab: Lab, port: int) -> float:
    """Seconds per request, REQUESTS requests on one connection."""
    request = b"GET /bench HTTP/1.1\r\nHost: server\r\n\r\n"
    sock, buf = _connect(lab, port), bytearray()
    try:
        started = time.perf_counter()
        for _ in range(REQUESTS):
            sock.sendall(request)
            _read_response(sock, buf)
        return (time.perf_counter() - started) / REQUESTS
    finally:
        sock.close()


def connects(lab: Lab, port: int) -> float:
    """Seconds per new connection with one request."""
    request = b"GET /bench HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
    started = time.perf_counter()
    for _ in range(CONNECTS):
        sock = _connect(lab, port)
        try:
            sock.sendall(request)
            _read_response(sock, bytearray())
        finally:
            sock.close()
    return (time.perf_counter() - started) / CONNECTS


@pytest.mark.benchmark(group="end-to-end")
def test_end_to_end_cost_of_enforcement(benchmark, lab) -> None:  # noqa: ANN001
    paths: dict[str, tuple[bool, int]] = {"no programs": (False, 8080), "L3/L4 allow": (True, 8081),
                                          "L7 redirect": (True, 8082)}
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
    benchmark.extra_info["ratio_to_no_programs"] = table
