"""The timeline of one traced flow: what `l7lab trace` prints, built from what happened.

Responsibility: turn the datapath's trace events of one flow (`dataplane.datapath.TraceEvent`),
the L7 proxy's records of it (`dataplane.flowrecord.Flow`, matched on the client's ip:port), the
node's proxy routing as read from the kernel (`topology.ProxyRouting`), the oracle's decision
(`PolicyEngine.verdict(...).to_json()` with its L7 part, see `dataplane.tracing.oracle_json`), the
lab's names (`LabNames`) and what the client observed into a numbered list of `TraceStep`s, in
five phases: the request leaving the pod, the node's routing to the proxy, the proxy, the
proxy's upstream, and the reply. Pure: no kernel, no files but the bpf sources it points into.

Packets are grouped by kind (the client's SYN, its first data packet, the first reply, ...):
the first packet of each shown kind is written out event by event; every kind (shown or not)
appears in `Trace.packets` with how many packets it had, in `--json` only, because those counts
vary from run to run while the text must not.

Every step points at the code that performed it: a kernel step at the bpf source line that
emitted its event (the file whose line `event.line` holds `TRACE_<POINT>`, and the function
around it), a node or proxy step at the Python function that does the work.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import abi
from .abi import CtResult, DropReason, FlowVerdict, Hook, IdentityOrigin, TracePoint, TraceSide, TraceSocket
from .bpfsource import BPF_DIR

if TYPE_CHECKING:
    from .datapath import TraceEvent
    from .flowrecord import Flow
    from .probes import Observation
    from .topology import ProxyRouting

REPO = Path(__file__).resolve().parent.parent
PHASES = ("request", "node", "proxy", "upstream", "reply")
PHASE_TITLES = {"request": "the request leaves the pod", "node": "node routing", "proxy": "the L7 proxy",
                "upstream": "the proxy's upstream", "reply": "the reply"}
LEG_PHASE = {"request": "request", "upstream": "upstream", "upstream-reply": "upstream", "reply": "reply"}
HOOK_TEXT = {Hook.FROM_CONTAINER: ("from_container", "tc ingress"), Hook.TO_CONTAINER: ("to_container", "tc egress")}
TC_ACTIONS = {0: "TC_ACT_OK", 2: "TC_ACT_SHOT"}
FRAG_KINDS = {0: "not a fragment", 1: "first fragment", 2: "later fragment"}
POLICY_RESULTS = {v.value: v.name for v in abi.Verdict}
ORIGIN_TEXT = {IdentityOrigin.ENDPOINT: "the endpoints map", IdentityOrigin.IPCACHE: "the ipcache (longest prefix match)",
               IdentityOrigin.WORLD: "neither map: world", IdentityOrigin.MARK: "the from-proxy mark",
               IdentityOrigin.NODE: "the node's own stack: host"}
SOCKET_TEXT = {TraceSocket.NONE: "no socket", TraceSocket.FLOW: "the proxy's socket of this flow",
               TraceSocket.LISTENER: "the proxy listener"}
LOOKUP_KEYS = {1: "identity, protocol, port", 2: "identity, any protocol", 3: "any identity, protocol, port",
               4: "any identity, any protocol"}


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class TraceStep:
    """One numbered step of the timeline."""

    number: int
    layer: str  # "kernel" | "node" | "proxy" | "client" | "oracle"
    where: str  # the hook and interface, "node", "proxy", the pod
    title: str
    detail: dict[str, Any]
    code: str  # "dataplane/bpf/lib/policy.h:57 policy_try", "proxy/server.py:245 ClientConnection.__init__"
    note: str | None = None  # where the oracle predicted something else
    phase: str = "request"  # one of PHASES

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "phase": self.phase, "layer": self.layer, "where": self.where,
                "title": self.title, "detail": self.detail, "code": self.code, "note": self.note}


@dataclass
class LabNames:
    """Who is who in the lab at the time of the trace."""

    interfaces: dict[int, tuple[str, str]] = field(default_factory=dict)  # node ifindex -> (ifname, endpoint)
    addresses: dict[str, str] = field(default_factory=dict)  # ip -> "ns/pod", world host, "node"
    identities: dict[int, str] = field(default_factory=dict)  # identity -> "256 (k8s:app=x)"
    endpoints: dict[int, str] = field(default_factory=dict)  # endpoint id -> "ns/pod"
    rules: dict[int, str] = field(default_factory=dict)  # rule id -> "Kind ns/name ingress[0]"
    node_ip: str = ""

    def interface(self, ifindex: int) -> str:
        ifname, endpoint = self.interfaces.get(ifindex, (f"ifindex {ifindex}", ""))
        return f"{ifname} ({endpoint})" if endpoint else ifname

    def identity(self, number: int) -> str:
        if number in self.identities:
            return self.identities[number]
        reserved = {v: k for k, v in abi.RESERVED_IDENTITIES.items()}
        return f"{number} ({reserved[number]})" if number in reserved else str(number)

    def endpoint(self, endpoint_id: int) -> str:
        return self.endpoints.get(endpoint_id, f"endpoint {endpoint_id}") if endpoint_id else "no endpoint"

    def rule(self, rule_id: int) -> str:
        return self.rules.get(rule_id, f"rule {rule_id}") if rule_id else "no rule"

    def address(self, ip: str, port: int) -> str:
        name = self.addresses.get(ip)
        return f"{ip}:{port}" + (f" ({name})" if name else "")


@dataclass
class Packet:
    """The events of one program run on one packet."""

    hook: Hook
    ifindex: int
    src: str
    dst: str
    sport: int
    dport: int
    protocol: int
    tcp_flags: int
    events: list[TraceEvent]
    leg: str = "other"  # request | reply | upstream | upstream-reply | other
    kind: str = ""  # SYN, SYN-ACK, data, ACK, FIN, RST, datagram

    @property
    def key(self) -> tuple[str, str, Hook, int]:
        return (self.leg, self.kind, self.hook, self.ifindex)

    def first(self, point: TracePoint) -> TraceEvent | None:
        return next((e for e in self.events if e.point == point), None)


@dataclass
class Trace:
    """A traced flow: the probe, the timeline, and what each side decided."""

    probe: str  # "retail/frontend-app -> inventory-api:8080 TCP DELETE /api/inventory/1"
    client: tuple[str, int]
    steps: list[TraceStep]
    outcome: str  # what the client saw: allowed | dropped | denied | refused | error
    outcome_detail: str
    kernel: dict[str, Any]  # the datapath's decision for the flow's first packet
    oracle: dict[str, Any]  # the oracle's decision (Decision.to_json, with "l7")
    proxy: dict[str, Any] | None  # the proxy's L7 record, if the flow reached it
    disagreements: list[str] = field(default_factory=list)
    packets: list[dict[str, Any]] = field(default_factory=list)  # every kind of packet, with its count
    trace_id: int = 0

    def phase_steps(self, phase: str) -> list[TraceStep]:
        return [s for s in self.steps if s.phase == phase]

    def summary(self) -> list[str]:
        """A few lines: where and why the flow was decided."""
        lines = []
        k = self.kernel
        if k:
            why = f" ({k['reason']})" if k.get("reason", "NONE") != "NONE" else ""
            lines.append(f"kernel: {k['verdict']}{why} at {k['where']}, decided by {k['decided_by']}")
        else:
            lines.append("kernel: no trace event of this flow (the datapath traced nothing)")
        if self.proxy is not None:
            lines.append(f"proxy: {self.proxy['verdict']} {self.proxy['request']}: {self.proxy['summary']}")
        lines.append(f"client: {self.outcome}" + (f" ({self.outcome_detail})" if self.outcome_detail else ""))
        agree = "agrees" if not self.disagreements else "disagrees: " + "; ".join(self.disagreements)
        lines.append(f"oracle: {self.oracle.get('outcome', '?')} ({agree})")
        return lines

    def hint(self) -> str:
        """One sentence for a learner: what decided the flow and where to look."""
        return _hint(self)

    def to_json(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "probe": self.probe, "client": {"ip": self.client[0], "port": self.client[1]},
                "outcome": self.outcome, "outcome_detail": self.outcome_detail, "kernel": self.kernel,
                "proxy": self.proxy, "oracle": self.oracle, "disagreements": list(self.disagreements),
                "summary": self.summary(), "hint": self.hint(),
                "steps": [s.to_json() for s in self.steps], "packets": list(self.packets)}


# --------------------------------------------------------------------------- code pointers


class BpfSources:
    """The datapath's C sources, to point a kernel step at the line that emitted it."""

    def __init__(self, root: Path = BPF_DIR, repo: Path = REPO) -> None:
        files = sorted(root.glob("*.c")) + sorted((root / "lib").glob("*.h"))
        self.lines = {self._name(f, repo): f.read_text(errors="replace").splitlines() for f in files}

    @staticmethod
    def _name(path: Path, repo: Path) -> str:
        try:
            return str(path.resolve().relative_to(repo))
        except ValueError:
            return str(path)

    @staticmethod
    def _emits(text: str, token: str) -> bool:
        """The line holds the token in code: not in a comment, not as the enum's own entry."""
        code = re.split(r"/\*|//", text, maxsplit=1)[0]
        return token in code and not code.lstrip().startswith(token)

    _FUNCTION = re.compile(r"^[A-Za-z_][\w \t\*]*?\b(\w+)\s*\(")

    def pointer(self, point: TracePoint, line: int, hook: Hook) -> str:
        token = f"TRACE_{point.name}"
        found = [name for name, lines in self.lines.items()
                 if 0 < line <= len(lines) and self._emits(lines[line - 1], token)]
        if not found:
            return f"dataplane/bpf/?:{line}"
        program = HOOK_TEXT[hook][0]
        name = next((n for n in found if program in n), found[0])
        return f"{name}:{line} {self.enclosing(name, line)}".rstrip()

    def enclosing(self, name: str, line: int) -> str:
        for text in reversed(self.lines[name][:line]):
            m = self._FUNCTION.match(text)
            if m and not text.rstrip().endswith(";") and not text.startswith(("#", "return", "else")):
                return m.group(1)
        return ""


