"""The datapath's trace points on real traffic: a traced flow's packets report each step the
programs took, in order, with the values they used; untraced flows report nothing; a stopped
trace reports nothing more; every event points at the source line that emitted it.

Real connections between the pods of the L7 lab (tests/support/l7_lab.py: frontend may reach
backend:9090 at L3/L4 and backend:8080 through the L7 proxy, stranger nothing). Cases real
traffic cannot reach on demand (node traffic denied, audit, spoofing, a missing proxy socket)
run the programs on test packets (BPF_PROG_TEST_RUN, tests/support/prog_run.py).

The ring buffer is read with `poll_traces`, which consumes what the programs already wrote: a
packet's events are in the buffer once the program that handled it returned, so once a client
has its answer the events of the packets that produced it are there to read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from dataplane.abi import (CT_F_FROM_PROXY, MARK_MAGIC_DECIDED, MARK_MAGIC_FROM_PROXY, MARK_MAGIC_TO_PROXY, PROTO_TCP,
                           PROXY_PORT, TCPF_ACK, TCPF_SYN, CtResult, Direction, DropReason, FlowVerdict, Hook,
                           IdentityOrigin, TracePoint, TraceSide, TraceSocket, Verdict, from_proxy_mark,
                           identity_of_mark)
from dataplane.bpfsource import BPF_DIR
from dataplane.datapath import Datapath, TraceEvent, TraceFlow
from dataplane.errors import SetupError
from tests.conftest import unique_lab
from tests.support import prog_run as pr
from tests.support.http import request_bytes
from tests.support.l7_lab import (CONNECT_DROP_TIMEOUT, L7_PORT, PLAIN_PORT, L7Lab, backend_json, close_l7_lab,
                                  open_l7_lab)

pytestmark = pytest.mark.kernel

TC_ACT_OK, TC_ACT_SHOT = 0, 2
P = TracePoint
_ids = itertools.count(0x13A000)


@pytest.fixture(scope="module")
def l7(datapath) -> Iterator[L7Lab]:  # noqa: ANN001 - session fixture
    lab = open_l7_lab(datapath, unique_lab("atr"))
    try:
        yield lab
    finally:
        close_l7_lab(lab)


@contextmanager
def tracing(dp: Datapath, flows: list[TraceFlow]) -> Iterator[int]:
    """A trace of `flows` under a fresh id, stopped whatever happens; pending events dropped first."""
    trace_id = next(_ids)
    dp.poll_traces()
    dp.trace_start(trace_id, flows)
    try:
        yield trace_id
    finally:
        dp.trace_stop(trace_id)
    assert trace_id not in dp.traced_flows()


# -- reading events ---------------------------------------------------------------------------
def runs(events: list[TraceEvent]) -> list[list[TraceEvent]]:
    """The events grouped by program run (packet_id), runs in the order they began."""
    by_packet: dict[int, list[TraceEvent]] = {}
    for e in events:
        by_packet.setdefault(e.packet_id, []).append(e)
    return sorted(by_packet.values(), key=lambda run: run[0].ts_ns)


def points(run: list[TraceEvent]) -> list[TracePoint]:
    return [e.point for e in run]


def one(run: list[TraceEvent], point: TracePoint) -> TraceEvent:
    found = [e for e in run if e.point == point]
    assert len(found) == 1, f"{point.name} {len(found)} times in {points(run)}"
    return found[0]


def first_run(all_runs: list[list[TraceEvent]], hook: Hook, src: str, flags: int) -> list[TraceEvent]:
    """The first run of `hook` for a packet from `src` with exactly TCP flags `flags`."""
    for run in all_runs:
        e = run[0]
        if e.hook == hook and e.src == src and e.tcp_flags == flags:
            return run
    raise AssertionError(f"no {hook.name} run of a packet from {src} with flags {flags:#x} in "
                         f"{[(r[0].hook.name, r[0].src, hex(r[0].tcp_flags), points(r)) for r in all_runs]}")


def decision(e: TraceEvent) -> tuple[FlowVerdict, DropReason, Direction, bool]:
    """A0 of POLICY_DECISION / DECISION: verdict, reason, direction, enforced."""
    a0 = e.args[0]
    return FlowVerdict(a0 & 0xFF), DropReason((a0 >> 8) & 0xFF), Direction((a0 >> 16) & 0xFF), bool(a0 >> 24)


def new_flow_points(directions: int) -> list[TracePoint]:
    """What from_container reports for a new flow up to its decision (both ends local: 2 directions)."""
    policy = ([P.POLICY_LOOKUP] * 4 + [P.POLICY_DECISION]) * directions
    return [P.HOOK, P.PARSE, P.SPOOF_CHECK, P.CONNTRACK, P.IDENTITY, P.IDENTITY, *policy, P.DECISION]


def assert_points_at_their_lines(events: list[TraceEvent]) -> None:
    """Every event's line holds a TRACE() call naming its point in one of the bpf sources."""
    sources = [*BPF_DIR.glob("*.c"), *(BPF_DIR / "lib").glob("*.h")]
    texts = {path.name: path.read_text().splitlines() for path in sources}
    for e in events:
        token = f"TRACE_{e.point.name}"
        holders = [name for name, lines in texts.items() if 0 < e.line <= len(lines)
                   and "TRACE(" in lines[e.line - 1] and f"{token}," in lines[e.line - 1]]
        assert len(holders) == 1, f"{e.point.name} at line {e.line}: emitted by {holders or 'no source'}"


