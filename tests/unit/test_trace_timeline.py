"""The timeline of `l7lab trace` assembled from trace events (dataplane/trace.py): synthetic
events for each phase, the oracle-disagreement notes, code pointers, and stable text."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from dataplane import abi
from dataplane.abi import CtResult, DropReason, FlowVerdict, Hook, IdentityOrigin, TracePoint, TraceSocket
from dataplane.datapath import TraceEvent
from dataplane.flowrecord import Endpoint, Flow, FlowType, L4, L7, PolicyAttribution, TracePoint as RecordPoint
from dataplane.flowrecord import TrafficDirection, Verdict
from dataplane.probes import Observation
from dataplane.topology import ProxyRouting, RoutingRule, TableRoute
from dataplane.trace import BpfSources, LabNames, assemble, oracle_kernel_verdict
from l7.dns import DnsFlow
from l7.http import HttpFlow

CLIENT = ("10.23.0.11", 40123)
SERVER = ("10.23.0.12", 8080)
NODE = "10.23.0.1"
SRC_IF, DST_IF = 7, 9
SYN, SYNACK, PSH_ACK = abi.TCPF_SYN, abi.TCPF_SYN | abi.TCPF_ACK, abi.TCPF_PSH | abi.TCPF_ACK
REDIRECT_PORT = abi.PROXY_PORT
TO_PROXY_MARK = abi.MARK_MAGIC_TO_PROXY | REDIRECT_PORT << 16
NAMES = LabNames(
    interfaces={SRC_IF: ("lxc-frontend", "retail/frontend-app"), DST_IF: ("lxc-inventory", "retail/inventory-api")},
    addresses={CLIENT[0]: "retail/frontend-app", SERVER[0]: "retail/inventory-api", NODE: "node"},
    identities={256: "256 (k8s:app=frontend-app)", 257: "257 (k8s:app=inventory-api)"},
    endpoints={1: "retail/frontend-app", 2: "retail/inventory-api"},
    rules={5: "CiliumNetworkPolicy retail/inventory-l7 ingress[0]"}, node_ip=NODE)
ROUTING = ProxyRouting((RoutingRule(9, abi.MARK_MAGIC_TO_PROXY, abi.MARK_MAGIC_MASK, 2004),),
                       (TableRoute(2004, "local", "0.0.0.0/0", "lo"),))

# Each point's (fake) source line: tests/unit/traces/bpf holds a from_container.c and a
# to_container.c whose line N emits TRACE_<POINT> inside a function.
LINE = {p: 10 + 2 * p.value for p in TracePoint}


def _decision(verdict: FlowVerdict, reason: DropReason, direction: abi.Direction, enforced: bool = True) -> int:
    return verdict | reason << 8 | direction << 16 | int(enforced) << 24


class Events:
    """Builds the events of packets, one program run at a time."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []
        self.ids = itertools.count(1)
        self.ts = itertools.count(1000, 10)

    def packet(self, hook: Hook, ifindex: int, src: tuple[str, int], dst: tuple[str, int], flags: int,
               points: list[tuple[TracePoint, tuple[int, ...]]], proto: int = abi.PROTO_TCP) -> None:
        pid = next(self.ids)
        for point, args in points:
            self.events.append(TraceEvent(next(self.ts), 7, pid, point, LINE[point], hook, proto, flags, ifindex,
                                          src[0], dst[0], src[1], dst[1], tuple(args) + (0,) * (5 - len(args))))


def lookups(endpoint: int, direction: abi.Direction, identity: int, port: int, hit_step: int, result: abi.Verdict,
            rule: int = 0, proxy_port: int = 0) -> list[tuple[TracePoint, tuple[int, ...]]]:
    out = []
    for step in range(1, 5):
        key_id = identity if step <= 2 else 0
        key_proto = abi.PROTO_TCP if step in (1, 3) else 0
        key_port = port if step in (1, 3) else 0
        hit = step == hit_step
        out.append((TracePoint.POLICY_LOOKUP, (endpoint | direction << 16 | step << 24, key_id, key_proto | key_port << 16,
                                               (result | proxy_port << 16) if hit else 0, rule if hit else 0)))
    return out


