"""Flow records in Hubble's shape: the one mapping from l7lab's `Flow` to Hubble flow dicts, the
vocabulary it speaks (verdicts, drop reasons, trace points, event types, policy match types,
mirrored from Cilium), and the text Hubble and `cilium monitor` print for a flow.

    hubble_flows(record, node_name)  the Hubble flows of one l7lab record (docs/observe.md says
                                     which and why), each a dict in the JSON names of Cilium's
                                     `flow.Flow` (api/v1/flow/flow.proto) as `hubble observe
                                     -o json` prints them: protojson with the proto field names,
                                     so zero values (0, "", false, [], an enum's 0) are left out,
                                     64-bit numbers (latency_ns) are strings
    jsonpb(flow)                     the `{"flow": ..., "node_name": ..., "time": ...}` line of
                                     `hubble observe -o jsonpb` (and of current Hubble's `-o json`)
    compact(flow) / dict_text(flow)  `hubble observe`'s default one-line form / its `-o dict` block

`dataplane/ciliummonitor.py` writes the line `cilium monitor` prints for the same events.

l7lab keeps its files in its own record format (docs/observability.md); Hubble's shape is a
renderer over it, like `describe`. A flow dict is plain data: readers use `.get()` for fields
protojson leaves out. Names and numbers below are Cilium's (pkg/monitor/api, flow.proto); where
l7lab's own word differs, the row says why.
"""

from __future__ import annotations

import datetime
from typing import Any

from .abi import IDENTITY_FIRST_CIDR, IDENTITY_WORLD
from .flowrecord import Endpoint, Flow, FlowType, TrafficDirection, Verdict
from .icmp import type_code_text

# -- event types (pkg/monitor/api/types.go MessageType*; `hubble observe --type NAME`) ----------
EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_L7 = 129  # MessageTypeAccessLog
EVENT_AGENT = 130  # MessageTypeAgent: l7lab's notes about its L7 proxy
# every MessageTypeNames entry `--type` takes, the ones l7lab never gives included
EVENT_TYPE_NAMES = {EVENT_DROP: "drop", 2: "debug", 3: "capture", EVENT_TRACE: "trace",
                    EVENT_POLICY_VERDICT: "policy-verdict", 7: "trace-sock", EVENT_L7: "l7", EVENT_AGENT: "agent"}

# -- verdicts (flow.proto Verdict) ---------------------------------------------------------------
FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED = "FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED"
VERDICTS = ("VERDICT_UNKNOWN", FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, "TRACED", "TRANSLATED")  # by number
# l7lab's record verdict -> Hubble's verdict of the policy-verdict / L7 request flow
VERDICT_OF = {Verdict.FORWARD: FORWARDED, Verdict.REDIRECT: REDIRECTED, Verdict.AUDIT: AUDIT, Verdict.DROP: DROPPED,
              Verdict.FORWARDED: FORWARDED, Verdict.DENIED: DROPPED, Verdict.ERROR: ERROR}
# accesslog.FlowVerdict words, as `cilium monitor` prints an L7 record
MONITOR_L7_VERDICTS = {FORWARDED: "Forwarded", DROPPED: "Denied", ERROR: "Error", REDIRECTED: "Redirected"}
# a policy verdict's verdict -> (the action `cilium monitor` prints (GetPolicyActionString),
# the word of Hubble's VERDICT column)
POLICY_ACTIONS: dict[str, tuple[str, str]] = {FORWARDED: ("allow", "ALLOWED"), REDIRECTED: ("redirect", "ALLOWED"),
                                              DROPPED: ("deny", "DENIED"), ERROR: ("deny", "DENIED"),
                                              AUDIT: ("audit", "AUDITED")}

# -- trace observation points: flow.proto name -> (the event's sub_type, the name Hubble prints) ---
# (pkg/monitor/api/types.go Trace*). The proto numbers TO_ENDPOINT 101, not 0, so that protojson
# never leaves it out; the event's sub_type stays 0.
TRACE_POINTS: dict[str, tuple[int, str]] = {
    "TO_ENDPOINT": (0, "to-endpoint"), "TO_PROXY": (1, "to-proxy"), "TO_HOST": (2, "to-host"),
    "TO_STACK": (3, "to-stack"), "TO_OVERLAY": (4, "to-overlay"), "FROM_ENDPOINT": (5, "from-endpoint"),
    "FROM_PROXY": (6, "from-proxy"), "FROM_HOST": (7, "from-host"), "FROM_STACK": (8, "from-stack"),
    "FROM_OVERLAY": (9, "from-overlay"), "FROM_NETWORK": (10, "from-network"), "TO_NETWORK": (11, "to-network"),
    "FROM_CRYPTO": (12, "from-crypto"), "TO_CRYPTO": (13, "to-crypto"),
}
TRACE_POINT_OF_SUBTYPE = {number: name for name, (number, _) in TRACE_POINTS.items()}