@functools.lru_cache(maxsize=None)
def python_pointer(module: str, qualname: str) -> str:
    """'path:line qualname' of a function (by `inspect`), for node and proxy steps."""
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        path = Path(inspect.getsourcefile(inspect.unwrap(obj)) or "")
        start = inspect.getsourcelines(obj)[1]
        try:
            shown = str(path.resolve().relative_to(REPO))
        except ValueError:
            shown = str(path)
        return f"{shown}:{start} {qualname}"
    except (ImportError, AttributeError, OSError, TypeError):
        return f"{module.replace('.', '/')}.py {qualname}"


# --------------------------------------------------------------------------- packets


def _tcp_kind(flags: int) -> str:
    if flags & abi.TCPF_RST:
        return "RST"
    if flags & abi.TCPF_SYN:
        return "SYN-ACK" if flags & abi.TCPF_ACK else "SYN"
    if flags & abi.TCPF_FIN:
        return "FIN"
    return "data" if flags & abi.TCPF_PSH else "ACK"


def group_packets(events: Iterable[TraceEvent], client: tuple[str, int], node_ip: str) -> list[Packet]:
    """The events as packets (one program run each), in the order they were seen, each with its
    leg (whose packet it is) and kind."""
    runs: dict[tuple[int, int, int], Packet] = {}
    for ev in sorted(events, key=lambda e: e.ts_ns):
        key = (ev.packet_id, int(ev.hook), ev.ifindex)
        pkt = runs.get(key)
        if pkt is None:
            pkt = runs[key] = Packet(ev.hook, ev.ifindex, ev.src, ev.dst, ev.sport, ev.dport, ev.protocol,
                                     ev.tcp_flags, [])
        pkt.events.append(ev)
    for pkt in runs.values():
        # A ping's client "port" is its echo id: a request carries it as dport, a reply as
        # sport (lib/parse.h), the other port 0.
        sport, dport = (pkt.sport | pkt.dport,) * 2 if pkt.protocol == abi.PROTO_ICMP else (pkt.sport, pkt.dport)
        if (pkt.src, sport) == client:
            pkt.leg = "request"
        elif (pkt.dst, dport) == client:
            pkt.leg = "reply"
        elif pkt.src == node_ip:
            pkt.leg = "upstream"
        elif pkt.dst == node_ip:
            pkt.leg = "upstream-reply"
        pkt.kind = _tcp_kind(pkt.tcp_flags) if pkt.protocol == abi.PROTO_TCP else "datagram"
    return list(runs.values())