def new_flow_syn(ev: Events, decision: FlowVerdict, reason: DropReason = DropReason.NONE,
                 ingress: abi.Verdict = abi.Verdict.REDIRECT, rule: int = 5) -> None:
    """The client's SYN at from_container on its veth: a new flow, both policies, a decision."""
    proxy_port = REDIRECT_PORT if decision == FlowVerdict.REDIRECT else 0
    points = [(TracePoint.HOOK, (0, 60)), (TracePoint.PARSE, (0, SERVER[1])), (TracePoint.SPOOF_CHECK, (1, 1)),
              (TracePoint.CONNTRACK, (CtResult.NEW,)),
              (TracePoint.IDENTITY, (0, 256, IdentityOrigin.ENDPOINT, 1)),
              (TracePoint.IDENTITY, (1, 257, IdentityOrigin.ENDPOINT, 2)),
              *lookups(1, abi.Direction.EGRESS, 257, SERVER[1], 0, abi.Verdict.NONE),
              (TracePoint.POLICY_DECISION, (_decision(FlowVerdict.FORWARD, DropReason.NONE, abi.Direction.EGRESS, False), 1)),
              *lookups(2, abi.Direction.INGRESS, 256, SERVER[1], 1 if ingress != abi.Verdict.NONE else 0, ingress, rule,
                       proxy_port),
              (TracePoint.POLICY_DECISION, (_decision(decision, reason, abi.Direction.INGRESS), 2,
                                            rule if ingress != abi.Verdict.NONE else 0, proxy_port)),
              (TracePoint.DECISION, (_decision(decision, reason, abi.Direction.INGRESS), 2,
                                     rule if ingress != abi.Verdict.NONE else 0, proxy_port))]
    if decision == FlowVerdict.REDIRECT:
        points += [(TracePoint.PROXY_ASSIGN, (0, TraceSocket.LISTENER, TO_PROXY_MARK, REDIRECT_PORT)),
                   (TracePoint.CT_CREATE, (256, rule, REDIRECT_PORT, 0)),
                   (TracePoint.RESULT, (0, FlowVerdict.REDIRECT, 0, TO_PROXY_MARK))]
    elif decision == FlowVerdict.DROP:
        points += [(TracePoint.RESULT, (2, FlowVerdict.DROP, reason, 0))]
    else:
        points += [(TracePoint.CT_CREATE, (256, rule, 0, 0)),
                   (TracePoint.RESULT, (0, decision, reason, abi.MARK_MAGIC_DECIDED))]
    ev.packet(Hook.FROM_CONTAINER, SRC_IF, CLIENT, SERVER, SYN, points)


def redirected_data(ev: Events) -> None:
    ev.packet(Hook.FROM_CONTAINER, SRC_IF, CLIENT, SERVER, PSH_ACK, [
        (TracePoint.HOOK, (0, 180)), (TracePoint.PARSE, (0, SERVER[1])), (TracePoint.SPOOF_CHECK, (1, 1)),
        (TracePoint.CONNTRACK, (CtResult.ESTABLISHED, REDIRECT_PORT, 0, 256, 5)),
        (TracePoint.PROXY_ASSIGN, (0, TraceSocket.FLOW, TO_PROXY_MARK, REDIRECT_PORT)),
        (TracePoint.RESULT, (0, FlowVerdict.REDIRECT, 0, TO_PROXY_MARK))])