def assert_lookups(run: list[TraceEvent], endpoint_id: int, direction: Direction, identity: int, port: int) -> None:
    """The four policy lookups of one direction, with their keys, in order."""
    lookups = [e for e in run if e.point == P.POLICY_LOOKUP and (e.args[0] >> 16) & 0xFF == direction]
    assert [(e.args[0] & 0xFFFF, e.args[0] >> 24) for e in lookups] == [(endpoint_id, step) for step in (1, 2, 3, 4)]
    assert [e.args[1] for e in lookups] == [identity, identity, 0, 0]
    assert [e.args[2] for e in lookups] == [PROTO_TCP | port << 16, 0, PROTO_TCP | port << 16, 0]


# -- real traffic -----------------------------------------------------------------------------
def test_an_allowed_connection_reports_its_new_flow_then_its_reply(l7: L7Lab) -> None:
    dp = l7.datapath
    fe, be = l7.ip("shop/frontend"), l7.ip("shop/backend")
    with tracing(dp, [TraceFlow(fe, be, 0, PLAIN_PORT, PROTO_TCP)]) as trace_id:
        with l7.client(port=PLAIN_PORT) as c:
            c.send(request_bytes("GET", "/traced"))
            backend_json(c.read_response())
        events = dp.poll_traces()
    assert events and {e.trace_id for e in events} == {trace_id}
    assert {(e.src, e.dst) for e in events} <= {(fe, be), (be, fe)}
    all_runs = runs(events)

    syn = first_run(all_runs, Hook.FROM_CONTAINER, fe, TCPF_SYN)
    assert points(syn) == [*new_flow_points(2), P.CT_CREATE, P.RESULT]
    fe_ep, be_ep = l7.lab.record.endpoints["shop/frontend"], l7.lab.record.endpoints["shop/backend"]
    fe_id, be_id = l7.identity("shop/frontend"), l7.identity("shop/backend")
    state = l7.engine.map_state()
    ep_ids = {e.name: e.endpoint_id for e in state.endpoints.values()}
    assert one(syn, P.HOOK).args[1] > 0 and one(syn, P.PARSE).args[:2] == (0, PLAIN_PORT)
    assert one(syn, P.SPOOF_CHECK).args[:2] == (ep_ids["shop/frontend"], 1)
    assert one(syn, P.CONNTRACK).args[0] == CtResult.NEW
    src_id, dst_id = [e.args[:4] for e in syn if e.point == P.IDENTITY]
    assert src_id == (TraceSide.SOURCE, fe_id, IdentityOrigin.ENDPOINT, ep_ids["shop/frontend"])
    assert dst_id == (TraceSide.DESTINATION, be_id, IdentityOrigin.ENDPOINT, ep_ids["shop/backend"])
    assert_lookups(syn, ep_ids["shop/frontend"], Direction.EGRESS, be_id, PLAIN_PORT)
    assert_lookups(syn, ep_ids["shop/backend"], Direction.INGRESS, fe_id, PLAIN_PORT)
    # the backend's ingress found the allow (lookup 1: frontend's identity, TCP, 9090)
    hit = [e for e in syn if e.point == P.POLICY_LOOKUP and e.args[0] >> 24 == 1
           and (e.args[0] >> 16) & 0xFF == Direction.INGRESS]
    assert hit[0].args[3] & 0xFF == Verdict.ALLOW and hit[0].args[4] != 0
    ingress = [e for e in syn if e.point == P.POLICY_DECISION][1]
    assert decision(ingress) == (FlowVerdict.FORWARD, DropReason.NONE, Direction.INGRESS, True)
    assert decision(one(syn, P.DECISION))[:3] == (FlowVerdict.FORWARD, DropReason.NONE, Direction.INGRESS)
    assert one(syn, P.DECISION).args[2] == hit[0].args[4]  # the rule that allowed it
    assert one(syn, P.CT_CREATE).args[:3] == (fe_id, hit[0].args[4], 0)
    assert one(syn, P.RESULT).args[:4] == (TC_ACT_OK, FlowVerdict.FORWARD, DropReason.NONE, MARK_MAGIC_DECIDED)
    assert syn[0].ifindex == fe_ep.ifindex  # the frontend's veth, node side

    # the SYN enters the backend on its DECIDED mark; the SYN-ACK is a conntrack reply
    syn_in = first_run(all_runs, Hook.TO_CONTAINER, fe, TCPF_SYN)
    assert points(syn_in) == [P.HOOK, P.MARK_PASS, P.RESULT]
    assert one(syn_in, P.MARK_PASS).args[0] & 0xF00 == MARK_MAGIC_DECIDED
    synack = first_run(all_runs, Hook.FROM_CONTAINER, be, TCPF_SYN | TCPF_ACK)
    assert points(synack) == [P.HOOK, P.PARSE, P.SPOOF_CHECK, P.CONNTRACK, P.RESULT]
    assert one(synack, P.CONNTRACK).args == (CtResult.REPLY, 0, 0, fe_id, hit[0].args[4])
    assert one(synack, P.RESULT).args[:4] == (TC_ACT_OK, FlowVerdict.FORWARD, DropReason.NONE, MARK_MAGIC_DECIDED)
    assert syn_in[0].ifindex == be_ep.ifindex and synack[0].ifindex == be_ep.ifindex
    assert syn[0].packet_id != synack[0].packet_id
    assert_points_at_their_lines(events)