def shown_packets(packets: list[Packet]) -> tuple[list[Packet], dict[tuple, int]]:
    """The packets written out in full: per leg, the first packet at each hook, and the client's
    first data packet at each hook (through the proxy, for a redirected flow). Returns them and
    the number of packets of every kind."""
    counts: dict[tuple, int] = {}
    shown: list[Packet] = []
    seen_first: set[tuple] = set()
    for pkt in packets:
        counts[pkt.key] = counts.get(pkt.key, 0) + 1
        first_of_leg = (pkt.leg, pkt.hook, pkt.ifindex) not in seen_first
        first_data = pkt.leg == "request" and pkt.kind == "data" and counts[pkt.key] == 1
        if pkt.leg != "other" and (first_of_leg or first_data):
            shown.append(pkt)
        seen_first.add((pkt.leg, pkt.hook, pkt.ifindex))
    return shown, counts


# --------------------------------------------------------------------------- kernel steps


def _split_decision(a0: int) -> tuple[FlowVerdict, DropReason, abi.Direction, bool]:
    return (FlowVerdict(a0 & 0xFF), DropReason((a0 >> 8) & 0xFF), abi.Direction((a0 >> 16) & 0xFF), bool(a0 >> 24 & 1))


def _decision_text(a0: int, names: LabNames, rule_id: int, proxy_port: int, audit: int) -> tuple[str, dict[str, Any]]:
    verdict, reason, direction, enforced = _split_decision(a0)
    text = verdict.name
    if verdict == FlowVerdict.REDIRECT:
        text += f" to the L7 proxy (port {proxy_port})"
    if reason != DropReason.NONE:
        text += f" ({reason.name})"
    if audit:
        text += ", a drop that audit mode lets pass"
    if rule_id:
        text += f" by {names.rule(rule_id)}"
    return text, {"verdict": verdict.name, "reason": reason.name, "direction": direction.name, "enforced": enforced,
                  "rule_id": rule_id, "rule": names.rule(rule_id) if rule_id else None, "proxy_port": proxy_port,
                  "audit": bool(audit)}