def reply_from_node(ev: Events, flags: int = SYNACK) -> None:
    """The proxy's (node stack's) packet to the client at to_container: conntrack says reply."""
    ev.packet(Hook.TO_CONTAINER, SRC_IF, SERVER, CLIENT, flags, [
        (TracePoint.HOOK, (0, 60)), (TracePoint.PARSE, (0, CLIENT[1])),
        (TracePoint.CONNTRACK, (CtResult.REPLY, REDIRECT_PORT, 0, 256, 5)),
        (TracePoint.RESULT, (0, FlowVerdict.FORWARD, 0, 0))])


def l7_record(verdict: Verdict, code: int, summary: str, rules: tuple[str, ...] = (), policies: tuple[str, ...] = (),
              rule_ids: tuple[int, ...] = ()) -> Flow:
    return Flow(1.0, FlowType.L7, verdict, Endpoint(*CLIENT, 256, "retail", "frontend-app"),
                Endpoint(*SERVER, 257, "retail", "inventory-api"), L4("TCP"), TrafficDirection.INGRESS,
                RecordPoint.PROXY, summary=summary, policy=PolicyAttribution(rule_ids, policies, rules),
                l7=L7(1.0, HttpFlow("DELETE", "http://inventory-api:8080/api/inventory/1", "/api/inventory/1",
                                    "HTTP/1.1", code)))


def oracle(outcome: str, egress: str = "not enforced", ingress: str = "REDIRECT", l7: dict | None = None,
           audited: bool = False) -> dict:
    return {"outcome": outcome, "egress": egress, "ingress": ingress, "rule_ids": [5], "audited": audited,
            "trace": ["flow: ..."], "l7": l7}


@pytest.fixture(scope="module")
def sources() -> BpfSources:
    return BpfSources(Path(__file__).parent / "traces" / "bpf", repo=Path(__file__).parent / "traces")


DENIED_SUMMARY = ("L7 ingress of retail/inventory-api: matches no HTTP rule "
                  "(tried: GET /api/inventory/.*)")


def denied_trace(sources: BpfSources, oracle_decision: dict | None = None):
    ev = Events()
    new_flow_syn(ev, FlowVerdict.REDIRECT)
    reply_from_node(ev)
    redirected_data(ev)
    redirected_data(ev)  # a second data packet: counted, not shown
    reply_from_node(ev, PSH_ACK)
    record = l7_record(Verdict.DENIED, 403, DENIED_SUMMARY, policies=("CiliumNetworkPolicy retail/inventory-l7",))
    decision = oracle_decision or oracle("denied", l7={"allowed": False, "why": DENIED_SUMMARY})
    return assemble(probe="retail/frontend-app -> inventory-api:8080 TCP DELETE /api/inventory/1", client=CLIENT,
                    events=ev.events, l7_records=[record], routing=ROUTING, oracle=decision, names=NAMES,
                    observed=Observation("denied", "403 Access denied (L7 proxy)", 403), sources=sources)


def titles(trace, phase: str | None = None) -> list[str]:
    return [s.title for s in trace.steps if phase is None or s.phase == phase]


def index_of(trace, text: str) -> int:
    found = [i for i, t in enumerate(titles(trace)) if text in t]
    assert found, f"no step with {text!r} in:\n" + "\n".join(titles(trace))
    return found[0]


