"""Verdict latency in the kernel, by BPF_PROG_TEST_RUN, as the policy grows.

Every case runs the real `from_container` program on one packet many times in the kernel
(the kernel times it); cases are measured side by side in one run, interleaved round by round,
and reported as ratios to the smallest policy's established-flow verdict, because absolute
nanoseconds on a shared machine mean little.

    established   a packet of an allowed flow: conntrack hit, no policy lookup
    default-deny  a new flow no entry matches: the four policy lookups, all misses
    explicit-deny a new flow hitting a DENY entry

(The drop cases also reserve a ring-buffer event per packet; at these repeat counts the ring
fills and further events are lost, which costs the same for every size.)
"""

from __future__ import annotations

import statistics

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from dataplane.mapstate import EndpointState, MapState, PolicyEntry, PolicyKey
from dataplane.abi import Direction, PROTO_TCP, Verdict

SIZES = (10, 1_000, 10_000, 100_000)
REPEAT = 20_000
ROUNDS = 5
A, B = "10.200.0.2", "10.200.0.3"
ID_A, ID_B, ID_DENIED = 256, 257, 258


def state_of_size(entries: int) -> MapState:
    """B's ingress holds `entries` allows from other identities, plus what the cases need."""
    policy = {PolicyKey(2, Direction.INGRESS, 100_000 + i, PROTO_TCP, 1 + i % 60_000, 16): PolicyEntry(Verdict.ALLOW, 0, (1,))
              for i in range(entries)}
    policy[PolicyKey(2, Direction.INGRESS, ID_A, PROTO_TCP, 80, 16)] = PolicyEntry(Verdict.ALLOW, 0, (2,))
    policy[PolicyKey(2, Direction.INGRESS, ID_A, PROTO_TCP, 22, 16)] = PolicyEntry(Verdict.DENY, 0, (3,))
    return MapState(
        ipcache={f"{A}/32": ID_A, f"{B}/32": ID_B, "0.0.0.0/0": 2},
        endpoints={1: EndpointState(1, "default/a", A, ID_A, False, False),
                   2: EndpointState(2, "default/b", B, ID_B, True, True)},
        policy=policy)


def packet(dport: int, flags: str) -> bytes:
    return bytes(Ether() / IP(src=A, dst=B) / TCP(sport=40000, dport=dport, flags=flags))


CASES = {"established": packet(80, "A"), "default-deny": packet(81, "S"), "explicit-deny": packet(22, "S")}


@pytest.mark.benchmark(group="verdict-latency")
def test_verdict_latency_as_policy_grows(benchmark, datapath) -> None:  # noqa: ANN001
    ns: dict[tuple[int, str], list[float]] = {}
    for size in SIZES:
        datapath.sync(state_of_size(size))
        datapath.flush_conntrack()
        datapath.test_run("from_container", packet(80, "S"))  # opens the established flow
        for _ in range(ROUNDS):
            for case, pkt in CASES.items():
                ns.setdefault((size, case), []).append(datapath.test_run("from_container", pkt, REPEAT)[2])
            datapath.poll_events()
    # The timed body for pytest-benchmark: the baseline case at the largest size.
    benchmark.pedantic(datapath.test_run, args=("from_container", CASES["established"], REPEAT), rounds=3)
    datapath.sync(MapState())
    base = statistics.median(ns[(SIZES[0], "established")])
    table = {f"{case}@{size}": round(statistics.median(v) / base, 2) for (size, case), v in ns.items()}
    benchmark.extra_info["baseline_ns"] = base
    benchmark.extra_info["ratio_to_established@10"] = table
    print("\nverdict latency, ratio to an established packet with 10 policy entries "
          f"({base:.0f} ns):")
    for key, ratio in table.items():
        print(f"  {key:>22}: {ratio:5.2f}x")