def test_a_policy_drop_reports_the_decision_and_the_shot(l7: L7Lab) -> None:
    dp = l7.datapath
    st, be = l7.ip("shop/stranger"), l7.ip("shop/backend")
    with tracing(dp, [TraceFlow(st, be, 0, PLAIN_PORT, PROTO_TCP)]):
        with pytest.raises(TimeoutError):
            l7.client(src="shop/stranger", port=PLAIN_PORT, connect_timeout=CONNECT_DROP_TIMEOUT)
        events = dp.poll_traces()
    all_runs = runs(events)
    syn = first_run(all_runs, Hook.FROM_CONTAINER, st, TCPF_SYN)
    assert points(syn) == [*new_flow_points(2), P.RESULT]  # no conntrack entry for a drop
    assert decision(one(syn, P.DECISION)) == (FlowVerdict.DROP, DropReason.POLICY_DENIED, Direction.INGRESS, True)
    backend = [e for e in syn if e.point == P.POLICY_LOOKUP and (e.args[0] >> 16) & 0xFF == Direction.INGRESS]
    assert [e.args[3] for e in backend] == [Verdict.NONE] * 4  # four misses: default deny
    assert one(syn, P.RESULT).args[:3] == (TC_ACT_SHOT, FlowVerdict.DROP, DropReason.POLICY_DENIED)
    # nothing reached the backend: no run of the backend's hook, no reply
    assert all(r[0].hook == Hook.FROM_CONTAINER and r[0].src == st for r in all_runs)
    assert_points_at_their_lines(events)