def test_l7_denied_flow_goes_through_every_phase_in_order(sources: BpfSources) -> None:
    trace = denied_trace(sources)
    order = [index_of(trace, "tc ingress from_container on lxc-frontend (retail/frontend-app): SYN"),
             index_of(trace, "source identity 256 (k8s:app=frontend-app) from the endpoints map"),
             index_of(trace, "ingress policy of retail/inventory-api, lookup 1 (identity, protocol, port): "
                             "identity=256 (k8s:app=frontend-app) proto=TCP port=8080 -> hit: REDIRECT"),
             index_of(trace, "decision for the packet (egress and ingress combined): REDIRECT to the L7 proxy"),
             index_of(trace, "bpf_sk_assign to the proxy listener 127.0.0.1:15001; mark set 0x3a990200"),
             index_of(trace, "tc ingress from_container on lxc-frontend (retail/frontend-app): data"),
             index_of(trace, "bpf_sk_assign to the proxy's socket of this flow"),
             index_of(trace, "ip rule 9: fwmark 0x200/0xf00 lookup table 2004"),
             index_of(trace, "table 2004: local 0.0.0.0/0 dev lo"),
             index_of(trace, "accepted the connection from 10.23.0.11:40123; original destination 10.23.0.12:8080"),
             index_of(trace, "DELETE /api/inventory/1 against L7 ingress of retail/inventory-api: matches no HTTP rule"),
             index_of(trace, "answered 403 Access denied"),
             index_of(trace, "tc egress to_container on lxc-frontend (retail/frontend-app): SYN-ACK"),
             index_of(trace, "the client saw: denied"),
             index_of(trace, "the oracle (explain) predicted: denied")]
    assert order == sorted(order)
    assert [s.number for s in trace.steps] == list(range(1, len(trace.steps) + 1))
    assert not titles(trace, "upstream")  # denied: nothing sent upstream
    assert trace.disagreements == []
    assert trace.kernel["verdict"] == "REDIRECT" and trace.proxy["verdict"] == "denied"
    assert "refused DELETE /api/inventory/1" in trace.hint()
    assert trace.summary()[0].startswith("kernel: REDIRECT at from_container on lxc-frontend")


def test_miss_lookups_show_their_key(sources: BpfSources) -> None:
    trace = denied_trace(sources)
    egress = [t for t in titles(trace) if t.startswith("egress policy of retail/frontend-app, lookup")]
    assert len(egress) == 4 and all(t.endswith("-> miss") for t in egress)
    assert "lookup 4 (any identity, any protocol): identity=any proto=any port=any -> miss" in egress[3]


def test_later_packets_of_a_kind_are_counted_in_json_only(sources: BpfSources) -> None:
    trace = denied_trace(sources)
    data = [p for p in trace.packets if p["leg"] == "request" and p["kind"] == "data"]
    assert data == [{"leg": "request", "kind": "data", "hook": "from_container",
                     "interface": "lxc-frontend (retail/frontend-app)", "count": 2}]
    assert sum("from_container on lxc-frontend (retail/frontend-app): data" in t for t in titles(trace)) == 1
    # the client's reply leg: the SYN-ACK is shown, its later data packet only counted
    assert not any("to_container on lxc-frontend (retail/frontend-app): data" in t for t in titles(trace))
    assert {"leg": "reply", "kind": "data", "hook": "to_container", "interface": "lxc-frontend (retail/frontend-app)",
            "count": 1} in trace.packets
    assert trace.to_json()["packets"] == trace.packets


def test_kernel_steps_point_at_the_emitting_line_and_function(sources: BpfSources) -> None:
    trace = denied_trace(sources)
    kernel = [s for s in trace.steps if s.layer == "kernel"]
    hook_to = next(s for s in kernel if s.detail.get("program") == "to_container")
    assert hook_to.code == f"bpf/to_container.c:{LINE[TracePoint.HOOK]} handle_to_container"
    lookup = next(s for s in kernel if "lookup 1" in s.title)
    assert lookup.code == f"bpf/lib/policy.h:{LINE[TracePoint.POLICY_LOOKUP]} policy_lookup"
    decision = next(s for s in kernel if s.title.startswith("decision"))
    assert decision.code == f"bpf/from_container.c:{LINE[TracePoint.DECISION]} handle_from_container"


def test_node_and_proxy_steps_point_at_python_functions(sources: BpfSources) -> None:
    trace = denied_trace(sources)
    rule = next(s for s in trace.steps if s.layer == "node")
    assert rule.code.startswith("dataplane/topology.py:") and rule.code.endswith(" setup_node")
    accept = next(s for s in trace.steps if s.title.startswith("accepted the connection"))
    assert accept.code.startswith("proxy/server.py:") and accept.code.endswith("ClientConnection.__init__")
    path, line = accept.code.split()[0].split(":")
    text = (Path(__file__).resolve().parents[2] / path).read_text().splitlines()
    assert "def __init__" in text[int(line) - 1]