def trace_point_text(sub_type: int) -> str:
    """The name Hubble prints for a trace event's sub_type ('to-endpoint'), else the number."""
    point = TRACE_POINT_OF_SUBTYPE.get(sub_type)
    return TRACE_POINTS[point][1] if point else str(sub_type)

# -- drop reasons: Hubble name -> (number, `cilium monitor` text) (flow.proto DropReason,
# pkg/monitor/api/drop.go); only those l7lab's datapath gives
DROP_REASONS: dict[str, tuple[int, str]] = {
    "INVALID_SOURCE_IP": (132, "Invalid source ip"),
    "POLICY_DENIED": (133, "Policy denied"),
    "INVALID_PACKET_DROPPED": (134, "Invalid packet"),
    "UNSUPPORTED_L3_PROTOCOL": (139, "Unsupported L3 protocol"),
    "IP_FRAGMENTATION_NOT_SUPPORTED": (157, "IP fragmentation not supported"),
    "NO_SERVICE": (158, "Service backend not found"),
    "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND": (175, "First logical datagram fragment not found"),
    "SOCKET_LOOKUP_FAILED": (178, "Socket lookup failed"),
    "SOCKET_ASSIGN_FAILED": (179, "Socket assign failed"),
    "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL": (180, "Proxy redirection not supported for protocol"),
    "POLICY_DENY": (181, "Policy denied by denylist"),
}
DROP_REASON_OF_NUMBER = {number: name for name, (number, _) in DROP_REASONS.items()}
# l7lab's datapath reason (dataplane/abi.py DropReason) -> Hubble's name
ABI_DROP_REASONS: dict[str, str] = {
    "POLICY_DENIED": "POLICY_DENIED",  # no entry matched where the direction is enforced
    "POLICY_EXPLICIT_DENY": "POLICY_DENY",  # Cilium's name for a drop by a deny rule
    "PROXY_SOCKET_MISSING": "SOCKET_LOOKUP_FAILED",  # Cilium's DROP_PROXY_LOOKUP_FAILED: no proxy listener
    "PROXY_ASSIGN_FAILED": "SOCKET_ASSIGN_FAILED",  # Cilium's DROP_PROXY_SET_FAILED: bpf_sk_assign refused
    "MALFORMED_L2": "INVALID_PACKET_DROPPED",  # Cilium's DROP_INVALID covers every truncated header
    "MALFORMED_L3": "INVALID_PACKET_DROPPED",
    "MALFORMED_L4": "INVALID_PACKET_DROPPED",
    "UNSUPPORTED_L3": "UNSUPPORTED_L3_PROTOCOL",  # l7lab also counts IPv6 here: it has no IPv6 datapath
    "FRAGMENT": "IP_FRAGMENTATION_NOT_SUPPORTED",  # l7lab: a fragment of a flow redirected to the proxy
    "SOURCE_SPOOFED": "INVALID_SOURCE_IP",  # the source is not the address bound to the interface
    "PROXY_NOT_AT_EGRESS": "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL",  # l7lab: node traffic cannot be redirected
    "FRAGMENT_UNKNOWN": "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
    "NO_SERVICE_BACKEND": "NO_SERVICE",  # Cilium's DROP_NO_SERVICE: a service address without backends
}
POLICY_DROP_REASONS = ("POLICY_DENIED", "POLICY_EXPLICIT_DENY")  # the drops a policy verdict decides