def _tuple_text(pkt: Packet, names: LabNames) -> str:
    proto = abi.PROTOCOL_NAMES.get(pkt.protocol, str(pkt.protocol))
    return f"{proto} {names.address(pkt.src, pkt.sport)} -> {names.address(pkt.dst, pkt.dport)}"


def event_step(ev: TraceEvent, pkt: Packet, names: LabNames) -> tuple[str, dict[str, Any]]:
    """The title and detail of one kernel event."""
    a = ev.args
    p = ev.point
    if p == TracePoint.HOOK:
        program, hook = HOOK_TEXT[ev.hook]
        flags = "|".join(n for bit, n in abi.TCP_FLAG_NAMES if pkt.tcp_flags & bit) if pkt.protocol == abi.PROTO_TCP else ""
        return (f"{hook} {program} on {names.interface(ev.ifindex)}: {pkt.kind} {_tuple_text(pkt, names)}",
                {"program": program, "hook": hook, "interface": names.interfaces.get(ev.ifindex, ("", ""))[0],
                 "ifindex": ev.ifindex, "tcp_flags": flags, "mark": hex(a[0]), "length": a[1]})
    if p == TracePoint.PARSE:
        return (f"parsed IPv4 ({FRAG_KINDS.get(a[0], a[0])}), policy port {a[1]}",
                {"fragment": FRAG_KINDS.get(a[0], a[0]), "policy_port": a[1]})
    if p == TracePoint.MARK_PASS:
        return (f"mark {a[0]:#x} says from_container already decided: passed without a lookup", {"mark": hex(a[0])})
    if p == TracePoint.SPOOF_CHECK:
        bound = names.endpoint(a[0]) if a[0] else "a world link"
        return (f"anti-spoofing: interface bound to {bound}: " + ("source address matches" if a[1] else "SPOOFED"),
                {"bound_endpoint": a[0], "passed": bool(a[1])})
    if p == TracePoint.CONNTRACK:
        result = CtResult(a[0]).name
        entry = f" (entry: proxy port {a[1]}, source identity {a[3]}, {names.rule(a[4])})" if a[0] != CtResult.NEW else ""
        return (f"conntrack: {result}{entry}",
                {"result": result, "proxy_port": a[1], "flags": a[2], "src_identity": a[3], "rule_id": a[4]})
    if p == TracePoint.IDENTITY:
        side = TraceSide(a[0]).name.lower()
        origin = IdentityOrigin(a[2])
        return (f"{side} identity {names.identity(a[1])} from {ORIGIN_TEXT[origin]}",
                {"side": side, "identity": a[1], "origin": origin.name, "endpoint_id": a[3],
                 "endpoint": names.endpoints.get(a[3], "") if a[3] else ""})
    if p == TracePoint.POLICY_LOOKUP:
        endpoint, direction, step = a[0] & 0xFFFF, abi.Direction((a[0] >> 16) & 0xFF), a[0] >> 24
        proto, port = a[2] & 0xFFFF, a[2] >> 16
        result, proxy_port = a[3] & 0xFFFF, a[3] >> 16
        hit = result != abi.Verdict.NONE
        key = (f"identity={names.identity(a[1]) if a[1] else 'any'} proto={abi.PROTOCOL_NAMES.get(proto, 'any')} "
               f"port={port or 'any'}")
        got = f"hit: {POLICY_RESULTS.get(result, result)}" + (f" (proxy port {proxy_port})" if proxy_port else "") + \
            (f" {names.rule(a[4])}" if a[4] else "") if hit else "miss"
        return (f"{direction.name.lower()} policy of {names.endpoint(endpoint)}, lookup {step} "
                f"({LOOKUP_KEYS.get(step, '?')}): {key} -> {got}",
                {"endpoint_id": endpoint, "endpoint": names.endpoint(endpoint), "direction": direction.name,
                 "step": step, "key": {"identity": a[1], "protocol": proto, "port": port}, "hit": hit,
                 "result": POLICY_RESULTS.get(result, result), "proxy_port": proxy_port, "rule_id": a[4]})
    if p in (TracePoint.POLICY_DECISION, TracePoint.DECISION):
        text, detail = _decision_text(a[0], names, a[2], a[3], a[4])
        if p == TracePoint.DECISION:
            return f"decision for the packet (egress and ingress combined): {text}", detail
        _, _, direction, enforced = _split_decision(a[0])
        detail["endpoint_id"] = a[1]
        enforced_text = "" if enforced else " (not enforced)"
        return f"{direction.name.lower()} policy of {names.endpoint(a[1])}{enforced_text}: {text}", detail
    if p == TracePoint.PROXY_ASSIGN:
        sock = TraceSocket(a[1])
        where = f"{SOCKET_TEXT[sock]}" + (f" 127.0.0.1:{a[3]}" if sock == TraceSocket.LISTENER else "")
        if a[0] == DropReason.NONE:
            return (f"bpf_sk_assign to {where}; mark set {a[2]:#x} (to-proxy)",
                    {"result": "assigned", "socket": sock.name, "mark": hex(a[2]), "proxy_port": a[3]})
        return (f"bpf_sk_assign failed: {DropReason(a[0]).name} ({where}): the packet is dropped (fail closed)",
                {"result": DropReason(a[0]).name, "socket": sock.name, "mark": hex(a[2]), "proxy_port": a[3]})
    if p == TracePoint.CT_CREATE:
        return (f"conntrack entry created (source identity {a[0]}, {names.rule(a[1])}"
                + (f", proxy port {a[2]}" if a[2] else "") + (", from proxy" if a[3] & abi.CT_F_FROM_PROXY else "") + ")",
                {"src_identity": a[0], "rule_id": a[1], "proxy_port": a[2], "flags": a[3]})
    if p == TracePoint.FROM_PROXY:
        return (f"the L7 proxy's upstream: mark {a[1]:#x} carries source identity {names.identity(a[0])}; "
                "passed without a policy lookup (the proxy checked the request)",
                {"identity": a[0], "mark": hex(a[1])})
    if p == TracePoint.RESULT:
        action = TC_ACTIONS.get(a[0], str(a[0]))
        verdict, reason = FlowVerdict(a[1]).name, DropReason(a[2]).name
        return (f"returned {action}: {verdict}" + (f" ({reason})" if reason != "NONE" else "") + f", mark {a[3]:#x}",
                {"action": action, "verdict": verdict, "reason": reason, "mark": hex(a[3])})
    return p.name, {"args": list(a)}


