"""The flow record: one typed shape for everything a lab reports about its traffic.

Modelled on Hubble's `flow.Flow`: the kernel-event decoder (`dataplane/flows.py`, one record
per new-flow verdict and per drop at the tc hooks) and the L7 proxy (`proxy/events.py`, one
record per HTTP request or DNS question) both build a `Flow`; renderers
(`dataplane/flowrender.py`, `dataplane/hubble.py`) turn it into JSON lines or Hubble's flows,
and `from_json` reads it back. The agent's notes about the L7 proxy process (exited,
restarted) are `ProxyEvent`s, Hubble's "agent events".

This module is plain data: it imports neither rich, nor bcc, nor the policy engine, so the
proxy process builds its records with it. The JSON shape is documented in
docs/observability.md; `to_json`/`from_json` are each other's inverse (tests/unit/test_flows.py).

Verdict words: an L3_L4 record says what the datapath did (FORWARD, DROP, REDIRECT, AUDIT, the
names of `dataplane.abi.FlowVerdict`), an L7 record what the proxy did with the request
(forwarded, denied, error). These are the words `observe`, the metrics' labels and the
scenarios have always shown, so they stay.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from l7.dns import DnsFlow
from l7.http import HttpFlow


class FlowType(str, enum.Enum):
    L3_L4 = "L3_L4"  # a packet verdict at a tc hook
    L7 = "L7"  # a request the proxy judged


class Verdict(str, enum.Enum):
    # L3_L4: what the datapath did with the flow's packet
    FORWARD = "FORWARD"
    DROP = "DROP"
    REDIRECT = "REDIRECT"  # handed to the L7 proxy
    AUDIT = "AUDIT"  # would have been dropped; passed because of audit mode
    # L7: what the proxy did with the request
    FORWARDED = "forwarded"
    DENIED = "denied"  # 403 (HTTP) or REFUSED (DNS) by policy
    ERROR = "error"  # malformed, over a limit, or no answer upstream


class TrafficDirection(str, enum.Enum):
    """Whose policy decided: the source's egress or the destination's ingress."""

    INGRESS = "ingress"
    EGRESS = "egress"
    UNKNOWN = ""  # an L7 record refused before any rule set applied


class TracePoint(str, enum.Enum):
    """Where the record was observed."""

    FROM_ENDPOINT = "from-endpoint"  # tc ingress on the node side: leaving a pod or world host
    TO_ENDPOINT = "to-endpoint"  # tc egress on the node side: entering a pod
    PROXY = "proxy"  # the L7 proxy


@dataclass(frozen=True)
class Endpoint:
    """One side of a flow. Names and labels are those in force when the record was made."""

    ip: str
    port: int = 0
    identity: int = 0  # 0: unknown (a record the proxy made before it could look it up)
    namespace: str = ""  # a pod's namespace; "" for anything that is not a pod
    pod: str = ""  # a pod's name
    host: str = ""  # a world host's name, or "node" for the lab node's own stack
    labels: dict[str, str] = field(default_factory=dict)  # the identity's labels (pods)
    endpoint_id: int = 0  # the lab endpoint's id (a pod's); 0 for anything else, or unknown
    dns_names: tuple[str, ...] = ()  # a world host's DNS names, as the scenario gives them

    @property
    def name(self) -> str:
        """'namespace/pod', a world host's name, 'node', or '' when the address is nobody's."""
        return f"{self.namespace}/{self.pod}" if self.namespace else self.host

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "port": self.port, "identity": self.identity, "namespace": self.namespace,
                "pod": self.pod, "host": self.host, "labels": dict(sorted(self.labels.items())),
                "endpoint_id": self.endpoint_id, "dns_names": list(self.dns_names)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Endpoint":
        return cls(str(data.get("ip", "")), int(data.get("port") or 0), int(data.get("identity") or 0),
                   str(data.get("namespace", "")), str(data.get("pod", "")), str(data.get("host", "")),
                   {str(k): str(v) for k, v in (data.get("labels") or {}).items()}, int(data.get("endpoint_id") or 0),
                   tuple(str(n) for n in data.get("dns_names") or ()))


@dataclass(frozen=True)
class Icmp:
    """The ICMP header of the packet that made an ICMP record (Hubble's l4.ICMPv4 {type, code}),
    with the echo id of an echo request or reply (0 for other types)."""

    type: int
    code: int = 0
    echo_id: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "echo_id": self.echo_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Icmp":
        return cls(int(data.get("type", 0)), int(data.get("code", 0)), int(data.get("echo_id", 0)))


@dataclass(frozen=True)
class L4:
    protocol: str  # TCP, UDP, ICMP, SCTP, or the number as text
    tcp_flags: tuple[str, ...] = ()  # SYN, ACK, FIN, RST, PSH of the packet that made the record
    icmp: Icmp | None = None  # ICMP records: type and code (ICMP has no ports)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol, "tcp_flags": list(self.tcp_flags)}
        if self.icmp is not None:
            out["icmp"] = self.icmp.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "L4":
        icmp = data.get("icmp")
        return cls(str(data.get("protocol", "")), tuple(str(f) for f in data.get("tcp_flags", ())),
                   Icmp.from_json(icmp) if isinstance(icmp, dict) else None)


@dataclass(frozen=True)
class PolicyAttribution:
    """The policy rules behind the verdict: for L3_L4 the rule of the map entry that decided;
    for L7 the rules that allowed the request, or (denied) the policies whose rules it failed."""

    rule_ids: tuple[int, ...] = ()
    policies: tuple[str, ...] = ()  # "Kind namespace/name" (or "Kind name" cluster-wide)
    rules: tuple[str, ...] = ()  # "Kind namespace/name section[index]", e.g. "... ingress[0]"

    def to_json(self) -> dict[str, Any]:
        return {"rule_ids": list(self.rule_ids), "policies": list(self.policies), "rules": list(self.rules)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PolicyAttribution":
        return cls(tuple(int(i) for i in data.get("rule_ids", ())), tuple(str(p) for p in data.get("policies", ())),
                   tuple(str(r) for r in data.get("rules", ())))


@dataclass(frozen=True)
class L7:
    """The application part of an L7 record: exactly one of `http` and `dns` is set."""

    latency_ms: float = 0.0  # from the first byte of the request to the answer's record
    http: HttpFlow | None = None
    dns: DnsFlow | None = None
    latency_ns: int = 0  # the same latency in nanoseconds (Hubble's unit); derived from latency_ms when 0

    def __post_init__(self) -> None:
        if not self.latency_ns and self.latency_ms:
            object.__setattr__(self, "latency_ns", round(self.latency_ms * 1e6))

    @property
    def protocol(self) -> str:
        """'HTTP', 'DNS', or '' for a request too broken to say (the metrics' protocol label)."""
        if self.dns is not None:
            return "DNS"
        return self.http.protocol.split("/")[0] if self.http is not None else ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"latency_ms": self.latency_ms, "latency_ns": self.latency_ns}
        if self.http is not None:
            out["http"] = self.http.to_json()
        if self.dns is not None:
            out["dns"] = self.dns.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "L7":
        return cls(float(data.get("latency_ms", 0.0)),
                   HttpFlow.from_json(data["http"]) if data.get("http") is not None else None,
                   DnsFlow.from_json(data["dns"]) if data.get("dns") is not None else None,
                   int(data.get("latency_ns") or 0))


@dataclass(frozen=True)
class Flow:
    time: float  # unix seconds (kernel timestamps are converted from CLOCK_MONOTONIC)
    type: FlowType
    verdict: Verdict
    source: Endpoint
    destination: Endpoint
    l4: L4
    direction: TrafficDirection = TrafficDirection.UNKNOWN
    trace_point: TracePoint = TracePoint.FROM_ENDPOINT
    drop_reason: str = ""  # L3_L4: a `dataplane.abi.DropReason` name ("NONE" if not dropped)
    summary: str = ""  # L7: why the proxy decided so, in words
    policy: PolicyAttribution = field(default_factory=PolicyAttribution)
    proxy_port: int = 0  # L3_L4 REDIRECT: the proxy's port
    bytes: int = 0  # L3_L4: length of the packet that made the record
    l7: L7 | None = None
    # L3_L4: what the deciding map entry names, as Cilium's policy verdicts number it
    # (POLICY_MATCH_* in dataplane/hubble.py): 0 none (no entry; default deny or allow), 1 L3
    # only (a peer identity, any port), 2 L3-L4 (peer and port), 3 L4 only (any peer, a port),
    # 4 all (any peer, any port), 5 L3-Proto, 6 Proto-Only (a protocol with any port)
    policy_match_type: int = 0
    ifindex: int = 0  # L3_L4: the interface of the hook that made the record
    # L3_L4: the L7 proxy's upstream connection (the datapath's FLOW_EVENT_F_FROM_PROXY): it
    # skipped policy, as in Cilium, so the record decides nothing (no rule, match type 0)
    from_proxy: bool = False
    # L3_L4: whether the deciding endpoint enforced policy in the record's direction when it was
    # made (a pod no policy selects there enforces nothing: Cilium sends no policy verdict for it)
    policy_enforced: bool = True
    # L3_L4 new flow between two local pods: the rule that allowed it in the other direction
    # (the source's egress when the record is about the destination's ingress, and the reverse),
    # so a flow both sides' policies allowed names both, as Hubble's *_allowed_by do
    other_direction_policy: PolicyAttribution = field(default_factory=PolicyAttribution)

    @property
    def http(self) -> HttpFlow | None:
        return self.l7.http if self.l7 is not None else None

    @property
    def dns(self) -> DnsFlow | None:
        return self.l7.dns if self.l7 is not None else None

    @property
    def deciding_endpoint(self) -> Endpoint | None:
        """The pod whose policy gave the verdict (egress: the source, ingress: the destination)."""
        ep = {TrafficDirection.EGRESS: self.source, TrafficDirection.INGRESS: self.destination}.get(self.direction)
        return ep if ep is not None and ep.namespace else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": self.time, "type": self.type.value, "verdict": self.verdict.value,
            "drop_reason": self.drop_reason, "summary": self.summary, "direction": self.direction.value,
            "trace_point": self.trace_point.value, "l4": self.l4.to_json(),
            "source": self.source.to_json(), "destination": self.destination.to_json(),
            "policy": self.policy.to_json(), "proxy_port": self.proxy_port, "bytes": self.bytes,
            "policy_match_type": self.policy_match_type, "ifindex": self.ifindex,
            "from_proxy": self.from_proxy, "policy_enforced": self.policy_enforced,
        }
        if self.other_direction_policy.policies:
            out["other_direction_policy"] = self.other_direction_policy.to_json()
        if self.l7 is not None:
            out["l7"] = self.l7.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Flow":
        """Inverse of `to_json`; raises ValueError (or KeyError, TypeError) on what is not a flow."""
        return cls(
            float(data["time"]), FlowType(data["type"]), Verdict(data["verdict"]),
            Endpoint.from_json(data.get("source") or {}), Endpoint.from_json(data.get("destination") or {}),
            L4.from_json(data.get("l4") or {}), TrafficDirection(data.get("direction", "")),
            TracePoint(data.get("trace_point", TracePoint.FROM_ENDPOINT.value)), str(data.get("drop_reason", "")),
            str(data.get("summary", "")), PolicyAttribution.from_json(data.get("policy") or {}),
            int(data.get("proxy_port", 0)), int(data.get("bytes", 0)),
            L7.from_json(data["l7"]) if data.get("l7") is not None else None,
            int(data.get("policy_match_type") or 0), int(data.get("ifindex") or 0),
            bool(data.get("from_proxy", False)), bool(data.get("policy_enforced", True)),
            PolicyAttribution.from_json(data.get("other_direction_policy") or {}))