def test_a_redirect_reports_the_proxy_socket_and_the_upstream_identity(l7: L7Lab) -> None:
    dp = l7.datapath
    fe, be = l7.ip("shop/frontend"), l7.ip("shop/backend")
    node = l7.lab.scenario.node_ip
    fe_id = l7.identity("shop/frontend")
    flows = [TraceFlow(fe, be, 0, L7_PORT, PROTO_TCP), TraceFlow(node, be, 0, L7_PORT, PROTO_TCP)]
    with tracing(dp, flows) as trace_id:
        with l7.client(port=L7_PORT) as c, l7.client(port=PLAIN_PORT) as beside:
            c.send(request_bytes("GET", "/public/traced"))
            beside.send(request_bytes("GET", "/untraced"))  # an untraced flow at the same time
            backend_json(c.read_response())
            backend_json(beside.read_response())
        events = dp.poll_traces()
    assert {e.trace_id for e in events} == {trace_id}
    assert all(PLAIN_PORT not in (e.sport, e.dport) for e in events), "an untraced flow was traced"
    all_runs = runs(events)

    mark = MARK_MAGIC_TO_PROXY | PROXY_PORT << 16
    syn = first_run(all_runs, Hook.FROM_CONTAINER, fe, TCPF_SYN)
    assert points(syn) == [*new_flow_points(2), P.PROXY_ASSIGN, P.CT_CREATE, P.RESULT]
    verdict, _, direction, _ = decision(one(syn, P.DECISION))
    assert (verdict, direction, one(syn, P.DECISION).args[3]) == (FlowVerdict.REDIRECT, Direction.INGRESS, PROXY_PORT)
    assert one(syn, P.PROXY_ASSIGN).args[:4] == (DropReason.NONE, TraceSocket.LISTENER, mark, PROXY_PORT)
    assert one(syn, P.CT_CREATE).args[2] == PROXY_PORT
    assert one(syn, P.RESULT).args[:4] == (TC_ACT_OK, FlowVerdict.REDIRECT, DropReason.NONE, mark)

    # the client's next packets belong to the proxy's accepted socket of this flow
    est = [r for r in all_runs if r[0].hook == Hook.FROM_CONTAINER and r[0].src == fe and r[0].tcp_flags & TCPF_ACK
           and P.CONNTRACK in points(r) and one(r, P.CONNTRACK).args[0] == CtResult.ESTABLISHED]
    assert est, "no established packet of the redirected flow was traced"
    for run in est:
        assert points(run) == [P.HOOK, P.PARSE, P.SPOOF_CHECK, P.CONNTRACK, P.PROXY_ASSIGN, P.RESULT]
        assert one(run, P.CONNTRACK).args[1] == PROXY_PORT
        assert one(run, P.PROXY_ASSIGN).args[:3] == (DropReason.NONE, TraceSocket.FLOW, mark)

    # the proxy's upstream connection enters the backend with the client's identity in its mark
    up = first_run(all_runs, Hook.TO_CONTAINER, node, TCPF_SYN)
    assert points(up) == [P.HOOK, P.PARSE, P.FROM_PROXY, P.CONNTRACK, P.CT_CREATE, P.RESULT]
    identity, up_mark = one(up, P.FROM_PROXY).args[:2]
    assert identity == fe_id and up_mark & 0xF00 == MARK_MAGIC_FROM_PROXY and identity_of_mark(up_mark) == fe_id
    assert up_mark == from_proxy_mark(fe_id)
    assert one(up, P.CONNTRACK).args[0] == CtResult.NEW
    assert one(up, P.CT_CREATE).args[0] == fe_id and one(up, P.CT_CREATE).args[3] & CT_F_FROM_PROXY
    assert one(up, P.RESULT).args[:3] == (TC_ACT_OK, FlowVerdict.FORWARD, DropReason.NONE)
    # ... and the backend's answer to the proxy is that connection's reply
    reply = first_run(all_runs, Hook.FROM_CONTAINER, be, TCPF_SYN | TCPF_ACK)
    assert reply[0].dst in (node, fe)
    assert one(reply, P.CONNTRACK).args[0] == CtResult.REPLY
    assert_points_at_their_lines(events)