# -- policy match types (pkg/monitor/api/types.go PolicyMatch*; the record's policy_match_type) --
POLICY_MATCH_NONE, POLICY_MATCH_L3_ONLY, POLICY_MATCH_L3_L4, POLICY_MATCH_L4_ONLY = 0, 1, 2, 3
POLICY_MATCH_ALL, POLICY_MATCH_L3_PROTO, POLICY_MATCH_PROTO_ONLY = 4, 5, 6
POLICY_MATCH_NAMES = {POLICY_MATCH_NONE: "none", POLICY_MATCH_L3_ONLY: "L3-Only", POLICY_MATCH_L3_L4: "L3-L4",
                      POLICY_MATCH_L4_ONLY: "L4-Only", POLICY_MATCH_ALL: "all", POLICY_MATCH_L3_PROTO: "L3-Proto",
                      POLICY_MATCH_PROTO_ONLY: "Proto-Only"}


def policy_match_type(names_peer: bool, names_protocol: bool, names_port: bool) -> int:
    """The match type of a map entry that names a peer identity and/or a protocol and/or a port
    (a port implies a protocol), as Cilium's datapath reports it."""
    if names_peer:
        return POLICY_MATCH_L3_L4 if names_port else POLICY_MATCH_L3_PROTO if names_protocol else POLICY_MATCH_L3_ONLY
    return POLICY_MATCH_L4_ONLY if names_port else POLICY_MATCH_PROTO_ONLY if names_protocol else POLICY_MATCH_ALL


# -- reserved identities (pkg/identity/numericidentity.go), as the printer names them ----------
RESERVED_IDENTITY_NAMES = {0: "unknown", 1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init",
                           6: "remote-node", 7: "kube-apiserver", 8: "ingress", 9: "world-ipv4", 10: "world-ipv6"}

# DNS RCODE names, as Hubble's summary (gopacket's DNSResponseCode.String) and its DNS metric's
# rcode label (pkg/hubble/metrics/dns/rcode.go) write them
DNS_RCODE_TEXT = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
                  4: "Not Implemented", 5: "Query Refused", 6: "Name Exists when it should not",
                  7: "RR Set Exists when it should not", 8: "RR Set that should exist does not",
                  9: "Not Authorized", 10: "Name not contained in zone", 11: "DSO-TYPE Not Implemented",
                  16: "Bad OPT Version", 17: "Key not recognized", 18: "Signature out of time window",
                  19: "Bad TKEY Mode", 20: "Duplicate key name", 21: "Algorithm not supported",
                  22: "Bad Truncation", 23: "Bad/missing Server Cookie"}
DNS_OBSERVATION_SOURCE = "proxy"  # every l7lab DNS record comes from its DNS proxy


def node_name(lab: str) -> str:
    """The node_name of a lab's flows: Hubble writes "<cluster>/<node>"; a lab is both."""
    return f"l7lab/{lab}"


# --------------------------------------------------------------------------- small pieces