# --------------------------------------------------------------------------- assembly


def oracle_kernel_verdict(oracle: dict[str, Any]) -> str:
    """The verdict the oracle's L3/L4 walk predicts for the flow's first packet, in the
    datapath's words (FORWARD / DROP / REDIRECT / AUDIT), combined as the datapath combines
    egress and ingress (DROP > REDIRECT > AUDIT > FORWARD)."""
    sides = [oracle.get("egress", "n/a"), oracle.get("ingress", "n/a")]
    drops = any(s == "DENY" or s.startswith("NONE") for s in sides)
    if drops and not oracle.get("audited"):
        return "DROP"
    if "REDIRECT" in sides:
        return "REDIRECT"
    return "AUDIT" if drops else "FORWARD"


def _kernel_decision(packets: list[Packet], names: LabNames) -> dict[str, Any]:
    for pkt in packets:
        ev = pkt.first(TracePoint.DECISION) if pkt.leg == "request" else None
        if ev is None:
            continue
        verdict, reason, direction, _ = _split_decision(ev.args[0])
        decided_by = [f"{d['direction'].lower()} of {names.endpoint(d['endpoint_id'])}: {d['verdict']}"
                      for d in (dict(_decision_text(e.args[0], names, e.args[2], e.args[3], e.args[4])[1],
                                     endpoint_id=e.args[1]) for e in pkt.events if e.point == TracePoint.POLICY_DECISION)]
        return {"verdict": verdict.name, "reason": reason.name, "direction": direction.name,
                "endpoint_id": ev.args[1], "endpoint": names.endpoint(ev.args[1]), "rule_id": ev.args[2], "rule": names.rule(ev.args[2]) if ev.args[2] else None,
                "proxy_port": ev.args[3], "audit": bool(ev.args[4]),
                "where": f"{HOOK_TEXT[pkt.hook][0]} on {names.interface(pkt.ifindex)}",
                "decided_by": "; ".join(decided_by) or "no policy"}
    return {}


