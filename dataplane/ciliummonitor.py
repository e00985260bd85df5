"""The text `cilium monitor` prints for an event, written from the Hubble flow of it
(`dataplane/hubble.py`): `monitor_line(flow)` gives the DumpInfo line of Cilium's DropNotify,
PolicyVerdictNotify, TraceNotify or access-log record (pkg/monitor), as `cilium monitor` prints
them without `-v`. `l7lab monitor` prints these lines.
"""

from __future__ import annotations

from typing import Any

from .hubble import (DROP_REASON_OF_NUMBER, DROP_REASONS, DROPPED, EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT,
                     EVENT_TRACE, FORWARDED, MONITOR_L7_VERDICTS, POLICY_ACTIONS, POLICY_MATCH_NAMES,
                     RESERVED_IDENTITY_NAMES)
from .icmp import type_code_text


def _connection(flow: dict[str, Any]) -> str:
    """The monitor's connection summary: '10.0.0.1:40512 -> 10.0.0.2:8080 tcp SYN'; for ICMP
    the type and code as gopacket writes them: '10.0.0.1 -> 10.0.0.2 EchoRequest'."""
    ip = flow.get("IP", {})
    l4 = flow.get("l4", {})
    if "ICMPv4" in l4:
        icmp = l4["ICMPv4"]
        return f"{ip.get('source', '')} -> {ip.get('destination', '')} {type_code_text(icmp.get('type', 0), icmp.get('code', 0))}"
    proto = next(iter(l4), "")
    ports = l4.get(proto, {})
    text = (f"{ip.get('source', '')}:{ports.get('source_port', 0)} -> "
            f"{ip.get('destination', '')}:{ports.get('destination_port', 0)} {proto.lower()}")
    if proto == "TCP":  # the monitor names SYN, ACK, RST and FIN only
        flags = ports.get("flags", {})
        text += " " + ", ".join(f for f in ("SYN", "ACK", "RST", "FIN") if flags.get(f))
    return text


def identity_text(identity: int, numeric: bool = False) -> str:
    """An identity as the monitor prints it: without `-n`, a reserved one by its name
    (NumericIdentity.String(): 'world', 'host'), any other by its number."""
    return str(identity) if numeric else RESERVED_IDENTITY_NAMES.get(identity, str(identity))


def _identities(flow: dict[str, Any], numeric: bool) -> str:
    src, dst = flow.get("source", {}).get("identity", 0), flow.get("destination", {}).get("identity", 0)
    return f"identity {identity_text(src, numeric)}->{identity_text(dst, numeric)}"


def _local_endpoint(flow: dict[str, Any]) -> int:
    """The endpoint whose hook reported the event: the destination of ingress, the source of egress."""
    side = "source" if flow.get("traffic_direction") == "EGRESS" else "destination"
    return int(flow.get(side, {}).get("ID", 0))