def test_a_stopped_trace_reports_nothing_more(l7: L7Lab) -> None:
    dp = l7.datapath
    fe, be = l7.ip("shop/frontend"), l7.ip("shop/backend")
    with tracing(dp, [TraceFlow(fe, be, 0, PLAIN_PORT, PROTO_TCP)]):
        with l7.client(port=PLAIN_PORT) as c:
            c.send(request_bytes("GET", "/while-traced"))
            backend_json(c.read_response())
        assert dp.poll_traces(), "the traced connection reported nothing"
    # stopped: the same flow, its replies and its proxy twin report nothing
    with l7.client(port=PLAIN_PORT) as c, l7.client(port=L7_PORT) as p:
        c.send(request_bytes("GET", "/after"))
        p.send(request_bytes("GET", "/public/after"))
        backend_json(c.read_response())
        backend_json(p.read_response())
    assert dp.poll_traces() == []
    assert dp.traced_flows() == {}


# -- test packets (BPF_PROG_TEST_RUN) ---------------------------------------------------------
@pytest.fixture
def traced_dp(dp: Datapath) -> Iterator[Datapath]:
    """The session's datapath with prog_run's three endpoints; emptied afterwards."""
    dp.sync(pr.base_state())
    try:
        yield dp
    finally:
        dp.sync(pr.MapState())
        dp.flush_conntrack()
        dp.poll_events()
        dp.poll_traces()


def test_node_traffic_reports_the_host_identity_and_its_policy(traced_dp: Datapath) -> None:
    dp = traced_dp
    with tracing(dp, [TraceFlow(pr.NODE, pr.A, 0, 80, PROTO_TCP)]):
        r = dp.test_run_full("to_container", pr.packet(pr.NODE, pr.A, PROTO_TCP, 80))
        (run,) = runs(dp.poll_traces())
    assert r.retval == TC_ACT_SHOT  # A admits nothing from the node
    assert points(run) == [P.HOOK, P.PARSE, P.CONNTRACK, P.IDENTITY, P.IDENTITY, *[P.POLICY_LOOKUP] * 4,
                           P.POLICY_DECISION, P.DECISION, P.RESULT]
    src, dst = [e.args[:4] for e in run if e.point == P.IDENTITY]
    assert src == (TraceSide.SOURCE, 1, IdentityOrigin.NODE, 0)
    assert dst == (TraceSide.DESTINATION, pr.ID_A, IdentityOrigin.ENDPOINT, 1)
    assert decision(one(run, P.DECISION)) == (FlowVerdict.DROP, DropReason.POLICY_DENIED, Direction.INGRESS, True)
    assert one(run, P.RESULT).args[:3] == (TC_ACT_SHOT, FlowVerdict.DROP, DropReason.POLICY_DENIED)
    assert run[0].hook == Hook.TO_CONTAINER
    assert_points_at_their_lines(run)


def test_a_decided_packet_is_parsed_only_for_a_traced_flow(traced_dp: Datapath) -> None:
    dp = traced_dp
    pkt = pr.packet(pr.A, pr.B, PROTO_TCP, 80)
    with tracing(dp, [TraceFlow(pr.A, pr.B, 40000, 80, PROTO_TCP)]):
        r = dp.test_run_full("to_container", pkt, mark=MARK_MAGIC_DECIDED)
        (run,) = runs(dp.poll_traces())
        other = dp.test_run_full("to_container", pr.packet(pr.A, pr.B, PROTO_TCP, 80, sport=40001),
                                 mark=MARK_MAGIC_DECIDED)
        assert dp.poll_traces() == []  # exact source port: another port is not traced
    assert (r.retval, other.retval) == (TC_ACT_OK, TC_ACT_OK)
    assert points(run) == [P.HOOK, P.MARK_PASS, P.RESULT]
    assert one(run, P.HOOK).args[0] == MARK_MAGIC_DECIDED and one(run, P.MARK_PASS).args[0] == MARK_MAGIC_DECIDED
    assert (run[0].src, run[0].dst, run[0].sport, run[0].dport) == (pr.A, pr.B, 40000, 80)
    assert_points_at_their_lines(run)