def test_redirect_without_fwmark_rule_says_so(sources: BpfSources) -> None:
    ev = Events()
    new_flow_syn(ev, FlowVerdict.REDIRECT)
    trace = assemble(probe="p", client=CLIENT, events=ev.events, l7_records=[], routing=ProxyRouting((), ()),
                     oracle=oracle("denied"), names=NAMES, observed=Observation("dropped", "no connection"),
                     sources=sources)
    node = titles(trace, "node")
    assert node[0].startswith("no fwmark rule to the proxy's table") and node[1].startswith("no local route")
    assert titles(trace, "proxy") == ["no L7 record of this client port: the proxy judged no request of it"]


def test_l3l4_drop_stops_at_the_first_hook(sources: BpfSources) -> None:
    ev = Events()
    for _ in range(3):  # the SYN and its retransmissions
        new_flow_syn(ev, FlowVerdict.DROP, DropReason.POLICY_DENIED, ingress=abi.Verdict.NONE)
    trace = assemble(probe="p", client=CLIENT, events=ev.events, l7_records=[], routing=ROUTING,
                     oracle=oracle("dropped", ingress="NONE (default deny)"), names=NAMES,
                     observed=Observation("dropped", "no connection within 1s"), sources=sources)
    assert trace.kernel["verdict"] == "DROP" and trace.kernel["reason"] == "POLICY_DENIED"
    assert index_of(trace, "ingress policy of retail/inventory-api: DROP (POLICY_DENIED)") < \
        index_of(trace, "returned TC_ACT_SHOT: DROP (POLICY_DENIED)")
    assert not titles(trace, "node") and not titles(trace, "proxy") and not titles(trace, "upstream")
    assert trace.packets == [{"leg": "request", "kind": "SYN", "hook": "from_container",
                              "interface": "lxc-frontend (retail/frontend-app)", "count": 3}]
    assert trace.disagreements == []
    assert "default deny" in trace.hint()


def test_allowed_forwarded_request_shows_the_upstream_with_its_mark(sources: BpfSources) -> None:
    ev = Events()
    new_flow_syn(ev, FlowVerdict.REDIRECT)
    reply_from_node(ev)
    redirected_data(ev)
    mark = abi.from_proxy_mark(256)
    ev.packet(Hook.TO_CONTAINER, DST_IF, (NODE, 51000), SERVER, SYN, [
        (TracePoint.HOOK, (mark, 60)), (TracePoint.PARSE, (0, SERVER[1])), (TracePoint.FROM_PROXY, (256, mark)),
        (TracePoint.CONNTRACK, (CtResult.NEW,)), (TracePoint.CT_CREATE, (256, 0, 0, abi.CT_F_FROM_PROXY)),
        (TracePoint.RESULT, (0, FlowVerdict.FORWARD, 0, mark))])
    ev.packet(Hook.FROM_CONTAINER, DST_IF, SERVER, (NODE, 51000), SYNACK, [
        (TracePoint.HOOK, (0, 60)), (TracePoint.CONNTRACK, (CtResult.REPLY, 0, abi.CT_F_FROM_PROXY, 256, 0)),
        (TracePoint.RESULT, (0, FlowVerdict.FORWARD, 0, abi.MARK_MAGIC_DECIDED))])
    record = l7_record(Verdict.FORWARDED, 200, "L7 ingress of retail/inventory-api: matches HTTP rule DELETE",
                       rules=("CiliumNetworkPolicy retail/inventory-l7 ingress[0]",), rule_ids=(5,))
    trace = assemble(probe="p", client=CLIENT, events=ev.events, l7_records=[record], routing=ROUTING,
                     oracle=oracle("allowed", l7={"allowed": True, "why": "matches"}), names=NAMES,
                     observed=Observation("allowed", "200 from retail/inventory-api", 200), sources=sources)
    assert index_of(trace, f"forwarded upstream to 10.23.0.12:8080 from the node, SO_MARK {mark:#x}") < \
        index_of(trace, f"the L7 proxy's upstream: mark {mark:#x} carries source identity 256") < \
        index_of(trace, "tc ingress from_container on lxc-inventory (retail/inventory-api): SYN-ACK") < \
        index_of(trace, "tc egress to_container on lxc-frontend (retail/frontend-app): SYN-ACK")
    up = titles(trace, "upstream")
    assert up[0].startswith("tc egress to_container on lxc-inventory (retail/inventory-api): SYN TCP 10.23.0.1:51000 (node)")
    assert "rule CiliumNetworkPolicy retail/inventory-l7 ingress[0]" in titles(trace, "proxy")[2]
    assert trace.disagreements == []
    assert "allowed DELETE /api/inventory/1" in trace.hint()