def _proxy_json(record: Flow) -> dict[str, Any]:
    if record.http is not None:
        request, answer = f"{record.http.method} {record.http.path}", str(record.http.code)
    elif record.dns is not None:
        request = f"DNS {'/'.join(record.dns.qtypes) or '?'} {record.dns.query}"
        answer = {0: "NOERROR", 3: "NXDOMAIN", 5: "REFUSED", -1: "no answer"}.get(record.dns.rcode, str(record.dns.rcode))
    else:
        request, answer = "?", "?"
    return {"verdict": record.verdict.value, "request": request, "answer": answer, "summary": record.summary,
            "source_identity": record.source.identity, "original_destination": f"{record.destination.ip}:{record.destination.port}",
            "rules": list(record.policy.rules), "policies": list(record.policy.policies), "direction": record.direction.value}


class _Builder:
    def __init__(self, names: LabNames, sources: BpfSources | None) -> None:
        self.names = names
        self.sources = sources
        self.steps: list[TraceStep] = []

    def add(self, phase: str, layer: str, where: str, title: str, detail: dict[str, Any], code: str,
            note: str | None = None) -> TraceStep:
        step = TraceStep(len(self.steps) + 1, layer, where, title, detail, code, note, phase)
        self.steps.append(step)
        return step

    def packet(self, pkt: Packet, phase: str, notes: dict[int, str]) -> None:
        where = f"{HOOK_TEXT[pkt.hook][1]} {self.names.interface(pkt.ifindex)}"
        for ev in pkt.events:
            title, detail = event_step(ev, pkt, self.names)
            code = self.sources.pointer(ev.point, ev.line, ev.hook) if self.sources else f"dataplane/bpf/?:{ev.line}"
            self.add(phase, "kernel", where, title, detail, code, notes.get(id(ev)))