def rfc3339(unix: float) -> str:
    """protojson's Timestamp: UTC, 0, 3, 6 or 9 fraction digits, a final Z."""
    micros = round(unix * 1_000_000)
    when = datetime.datetime.fromtimestamp(micros // 1_000_000, datetime.timezone.utc)
    frac = micros % 1_000_000
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += f".{frac // 1000:03d}" if frac % 1000 == 0 else f".{frac:06d}"
    return text + "Z"


def _drop_reason(flow: Flow) -> str:
    return ABI_DROP_REASONS.get(flow.drop_reason, "DROP_REASON_UNKNOWN")


def policy_ref(text: str) -> dict[str, Any]:
    """A record's "Kind namespace/name" (or cluster-wide "Kind name") as Hubble's flow.Policy,
    with the labels Cilium derives a policy's rules from. l7lab has no policy revisions: the
    revision is left out (protojson's 0)."""
    kind, _, ref = text.partition(" ")
    namespace, _, name = ref.rpartition("/")
    labels = [f"k8s:io.cilium.k8s.policy.derived-from={kind}", f"k8s:io.cilium.k8s.policy.name={name}"]
    if namespace:
        labels.append(f"k8s:io.cilium.k8s.policy.namespace={namespace}")
    return _pruned({"name": name, "namespace": namespace, "kind": kind, "labels": labels})


def workload_name(labels: dict[str, str], pod: str) -> str:
    """Lab pods have no controller: the workload is named by the pod's app.kubernetes.io/name or
    app label, else by the pod itself (kind "Pod")."""
    return labels.get("app.kubernetes.io/name") or labels.get("app") or pod


def _endpoint(ep: Endpoint) -> dict[str, Any]:
    if ep.namespace:
        labels = sorted(f"k8s:{k}={v}" for k, v in ep.labels.items())
        return _pruned({"ID": ep.endpoint_id, "identity": ep.identity, "namespace": ep.namespace, "labels": labels,
                        "pod_name": ep.pod, "workloads": [{"name": workload_name(ep.labels, ep.pod), "kind": "Pod"}]})
    identity = ep.identity
    if identity and identity in RESERVED_IDENTITY_NAMES:
        labels = [f"reserved:{RESERVED_IDENTITY_NAMES[identity]}"]
    elif ep.host and ep.host != "node" or identity >= IDENTITY_FIRST_CIDR:
        labels = ["reserved:world"]  # a world host: world, the lab's CIDR identity, or one the proxy could not tell
        identity = identity or IDENTITY_WORLD
    else:
        labels = []  # the node's own stack carrying a pod's identity (the proxy's upstream leg)
    return _pruned({"identity": identity, "labels": labels})


def _names(ep: Endpoint) -> list[str]:
    """A world host's DNS names (Hubble's source_names / destination_names), else its name in
    the lab (a host the scenario gives no DNS name)."""
    if ep.namespace or not ep.host or ep.host == "node":
        return []
    return list(ep.dns_names) or [ep.host]


def _pruned(data: dict[str, Any]) -> dict[str, Any]:
    """protojson leaves out zero values: 0, "", False, empty lists and messages."""
    return {k: v for k, v in data.items() if v not in (0, "", None, [], {}) or v is True}


def _l4(flow: Flow, reply: bool) -> dict[str, Any]:
    sport, dport = flow.source.port, flow.destination.port
    if reply:
        sport, dport = dport, sport
    proto = flow.l4.protocol
    if proto == "TCP":
        tcp = _pruned({"source_port": sport, "destination_port": dport})
        if flow.type == FlowType.L3_L4:  # a packet's header; an L7 record has no packet
            tcp["flags"] = {name: True for name in flow.l4.tcp_flags}
        return {"TCP": tcp}
    if proto in ("UDP", "SCTP"):
        return {proto: _pruned({"source_port": sport, "destination_port": dport})}
    if proto == "ICMP":
        icmp = flow.l4.icmp
        return {"ICMPv4": _pruned({"type": icmp.type, "code": icmp.code}) if icmp is not None else {}}
    return {}


def _tcp_flags_text(flow: Flow) -> str:
    """gopacket's order, as Hubble's summary and the monitor write flags."""
    order = ("SYN", "ACK", "RST", "FIN", "PSH")
    return ", ".join(f for f in order if f in flow.l4.tcp_flags)


def _l3_l4_summary(flow: Flow) -> str:
    if flow.l4.protocol == "TCP":
        return "TCP Flags: " + _tcp_flags_text(flow)
    if flow.l4.protocol == "ICMP" and flow.l4.icmp is not None:
        return "ICMPv4 " + type_code_text(flow.l4.icmp.type, flow.l4.icmp.code)
    return {"ICMP": "ICMPv4", "UDP": "UDP", "SCTP": "SCTP"}.get(flow.l4.protocol, "IPv4")


def _policies(flow: Flow, denied: bool) -> dict[str, Any]:
    """The record's policies under the field of its direction: *_allowed_by, or *_denied_by;
    and the policies that allowed it in the other direction under that one's *_allowed_by (a
    flow between two local pods is judged by the source's egress and the destination's ingress)."""
    if flow.direction == TrafficDirection.UNKNOWN:
        return {}
    out: dict[str, Any] = {}
    if flow.policy.policies:
        out[f"{flow.direction.value}_{'denied' if denied else 'allowed'}_by"] = [policy_ref(p) for p in flow.policy.policies]
    if flow.other_direction_policy.policies:
        other = "ingress" if flow.direction == TrafficDirection.EGRESS else "egress"
        out[f"{other}_allowed_by"] = [policy_ref(p) for p in flow.other_direction_policy.policies]
    return out


# --------------------------------------------------------------------------- the mapping


def _base(flow: Flow, node: str, *, reply: bool = False) -> dict[str, Any]:
    src, dst = (flow.destination, flow.source) if reply else (flow.source, flow.destination)
    out: dict[str, Any] = {
        "time": rfc3339(flow.time),
        "IP": {"source": src.ip, "destination": dst.ip, "ipVersion": "IPv4"},
        "l4": _l4(flow, reply),
        "source": _endpoint(src), "destination": _endpoint(dst),
        "Type": flow.type.value, "node_name": node,
    }
    if _names(src):
        out["source_names"] = _names(src)
    if _names(dst):
        out["destination_names"] = _names(dst)
    return out


def _direction(flow: Flow) -> dict[str, Any]:
    return {"traffic_direction": flow.direction.name} if flow.direction != TrafficDirection.UNKNOWN else {}


def _policy_verdict(flow: Flow, node: str) -> dict[str, Any]:
    verdict = VERDICT_OF[flow.verdict]
    out = _base(flow, node)
    out["verdict"] = verdict
    if verdict == DROPPED:
        out["drop_reason"], out["drop_reason_desc"] = DROP_REASONS[_drop_reason(flow)][0], _drop_reason(flow)
    out["event_type"] = {"type": EVENT_POLICY_VERDICT}
    out.update(_direction(flow))
    if flow.policy_match_type:
        out["policy_match_type"] = flow.policy_match_type
    if verdict != DROPPED:
        out["is_reply"] = False  # Cilium: a policy verdict is the first packet of a connection
    out["Summary"] = _l3_l4_summary(flow)
    out.update(_policies(flow, denied=verdict in (DROPPED, AUDIT)))
    return out


def _drop(flow: Flow, node: str) -> dict[str, Any]:
    reason = _drop_reason(flow)
    number = DROP_REASONS.get(reason, (0, ""))[0]
    out = _base(flow, node)
    out.update({"verdict": DROPPED})
    if number:
        out["drop_reason"], out["drop_reason_desc"] = number, reason
    out["event_type"] = _pruned({"type": EVENT_DROP, "sub_type": number})
    out.update(_direction(flow))
    if flow.ifindex:  # Hubble fills interface for traces only; l7lab knows it for drops too
        out["interface"] = {"index": flow.ifindex}
    out["Summary"] = _l3_l4_summary(flow)  # is_reply is left out: Hubble cannot tell for drops
    return out


def _trace(flow: Flow, node: str) -> dict[str, Any]:
    if flow.verdict == Verdict.REDIRECT:
        point = "TO_PROXY"
    elif flow.destination.namespace:
        point = "TO_ENDPOINT"
    else:
        point = "TO_STACK"  # to a world host or the node: out of the endpoint's reach
    # Hubble's trace direction: the endpoint that reports it is the source (egress) or not (ingress)
    if point == "TO_PROXY":
        direction = flow.direction.name
    else:
        direction = "INGRESS" if point == "TO_ENDPOINT" else "EGRESS"
    out = _base(flow, node)
    out["verdict"] = FORWARDED
    out["event_type"] = _pruned({"type": EVENT_TRACE, "sub_type": TRACE_POINTS[point][0]})
    out["traffic_direction"] = direction
    out["trace_observation_point"] = point
    out["is_reply"] = False
    if flow.ifindex:
        out["interface"] = {"index": flow.ifindex}
    if point == "TO_PROXY" and flow.proxy_port:
        out["proxy_port"] = flow.proxy_port
    out["Summary"] = _l3_l4_summary(flow)
    return out


def _l7(flow: Flow, node: str, response: bool) -> dict[str, Any]:
    assert flow.l7 is not None
    out = _base(flow, node, reply=response)
    # The request's verdict is the proxy's; a response is one the proxy sent to the client, its
    # own 403 and REFUSED included, as Cilium's Envoy logs the 403 it answers a denied request with.
    out["verdict"] = FORWARDED if response else VERDICT_OF[flow.verdict]
    l7: dict[str, Any] = {"type": "RESPONSE" if response else "REQUEST"}
    if response and flow.l7.latency_ns:
        l7["latency_ns"] = str(flow.l7.latency_ns)
    if flow.dns is not None:
        dns = flow.dns
        query = f"{dns.query}." if dns.query else ""
        record: dict[str, Any] = {"query": query, "observation_source": DNS_OBSERVATION_SOURCE,
                                  "qtypes": list(dns.qtypes)}
        if response:
            record.update({"ips": list(dns.ips), "ttl": dns.ttl, "cnames": [f"{c}." for c in dns.cnames],
                           "rcode": dns.rcode, "rrtypes": list(dns.rrtypes)})
        l7["dns"] = _pruned(record)
        summary = _dns_summary(flow, response)
    else:
        http = flow.http
        record = {"method": http.method, "url": http.url, "protocol": http.protocol,
                  "headers": [{"key": k, "value": v} for k, v in http.headers]} if http is not None else {}
        if response and http is not None:
            record = {"code": http.code, **record}
        l7["http"] = _pruned(record)
        summary = _http_summary(flow, response)
    out["l7"] = l7
    out["event_type"] = {"type": EVENT_L7}
    out.update(_direction(flow))
    out["is_reply"] = response
    if response:
        out["reply"] = True  # the deprecated twin of is_reply, still filled by Hubble
    out["Summary"] = summary
    if not response:  # l7lab names the policies behind a request; Cilium's L7 flows leave these empty
        out.update(_policies(flow, denied=flow.verdict == Verdict.DENIED))
    return out


def _http_summary(flow: Flow, response: bool) -> str:
    http = flow.http
    if http is None:
        return ""
    request = f"{http.method} {http.url}"
    if not response:
        return f"{http.protocol} {request}"
    assert flow.l7 is not None
    return f"{http.protocol} {http.code} {flow.l7.latency_ns // 1_000_000}ms ({request})"


def _dns_summary(flow: Flow, response: bool) -> str:
    dns = flow.dns
    assert dns is not None
    query, qtypes = f"{dns.query}." if dns.query else "", ",".join(dns.qtypes)
    if not response:
        return f"DNS Query {query} {qtypes}"
    if dns.rcode:
        answer = f"RCode: {DNS_RCODE_TEXT.get(dns.rcode, str(dns.rcode))}"
    else:
        parts = [f'"{",".join(dns.ips)}"'] if dns.ips else []
        if dns.cnames:
            parts.append(f'CNAMEs: "{",".join(c + "." for c in dns.cnames)}"')
        answer = " ".join(parts)
    # l7lab's addition to Hubble's words: the toFQDNs selectors the answer's addresses were
    # learned for before the proxy released it (none: nothing learned, the summary is Hubble's).
    learned = f" learned for {', '.join(dns.learned)}" if dns.learned else ""
    return f"DNS Answer {answer} TTL: {dns.ttl} (Proxy {query} {qtypes}){learned}"


def answered(flow: Flow) -> bool:
    """Whether the proxy sent the client an answer (an L7 record then gives a RESPONSE flow)."""
    if flow.http is not None:
        return flow.http.code > 0
    return flow.dns is not None and flow.dns.rcode >= 0


def hubble_flows(record: Flow, node_name: str) -> list[dict[str, Any]]:
    """The Hubble flows of one l7lab record, in the order Cilium emits them:

    - a kernel new-flow decision (FORWARD, REDIRECT, AUDIT, or a policy DROP): a policy-verdict
      flow, then for a drop a drop flow, else a trace flow of the packet going on (to-proxy for
      a redirect, to-endpoint to a pod, to-stack to a world host or the node);
    - any other kernel drop: one drop flow;
    - the proxy's upstream connection (`from_proxy`: it skipped policy, as in Cilium), and a
      flow forwarded where the deciding endpoint enforces no policy in that direction
      (`policy_enforced` false; Cilium sends verdicts only where policy is enforced): the trace
      flow alone, no policy verdict;
    - an L7 record: the REQUEST flow, then a RESPONSE flow (endpoints swapped, is_reply true, the
      status or rcode and latency_ns) when the proxy sent the client an answer."""
    if record.type == FlowType.L7:
        flows = [_l7(record, node_name, response=False)]
        if record.l7 is not None and answered(record):
            flows.append(_l7(record, node_name, response=True))
        return flows
    if record.verdict == Verdict.DROP and record.drop_reason not in POLICY_DROP_REASONS:
        return [_drop(record, node_name)]
    if record.from_proxy or (not record.policy_enforced and record.verdict in (Verdict.FORWARD, Verdict.REDIRECT)):
        return [_trace(record, node_name)]
    verdict = _policy_verdict(record, node_name)
    return [verdict, _drop(record, node_name) if record.verdict == Verdict.DROP else _trace(record, node_name)]


def jsonpb(flow: dict[str, Any]) -> dict[str, Any]:
    """A flow as `hubble observe -o jsonpb` writes it: the GetFlowsResponse around it."""
    return {"flow": flow, "node_name": flow.get("node_name", ""), "time": flow.get("time", "")}


def event_type_name(flow: dict[str, Any]) -> str:
    """'drop', 'trace', 'policy-verdict' or 'l7': the `--type` a flow answers to."""
    return EVENT_TYPE_NAMES.get(flow.get("event_type", {}).get("type", 0), "")


# --------------------------------------------------------------------------- text


def _identity_text(ep: dict[str, Any]) -> str:
    identity = ep.get("identity", 0)
    name = RESERVED_IDENTITY_NAMES.get(identity)
    return f"({name})" if name is not None else f"(ID:{identity})"


def _host(flow: dict[str, Any], side: str) -> str:
    ep = flow.get(side, {})
    ip = flow.get("IP", {}).get(side, "")
    l4 = next(iter(flow.get("l4", {}).values()), {})
    port = l4.get("source_port" if side == "source" else "destination_port", 0)
    if ep.get("pod_name"):
        host = f"{ep['namespace']}/{ep['pod_name']}" if ep.get("namespace") else ep["pod_name"]
    elif flow.get(f"{side}_names"):
        host = ",".join(flow[f"{side}_names"])
    else:
        host = ip
    return f"{host}:{port}" if port else host


def flow_type_text(flow: dict[str, Any]) -> str:
    """Hubble's TYPE column: 'http-request', 'dns-response proxy', 'to-endpoint', 'Policy denied',
    'policy-verdict:L3-L4 INGRESS'."""
    l7 = flow.get("l7")
    if l7 is not None:
        kind = l7.get("type", "UNKNOWN_L7_TYPE").lower()
        if "http" in l7:
            return f"http-{kind}"
        if "dns" in l7:
            return f"dns-{kind} {l7['dns'].get('observation_source', '')}"
        return f"l7-{kind}"
    event = flow.get("event_type", {})
    kind, sub = event.get("type", 0), event.get("sub_type", 0)
    if kind == EVENT_TRACE:
        return trace_point_text(sub)
    if kind == EVENT_DROP:
        reason = DROP_REASON_OF_NUMBER.get(sub)
        return DROP_REASONS[reason][1] if reason else f"{sub}"
    if kind == EVENT_POLICY_VERDICT:
        match = POLICY_MATCH_NAMES.get(flow.get("policy_match_type", 0), "unknown")
        return f"policy-verdict:{match} {flow.get('traffic_direction', 'TRAFFIC_DIRECTION_UNKNOWN')}"
    return "UNKNOWN"


def verdict_text(flow: dict[str, Any]) -> str:
    """Hubble's VERDICT column: a policy verdict says ALLOWED / DENIED / AUDITED."""
    verdict = flow.get("verdict", "VERDICT_UNKNOWN")
    if flow.get("event_type", {}).get("type") == EVENT_POLICY_VERDICT:
        return POLICY_ACTIONS[verdict][1] if verdict in POLICY_ACTIONS else verdict
    return verdict


def stamp(flow: dict[str, Any]) -> str:
    """Hubble's default time format (Go's StampMilli, UTC): 'Dec  1 06:50:41.123'."""
    text = flow.get("time", "")
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    if when is None:
        return "N/A"
    return f"{when.strftime('%b')} {when.day:2d} {when.strftime('%H:%M:%S')}.{when.microsecond // 1000:03d}"


def compact(flow: dict[str, Any]) -> str:
    """`hubble observe`'s default line: time, source (identity), an arrow ("->", "<-" with the
    two sides swapped back for a reply, "<>" when Hubble cannot tell), destination, type,
    verdict, (summary)."""
    src, dst = _host(flow, "source"), _host(flow, "destination")
    src_id, dst_id = _identity_text(flow.get("source", {})), _identity_text(flow.get("destination", {}))
    arrow = "->"
    if "is_reply" not in flow:
        arrow = "<>"
    elif flow["is_reply"]:
        src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
    return (f"{stamp(flow)}: {src} {src_id} {arrow} {dst} {dst_id} {flow_type_text(flow)} {verdict_text(flow)} "
            f"({flow.get('Summary', '')})")


def dict_text(flow: dict[str, Any]) -> str:
    """`hubble observe -o dict`'s block for one flow (without the separator between flows)."""
    return "\n".join((f"  TIMESTAMP: {stamp(flow)}", f"     SOURCE: {_host(flow, 'source')}",
                      f"DESTINATION: {_host(flow, 'destination')}", f"       TYPE: {flow_type_text(flow)}",
                      f"    VERDICT: {verdict_text(flow)}", f"    SUMMARY: {flow.get('Summary', '')}"))