def test_oracle_disagreement_is_noted_on_the_deciding_steps(sources: BpfSources) -> None:
    trace = denied_trace(sources, oracle("allowed", ingress="ALLOW", l7=None))
    decision = next(s for s in trace.steps if s.title.startswith("decision"))
    assert decision.note == "the oracle predicted FORWARD at L3/L4 (egress not enforced, ingress ALLOW)"
    client = next(s for s in trace.steps if s.layer == "client")
    assert client.note == "the client saw denied, the oracle predicted allowed"
    assert len(trace.disagreements) == 2
    assert "disagrees" in trace.summary()[-1]
    assert trace.hint().startswith("The oracle and the lab disagree")


def test_l7_disagreement_is_noted_on_the_proxy_rule_step(sources: BpfSources) -> None:
    trace = denied_trace(sources, oracle("denied", l7={"allowed": True, "why": "matches HTTP rule X"}))
    rule_step = next(s for s in trace.steps if "against L7 ingress" in s.title)
    assert rule_step.note == "the oracle predicted the request forwarded: matches HTTP rule X"
    assert trace.disagreements == ["proxy denied, the oracle predicted the request forwarded: matches HTTP rule X"]


def test_dns_refused_by_the_dns_proxy(sources: BpfSources) -> None:
    ev = Events()
    dns_server = ("10.23.0.53", 53)
    ev.packet(Hook.FROM_CONTAINER, SRC_IF, CLIENT, dns_server, 0, [
        (TracePoint.HOOK, (0, 70)), (TracePoint.CONNTRACK, (CtResult.NEW,)),
        (TracePoint.DECISION, (_decision(FlowVerdict.REDIRECT, DropReason.NONE, abi.Direction.EGRESS), 1, 5, 15053)),
        (TracePoint.PROXY_ASSIGN, (0, TraceSocket.LISTENER, abi.MARK_MAGIC_TO_PROXY | 15053 << 16, 15053)),
        (TracePoint.RESULT, (0, FlowVerdict.REDIRECT, 0, 0))], proto=abi.PROTO_UDP)
    ev.packet(Hook.TO_CONTAINER, SRC_IF, dns_server, CLIENT, 0, [
        (TracePoint.HOOK, (0, 70)), (TracePoint.CONNTRACK, (CtResult.REPLY, 15053, 0, 256, 5)),
        (TracePoint.RESULT, (0, FlowVerdict.FORWARD, 0, 0))], proto=abi.PROTO_UDP)
    record = Flow(1.0, FlowType.L7, Verdict.DENIED, Endpoint(*CLIENT, 256), Endpoint(*dns_server, 2), L4("UDP"),
                  TrafficDirection.EGRESS, RecordPoint.PROXY,
                  summary="L7 egress of retail/frontend-app: matches no DNS rule (tried: *.example.com)",
                  l7=L7(1.0, dns=DnsFlow("evil.test", ("A",), 5)))
    trace = assemble(probe="p", client=CLIENT, events=ev.events, l7_records=[record], routing=ROUTING,
                     oracle=oracle("refused", egress="REDIRECT", ingress="n/a", l7={"allowed": False, "why": "x"}),
                     names=NAMES, observed=Observation("refused", "DNS REFUSED for evil.test"), sources=sources)
    proxy = titles(trace, "proxy")
    assert proxy[0].startswith("received the query from 10.23.0.11:40123; original destination 10.23.0.53:53")
    assert proxy[2].startswith("DNS A evil.test against L7 egress of retail/frontend-app: matches no DNS rule")
    assert proxy[3] == "answered REFUSED; nothing sent upstream"
    assert titles(trace, "reply")[0].startswith("tc egress to_container on lxc-frontend (retail/frontend-app): datagram")
    assert "no DNS rule (toPorts.rules.dns)" in trace.hint()
    assert trace.disagreements == []


