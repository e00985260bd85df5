"""The timeline of `l7lab trace` from traces recorded on real labs (tests/unit/traces/*.json: the
events, the proxy's L7 records, the node's routing, the oracle's decision, the names and what the
client saw, as `dataplane.tracing` gathered them), and code pointers into the real bpf sources."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dataplane.abi import Hook, TracePoint
from dataplane.datapath import TraceEvent
from dataplane.flowrecord import Flow
from dataplane.probes import Observation
from dataplane.topology import ProxyRouting, RoutingRule, TableRoute
from dataplane.trace import BpfSources, Trace, assemble
from dataplane.tracing import names_from_json
from tests.conftest import REPO

TRACES = Path(__file__).parent / "traces"


def replay(name: str) -> Trace:
    d: dict[str, Any] = json.loads((TRACES / f"{name}.json").read_text())
    routing = ProxyRouting(tuple(RoutingRule(**r) for r in d["routing"]["rules"]),
                           tuple(TableRoute(**r) for r in d["routing"]["routes"]), d["routing"]["table"])
    return assemble(probe=d["probe"], client=tuple(d["client"]), events=[TraceEvent.from_json(e) for e in d["events"]],
                    l7_records=[Flow.from_json(r) for r in d["l7_records"]], routing=routing, oracle=d["oracle"],
                    names=names_from_json(d["names"]), observed=Observation(**d["observed"]))


def in_order(trace: Trace, *fragments: str) -> None:
    """Each fragment is in a step's title, in this order (each in the step of the one before, or later)."""
    titles = [s.title for s in trace.steps]
    at = 0
    for fragment in fragments:
        later = [i for i, t in enumerate(titles) if fragment in t and i >= at]
        assert later, f"no step {fragment!r} from step {at + 1} on in:\n" + "\n".join(titles)
        at = later[0]


def test_l7_denied_request() -> None:
    trace = replay("l7-denied")
    in_order(trace, "from_container on lxc7f26a992 (retail/frontend-app): SYN TCP", "conntrack: NEW", "source identity", "from the endpoints map",
             "ingress policy of retail/inventory-api, lookup 1", "-> hit: REDIRECT",
             "decision for the packet (egress and ingress combined): REDIRECT",
             "bpf_sk_assign to the proxy listener 127.0.0.1:15001; mark set 0x3a990200",
             "(retail/frontend-app): data TCP", "conntrack: ESTABLISHED", "bpf_sk_assign to the proxy's socket of this flow",
             "ip rule 9: fwmark 0x200/0xf00 lookup table 2004", "table 2004: local 0.0.0.0/0 dev lo",
             "accepted the connection from", "original destination 10.200.0.3:8080",
             "source identity 256", "against L7 ingress of retail/inventory-api: matches no HTTP rule",
             "answered 403 Access denied", "to_container on lxc7f26a992 (retail/frontend-app): SYN-ACK", "conntrack: REPLY",
             "the client saw: denied", "the oracle (explain) predicted: denied")
    assert not trace.phase_steps("upstream")
    assert trace.disagreements == [] and trace.kernel["verdict"] == "REDIRECT"


def test_l7_forwarded_request_has_its_upstream() -> None:
    trace = replay("l7-forwarded")
    in_order(trace, "decision for the packet (egress and ingress combined): REDIRECT", "ip rule 9",
             "matches HTTP rule", "forwarded upstream to 10.200.0.3:8080 from the node, SO_MARK 0x1000a00",
             ": SYN TCP 10.200.0.1:", "the L7 proxy's upstream: mark 0x1000a00 carries source identity 256",
             "conntrack entry created (source identity 256, no rule, from proxy)", ": SYN-ACK TCP 10.200.0.3:8080",
             "the client saw: allowed")
    assert [s.phase for s in trace.steps if "the L7 proxy's upstream: mark" in s.title] == ["upstream"]


def test_l3l4_drop() -> None:
    trace = replay("l3l4-dropped")
    in_order(trace, ": SYN TCP", "ingress policy of retail/inventory-api: DROP (POLICY_DENIED)",
             "decision for the packet (egress and ingress combined): DROP (POLICY_DENIED)",
             "returned TC_ACT_SHOT: DROP (POLICY_DENIED)", "the client saw: dropped")
    assert [s.phase for s in trace.steps if s.layer == "kernel"] == ["request"] * sum(s.layer == "kernel" for s in trace.steps)
    assert "default deny" in trace.hint() and "retail/inventory-api" in trace.hint()


def test_dns_refused() -> None:
    trace = replay("dns-refused")
    in_order(trace, ": datagram UDP", "egress policy of shop/mediabot: REDIRECT", "bpf_sk_assign to the proxy listener",
             "ip rule 9", "received the query from", "DNS A www.example.org against L7 egress of shop/mediabot: "
             "matches no DNS rule", "answered REFUSED; nothing sent upstream", "to_container on lxc0e03ee64 (shop/mediabot): datagram UDP",
             "the client saw: refused")
    assert "no DNS rule" in trace.hint()


def test_every_trace_point_of_the_real_sources_points_at_itself() -> None:
    """Each TRACE(...) call of dataplane/bpf resolves to its own file, line and function."""
    sources = BpfSources()
    calls = 0
    for path in sorted((REPO / "dataplane" / "bpf").rglob("*.[ch]")):
        for number, text in enumerate(path.read_text().splitlines(), 1):
            m = re.search(r"\bTRACE\(\s*&?\w+,\s*TRACE_(\w+)", text)
            if m is None:
                continue
            calls += 1
            hook = Hook.TO_CONTAINER if "to_container" in path.name else Hook.FROM_CONTAINER
            pointer = sources.pointer(TracePoint[m.group(1)], number, hook)
            file, function = pointer.split(" ", 1)
            assert file == f"{path.relative_to(REPO)}:{number}"
            assert re.fullmatch(r"\w+", function), pointer
    assert calls >= len(TracePoint)