def assemble(*, probe: str, client: tuple[str, int], events: Iterable[TraceEvent], l7_records: Iterable[Flow],
             routing: ProxyRouting | None, oracle: dict[str, Any], names: LabNames, observed: Observation,
             sources: BpfSources | None = None, trace_id: int = 0) -> Trace:
    """The timeline of one traced flow (see the module's docstring for the inputs)."""
    packets = group_packets(events, client, names.node_ip)
    shown, counts = shown_packets(packets)
    kernel = _kernel_decision(packets, names)
    records = [r for r in l7_records if (r.source.ip, r.source.port) == client]
    record = records[0] if records else None
    proxy = _proxy_json(record) if record is not None else None
    disagreements: list[str] = []
    notes: dict[int, str] = {}
    predicted = oracle_kernel_verdict(oracle) if oracle else ""
    if kernel and predicted and kernel["verdict"] != predicted:
        text = f"the oracle predicted {predicted} at L3/L4 (egress {oracle.get('egress')}, ingress {oracle.get('ingress')})"
        disagreements.append(f"kernel {kernel['verdict']}, {text}")
        ev = next((e for pkt in packets if pkt.leg == "request" for e in pkt.events if e.point == TracePoint.DECISION), None)
        if ev is not None:
            notes[id(ev)] = text
    l7_oracle = oracle.get("l7") if oracle else None
    proxy_note = None
    if proxy is not None and l7_oracle is not None:
        oracle_l7 = "forwarded" if l7_oracle.get("allowed") else "denied"
        if proxy["verdict"] != oracle_l7:
            proxy_note = f"the oracle predicted the request {oracle_l7}: {l7_oracle.get('why', '')}"
            disagreements.append(f"proxy {proxy['verdict']}, {proxy_note}")
    if oracle and observed.outcome != oracle.get("outcome"):
        disagreements.append(f"the client saw {observed.outcome}, the oracle predicted {oracle.get('outcome')}")

    b = _Builder(names, sources)
    for pkt in (p for p in shown if p.leg == "request"):
        b.packet(pkt, "request", notes)
    if kernel.get("verdict") == "REDIRECT" and routing is not None:
        _node_steps(b, routing)
    if record is not None:
        _proxy_steps(b, record, proxy or {}, proxy_note)
    elif kernel.get("verdict") == "REDIRECT":
        b.add("proxy", "proxy", "proxy", "no L7 record of this client port: the proxy judged no request of it", {},
              python_pointer("proxy.events", "EventLog.emit"))
    for pkt in (p for p in shown if p.leg in ("upstream", "upstream-reply")):
        b.packet(pkt, "upstream", notes)
    for pkt in (p for p in shown if p.leg == "reply"):
        b.packet(pkt, "reply", notes)
    client_note = next((d for d in disagreements if d.startswith("the client saw")), None)
    b.add("reply", "client", names.addresses.get(client[0], client[0]),
          f"the client saw: {observed.outcome}" + (f" ({observed.detail})" if observed.detail else ""),
          {"outcome": observed.outcome, "detail": observed.detail, "status": observed.status},
          python_pointer("dataplane.probes", "run_probe"), client_note)
    if oracle:
        b.add("reply", "oracle", "policy engine",
              f"the oracle (explain) predicted: {oracle.get('outcome')} (egress {oracle.get('egress')}, "
              f"ingress {oracle.get('ingress')})",
              {k: oracle.get(k) for k in ("outcome", "egress", "ingress", "rule_ids", "audited", "trace")},
              python_pointer("dataplane.policy.engine", "PolicyEngine.verdict"),
              "; ".join(disagreements) or None)
    packet_lines = [{"leg": leg, "kind": kind, "hook": HOOK_TEXT[hook][0], "interface": names.interface(ifindex),
                     "count": n} for (leg, kind, hook, ifindex), n in counts.items()]
    return Trace(probe, client, b.steps, observed.outcome, observed.detail, kernel, oracle, proxy, disagreements,
                 packet_lines, trace_id)


def _node_steps(b: _Builder, routing: ProxyRouting) -> None:
    code = python_pointer("dataplane.topology", "setup_node")
    rule = routing.to_proxy_rule()
    if rule is None:
        b.add("node", "node", "node", "no fwmark rule to the proxy's table: a to-proxy packet would be forwarded, "
              "not delivered to the proxy", routing.to_json(), code)
    else:
        b.add("node", "node", "node", f"ip rule {rule.priority}: fwmark {rule.fwmark:#x}/{rule.fwmask:#x} lookup "
              f"table {rule.table} (the to-proxy mark matches)", {"rule": rule.to_json()}, code)
    route = routing.local_route()
    if route is None:
        b.add("node", "node", "node", f"no local route in table {routing.table}: the packet would not reach "
              "the proxy socket", routing.to_json(), code)
    else:
        b.add("node", "node", "node", f"table {route.table}: local {route.dst} dev {route.dev}: delivered to the "
              "socket bpf_sk_assign chose", {"route": route.to_json()}, code)