def test_audit_spoofing_and_a_missing_proxy_are_reported(traced_dp: Datapath, dp_audit: Datapath) -> None:
    dp = traced_dp
    # a spoofed source: the interface is bound to A, the packet claims C
    dp.sync(pr.base_state(), interfaces={7: 1})
    with tracing(dp, [TraceFlow(pr.C, pr.B, 0, 80, PROTO_TCP)]):
        r = dp.test_run_full("from_container", pr.packet(pr.C, pr.B, PROTO_TCP, 80), ingress_ifindex=7)
        (run,) = runs(dp.poll_traces())
    dp.sync(pr.base_state(), interfaces={})
    assert r.retval == TC_ACT_SHOT
    assert points(run) == [P.HOOK, P.PARSE, P.SPOOF_CHECK, P.RESULT]
    assert one(run, P.SPOOF_CHECK).args[:2] == (1, 0)
    assert one(run, P.RESULT).args[:3] == (TC_ACT_SHOT, FlowVerdict.DROP, DropReason.SOURCE_SPOOFED)

    # REDIRECT with no proxy listener in this namespace: fail closed, said by PROXY_ASSIGN
    dp.sync(pr.redirect_state())
    with tracing(dp, [TraceFlow(pr.A, pr.B, 0, 80, PROTO_TCP)]):
        r = dp.test_run_full("from_container", pr.packet(pr.A, pr.B, PROTO_TCP, 80))
        (run,) = runs(dp.poll_traces())
    assert r.retval == TC_ACT_SHOT
    assert one(run, P.PROXY_ASSIGN).args[:2] == (DropReason.PROXY_SOCKET_MISSING, TraceSocket.NONE)
    assert one(run, P.RESULT).args[:3] == (TC_ACT_SHOT, FlowVerdict.DROP, DropReason.PROXY_SOCKET_MISSING)
    assert P.CT_CREATE not in points(run)

    # audit mode: the would-be drop passes, the decision says audit turned it
    dp_audit.sync(pr.base_state())
    try:
        with tracing(dp_audit, [TraceFlow(pr.A, pr.B, 0, 81, PROTO_TCP)]):
            r = dp_audit.test_run_full("from_container", pr.packet(pr.A, pr.B, PROTO_TCP, 81))
            (run,) = runs(dp_audit.poll_traces())
    finally:
        dp_audit.sync(pr.MapState())
        dp_audit.flush_conntrack()
    assert r.retval == TC_ACT_OK
    eg = [e for e in run if e.point == P.POLICY_DECISION][0]
    assert decision(eg) == (FlowVerdict.AUDIT, DropReason.POLICY_DENIED, Direction.EGRESS, True) and eg.args[4] == 1
    assert one(run, P.DECISION).args[4] == 1
    assert one(run, P.RESULT).args[:3] == (TC_ACT_OK, FlowVerdict.AUDIT, DropReason.POLICY_DENIED)


def test_trace_start_is_all_or_nothing(dp: Datapath) -> None:
    size = dp.map_max_entries("trace_flows")
    first, second = next(_ids), next(_ids)
    flows = [TraceFlow(pr.A, pr.B, 0, port, PROTO_TCP) for port in range(1, size + 2)]
    try:
        with pytest.raises(SetupError, match="TRACE_MAP_SIZE"):
            dp.trace_start(first, flows)
        assert dp.traced_flows() == {}
        dp.trace_start(first, flows[:2])
        dp.trace_start(first, flows[:3])  # the same trace grows; held flows are not written twice
        with pytest.raises(SetupError, match=f"already traced by trace {first}"):
            dp.trace_start(second, [flows[5], flows[0]])
        assert dp.traced_flows() == {first: flows[:3]}
        with pytest.raises(ValueError, match="dport"):
            dp.trace_start(second, [TraceFlow(pr.A, pr.B, 0, 70000, PROTO_TCP)])
        with pytest.raises(ValueError, match="src"):
            dp.trace_start(second, [TraceFlow("10.1.0.300", pr.B, 0, 80, PROTO_TCP)])
        with pytest.raises(ValueError, match="trace id"):
            dp.trace_start(0, flows[:1])
    finally:
        dp.trace_stop(first)
        dp.trace_stop(first)  # idempotent
    assert dp.traced_flows() == {}
    # the switch is back to 0: a packet of a formerly traced flow reports nothing
    dp.test_run_full("from_container", pr.packet(pr.A, pr.B, PROTO_TCP, 1))
    assert dp.poll_traces() == []