def monitor_line(flow: dict[str, Any], numeric: bool = False) -> str:
    """The line `cilium monitor` prints for the event behind a Hubble flow (pkg/monitor: DumpInfo
    of DropNotify, PolicyVerdictNotify, TraceNotify and LogRecordNotify). What the record does
    not have is written as Cilium writes an unset value: flow hash 0x0, source line 0, orig-ip
    0.0.0.0; the file is bpf_lxc.c, where Cilium's endpoint programs live. `numeric` is the
    monitor's `-n`: reserved identities as numbers rather than names. l7lab has no mutual
    authentication: `auth: disabled`, as Cilium prints a verdict with no auth type."""
    kind = flow.get("event_type", {}).get("type", 0)
    if kind == EVENT_DROP:
        reason = DROP_REASON_OF_NUMBER.get(flow.get("event_type", {}).get("sub_type", 0))
        text = DROP_REASONS[reason][1] if reason else "Unknown"
        dst_ep = int(flow.get("destination", {}).get("ID", 0))
        return (f"xx drop ({text}) flow 0x0 to endpoint {dst_ep}, ifindex {flow.get('interface', {}).get('index', 0)}, "
                f"file bpf_lxc.c:0, , {_identities(flow, numeric)}: {_connection(flow)}")
    if kind == EVENT_POLICY_VERDICT:
        verdict = flow.get("verdict")
        action = POLICY_ACTIONS.get(verdict, POLICY_ACTIONS[FORWARDED])[0]
        ingress = flow.get("traffic_direction") == "INGRESS"
        remote = flow.get("source" if ingress else "destination", {}).get("identity", 0)
        proto = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMPv4": 1}.get(next(iter(flow.get("l4", {})), ""), 0)
        match = POLICY_MATCH_NAMES.get(flow.get("policy_match_type", 0), "unknown")
        return (f"Policy verdict log: flow 0x0 local EP ID {_local_endpoint(flow)}, "
                f"remote ID {identity_text(remote, numeric)}, "
                f"proto {proto}, {'ingress' if ingress else 'egress'}, action {action}, auth: disabled, "
                f"match {match}, {_connection(flow)}")
    if kind == EVENT_TRACE:
        point = flow.get("trace_observation_point", "TO_ENDPOINT")
        if point == "TO_ENDPOINT":
            where = f"-> endpoint {int(flow.get('destination', {}).get('ID', 0))}"
        elif point == "TO_PROXY":
            where = "-> proxy" + (f" port {flow['proxy_port']}" if flow.get("proxy_port") else "")
        else:
            where = {"TO_STACK": "-> stack", "TO_HOST": "-> host from", "FROM_ENDPOINT":
                     f"<- endpoint {int(flow.get('source', {}).get('ID', 0))}"}.get(point, "unknown trace")
        ifindex = flow.get("interface", {}).get("index", 0)
        return (f"{where} flow 0x0 , {_identities(flow, numeric)} state new ifindex {ifindex} "
                f"orig-ip 0.0.0.0: {_connection(flow)}")
    if kind == EVENT_L7:
        return _monitor_l7(flow)
    return ""


def _labels_text(ep: dict[str, Any]) -> str:
    return "[" + " ".join(ep.get("labels", [])) + "]"


def _monitor_l7(flow: dict[str, Any]) -> str:
    l7 = flow.get("l7", {})
    arrow = {"INGRESS": "<-", "EGRESS": "->"}.get(flow.get("traffic_direction", ""), "??")
    src, dst = flow.get("source", {}), flow.get("destination", {})
    verdict = MONITOR_L7_VERDICTS.get(flow.get("verdict", ""), flow.get("verdict", ""))
    proto = "http" if "http" in l7 else "dns" if "dns" in l7 else "unknown-l7"
    ids = f"identity {src.get('identity', 0)}->{dst.get('identity', 0)}"
    if l7.get("type") == "RESPONSE":
        head = (f"{arrow} Response {proto} to {dst.get('ID', 0)} ({_labels_text(dst)}) from {src.get('ID', 0)} "
                f"({_labels_text(src)}), {ids}, verdict {verdict}")
    else:
        head = (f"{arrow} Request {proto} from {src.get('ID', 0)} ({_labels_text(src)}) to {dst.get('ID', 0)} "
                f"({_labels_text(dst)}), {ids}, verdict {verdict}")
    if "http" in l7:
        http = l7["http"]
        # A denied request's access-log entry carries the 403 the proxy answers it with.
        code = http.get("code", 403 if flow.get("verdict") == DROPPED else 0)
        return f"{head} {http.get('method', '')} {http.get('url', '')} => {code}"
    if "dns" in l7:
        dns = l7["dns"]
        qtypes = ",".join(dns.get("qtypes", []))
        text = f"{head} DNS {dns.get('observation_source', '')}: {dns.get('query', '')} {qtypes}"
        if l7.get("type") == "RESPONSE":
            text += f" TTL: {dns.get('ttl', 0)} Answer: '{','.join(dns.get('ips', []))}'"
            if dns.get("cnames"):
                text += f" CNAMEs: {','.join(dns['cnames'])}"
        return text
    return head