def test_audit_pass_is_reported_as_such(sources: BpfSources) -> None:
    ev = Events()
    new_flow_syn(ev, FlowVerdict.AUDIT, DropReason.POLICY_DENIED, ingress=abi.Verdict.NONE)
    trace = assemble(probe="p", client=CLIENT, events=ev.events, l7_records=[], routing=ROUTING,
                     oracle=oracle("allowed", ingress="NONE (default deny)", audited=True), names=NAMES,
                     observed=Observation("allowed", "200 from retail/inventory-api", 200), sources=sources)
    assert trace.kernel["verdict"] == "AUDIT"
    assert index_of(trace, "decision for the packet (egress and ingress combined): AUDIT (POLICY_DENIED)") < \
        index_of(trace, "returned TC_ACT_OK: AUDIT (POLICY_DENIED)")
    assert trace.disagreements == []
    assert "audit mode let it pass" in trace.hint()


@pytest.mark.parametrize(("egress", "ingress", "audited", "expected"), [
    ("not enforced", "ALLOW", False, "FORWARD"), ("ALLOW", "REDIRECT", False, "REDIRECT"),
    ("DENY", "REDIRECT", False, "DROP"), ("n/a", "NONE (default deny)", False, "DROP"),
    ("NONE (default deny)", "ALLOW", True, "AUDIT"), ("NONE (default deny)", "REDIRECT", True, "REDIRECT")])
def test_oracle_verdict_in_the_datapath_words(egress: str, ingress: str, audited: bool, expected: str) -> None:
    assert oracle_kernel_verdict({"egress": egress, "ingress": ingress, "audited": audited}) == expected


def test_text_is_stable_across_runs_with_different_packet_counts(sources: BpfSources) -> None:
    one = denied_trace(sources)
    ev = Events()
    new_flow_syn(ev, FlowVerdict.REDIRECT)
    reply_from_node(ev)
    for _ in range(4):
        redirected_data(ev)
        reply_from_node(ev, PSH_ACK)
    record = l7_record(Verdict.DENIED, 403, DENIED_SUMMARY, policies=("CiliumNetworkPolicy retail/inventory-l7",))
    other = assemble(probe=one.probe, client=CLIENT, events=ev.events, l7_records=[record], routing=ROUTING,
                     oracle=one.oracle, names=NAMES, observed=Observation("denied", "403 Access denied (L7 proxy)", 403),
                     sources=sources)
    assert titles(one) == titles(other)
    assert one.packets != other.packets


def test_json_has_the_contract_fields(sources: BpfSources) -> None:
    data = denied_trace(sources).to_json()
    assert {"probe", "client", "outcome", "kernel", "proxy", "oracle", "disagreements", "summary", "hint", "steps",
            "packets"} <= set(data)
    assert set(data["steps"][0]) == {"number", "phase", "layer", "where", "title", "detail", "code", "note"}
    assert data["client"] == {"ip": CLIENT[0], "port": CLIENT[1]}
