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

What per-flow tracing costs (lib/trace.h) is measured the same way, side by side, on the same
packets and a small policy: a datapath compiled with TRACING=0 (no trace point at all), the
default datapath while nothing is traced (each packet reads trace_switch[0] and stops there),
and the default datapath with the packets' flow traced (every step emits an event; the trace ring
fills within a run and later events are lost, a cost each packet still pays). Ratios are to the
TRACING=0 datapath's own case; the DECIDED case is to_container's fast path on a packet that
from_container already decided (the one place tracing adds a map lookup to a path that did none).
"""

from __future__ import annotations

import statistics

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from dataplane.abi import MARK_MAGIC_DECIDED, PROTO_TCP, Direction, Verdict
from dataplane.datapath import Datapath, TraceFlow
from dataplane.mapstate import EndpointState, MapState, PolicyEntry, PolicyKey

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


# (program, packet, skb->mark) of each tracing case
TRACING_CASES = {
    "established": ("from_container", packet(80, "A"), 0),
    "default-deny": ("from_container", packet(81, "S"), 0),
    "explicit-deny": ("from_container", packet(22, "S"), 0),
    "decided": ("to_container", packet(80, "A"), MARK_MAGIC_DECIDED),
}
TRACED = [TraceFlow(A, B, 0, port, PROTO_TCP) for port in (80, 81, 22)]
VARIANTS = ("compiled-out", "off", "traced")
TRACING_ROUNDS = 15


def _run_case(dp: Datapath, case: str) -> int:
    prog, pkt, mark = TRACING_CASES[case]
    return dp.test_run_full(prog, pkt, REPEAT, mark=mark).duration_ns


@pytest.mark.benchmark(group="verdict-latency-tracing")
def test_verdict_latency_with_tracing_compiled_out_off_and_on(benchmark, datapath) -> None:  # noqa: ANN001
    ns: dict[tuple[str, str], list[float]] = {}
    with Datapath(tracing=False) as compiled_out:
        for dp in (compiled_out, datapath):
            dp.sync(state_of_size(SIZES[0]))
            dp.flush_conntrack()
            dp.test_run("from_container", packet(80, "S"))  # opens the established flow
        def measure(variant: str, case: str) -> None:
            if variant == "traced":
                datapath.trace_start(1, TRACED)
            try:
                dp = compiled_out if variant == "compiled-out" else datapath
                ns.setdefault((variant, case), []).append(_run_case(dp, case))
            finally:
                datapath.trace_stop(1)

        try:
            for round_ in range(TRACING_ROUNDS):
                # each round starts with another variant, so that none is always measured first
                order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]
                for case in TRACING_CASES:
                    for variant in order:
                        measure(variant, case)
                compiled_out.poll_events()
                datapath.poll_events()
                datapath.poll_traces()
            # The timed body for pytest-benchmark: the fast path with tracing compiled in and off.
            benchmark.pedantic(_run_case, args=(datapath, "established"), rounds=3)
        finally:
            datapath.sync(MapState())
            compiled_out.sync(MapState())
    table = {f"{variant}/{case}": round(statistics.median(ns[(variant, case)])
                                        / statistics.median(ns[("compiled-out", case)]), 2)
             for case in TRACING_CASES for variant in VARIANTS}
    benchmark.extra_info["ns_compiled_out"] = {case: statistics.median(ns[("compiled-out", case)])
                                               for case in TRACING_CASES}
    benchmark.extra_info["ratio_to_compiled_out"] = table
    print("\nverdict latency with tracing, ratio to the same case compiled with TRACING=0:")
    for case in TRACING_CASES:
        base = statistics.median(ns[("compiled-out", case)])
        print(f"  {case:>14} ({base:4.0f} ns): " + "  ".join(f"{v} {table[f'{v}/{case}']:5.2f}x" for v in VARIANTS))