PROXY_EVENT_TYPE = "PROXY"


@dataclass(frozen=True)
class ProxyEvent:
    """The agent's note that the L7 proxy process exited, failed to restart or was restarted."""

    time: float
    event: str  # "exited", "restart failed", "restarted"
    detail: str
    pid: int | None = None

    @property
    def type(self) -> str:
        return PROXY_EVENT_TYPE

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "type": PROXY_EVENT_TYPE, "event": self.event, "detail": self.detail,
                "pid": self.pid}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ProxyEvent":
        pid = data.get("pid")
        return cls(float(data["time"]), str(data.get("event", "")), str(data.get("detail", "")),
                   int(pid) if pid is not None else None)


Record = Flow | ProxyEvent


def record_type(record: Record) -> str:
    """'L3_L4', 'L7' or 'PROXY': the record's `type` as its JSON says it."""
    return record.type.value if isinstance(record, Flow) else PROXY_EVENT_TYPE


def record_from_json(data: Any) -> Record | None:
    """A line of flows.jsonl or l7-events.jsonl read back; None for anything that is not a
    record of this format (a torn or foreign line is skipped, never a reason to stop reading)."""
    if not isinstance(data, dict):
        return None
    try:
        if data.get("type") == PROXY_EVENT_TYPE:
            return ProxyEvent.from_json(data)
        return Flow.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