def _proxy_steps(b: _Builder, record: Flow, proxy: dict[str, Any], note: str | None) -> None:
    src = f"{record.source.ip}:{record.source.port}"
    dst = proxy["original_destination"]
    dns = record.dns is not None
    datagram = dns and record.l4.protocol == "UDP"  # DNS over TCP arrives as a connection, like HTTP
    accept = python_pointer("proxy.dns", "DnsProxy.handle") if datagram else \
        python_pointer("proxy.server", "ClientConnection.__init__")
    b.add("proxy", "proxy", "proxy", f"{'received the query' if datagram else 'accepted the connection'} from {src}; "
          f"original destination {dst} ({'IP_ORIGDSTADDR' if datagram else 'getsockname()'})",
          {"client": src, "original_destination": dst}, accept)
    b.add("proxy", "proxy", "proxy", f"source identity {b.names.identity(record.source.identity)} derived from the "
          "ipcache of the peer address (never from what the client sends)",
          {"source_identity": record.source.identity, "destination_identity": record.destination.identity},
          python_pointer("proxy.state", "Snapshot.connection"))
    where, _, why = record.summary.partition(": ")
    rule_set = where if where.startswith("L7 ") else f"L7 {record.direction.value or '?'} rules"
    matched = (f"; rule {', '.join(record.policy.rules)}" if record.policy.rules else "") or \
        (f"; policies it failed: {', '.join(record.policy.policies)}" if record.policy.policies else "")
    b.add("proxy", "proxy", "proxy", f"{proxy['request']} against {rule_set}: {why if where.startswith('L7 ') else record.summary}{matched}",
          {"rule_set": rule_set, "why": record.summary, "rules": list(record.policy.rules),
           "rule_ids": list(record.policy.rule_ids), "policies": list(record.policy.policies)},
          python_pointer("l7.decide", "decide"), note)
    if record.verdict.value == "denied":
        title = "answered 403 Access denied; nothing sent upstream" if not dns else "answered REFUSED; nothing sent upstream"
        code = python_pointer("proxy.dns", "DnsProxy.answer") if datagram else \
            python_pointer("proxy.dnstcp", "DnsStream.answer") if dns else python_pointer("proxy.server", "ClientConnection.deny")
    elif record.verdict.value == "forwarded":
        mark = abi.from_proxy_mark(record.source.identity)
        title = (f"forwarded upstream to {dst} from the node, SO_MARK {mark:#x} (from-proxy, identity "
                 f"{record.source.identity}); answer {proxy['answer']}")
        code = python_pointer("proxy.dns", "DnsProxy.ask_upstream") if datagram else \
            python_pointer("proxy.dnstcp", "ask_upstream") if dns else python_pointer("proxy.server", "ClientConnection.connect")
    else:
        title, code = f"error: {record.summary} (answer {proxy['answer']})", python_pointer("proxy.server", "ClientConnection.refuse")
    b.add("proxy", "proxy", "proxy", title, {"verdict": record.verdict.value, "answer": proxy["answer"]}, code)


# --------------------------------------------------------------------------- hint


def _hint(trace: Trace) -> str:
    k, proxy, oracle = trace.kernel, trace.proxy, trace.oracle
    if trace.disagreements:
        return (f"The oracle and the lab disagree ({trace.disagreements[0]}): compare `l7lab explain` with the "
                "trace steps above; one of them is wrong.")
    if not k:
        return "The datapath reported nothing for this flow: it never left the pod, or tracing is compiled out."
    reason = k.get("reason", "NONE")
    decided = k.get("decided_by", "")
    if k["verdict"] == "DROP":
        if reason == "POLICY_DENIED":
            side = f"{k['direction'].lower()} of {k['endpoint']}"
            return (f"No policy entry allows this flow and the {side} enforces policy (default deny): "
                    f"allow it in a policy that selects {k['endpoint']} in that direction.")
        if reason == "POLICY_EXPLICIT_DENY":
            return f"An explicit deny matched ({k.get('rule') or decided}); deny wins over every allow."
        if reason in ("PROXY_SOCKET_MISSING", "PROXY_ASSIGN_FAILED"):
            return "The flow was redirected to the L7 proxy but no proxy socket took it: redirected flows fail closed."
        return f"The datapath dropped the packet ({reason})."
    if k["verdict"] == "AUDIT":
        return (f"The flow would have been dropped ({reason}, {decided}) but audit mode let it pass: "
                "enforcing now would break it.")
    if proxy is not None:
        if proxy["verdict"] == "denied":
            kind = "DNS rule (toPorts.rules.dns)" if proxy["request"].startswith("DNS") else "HTTP rule (toPorts.rules.http)"
            return (f"L3/L4 allowed the flow to the L7 proxy, which refused {proxy['request']}: no {kind} "
                    f"of the rule set matches it ({proxy['summary']}).")
        if proxy["verdict"] == "forwarded":
            return f"The L7 proxy allowed {proxy['request']} ({', '.join(proxy['rules']) or proxy['summary']}) and forwarded it."
        return f"The L7 proxy answered with an error: {proxy['summary']}."
    if trace.outcome == "refused":
        return "Policy let the flow through, but nothing listens on that port: the destination refused it."
    rule = k.get("rule")
    return f"Allowed at L3/L4 ({decided})" + (f" by {rule}." if rule else ".") + \
        ("" if oracle else " (no oracle decision to compare)")
