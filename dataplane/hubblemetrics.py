"""Hubble's metrics, counted from Hubble flow dicts (`dataplane/hubble.py`).

The lab agent passes every Hubble flow of every record it writes or reads (kernel verdicts,
L7 requests and responses) to `HubbleCounters.process`; the counts go into the agent's metrics
snapshot and `families` turns them into Prometheus metric families at scrape time. The metric
names, label names and label values are those of Cilium's Hubble metric handlers
(pkg/hubble/metrics/{flow,drop,policy,http,dns,tcp}), as a Cilium agent configured with

    hubble-metrics: flow:labelsContext=$CTX drop:labelsContext=$CTX policy:labelsContext=$CTX
                    httpV1:labelsContext=$CTX dns:labelsContext=$CTX tcp:labelsContext=$CTX
    CTX = source_namespace,source_pod,source_workload,destination_namespace,destination_pod,destination_workload

exports them:

    hubble_flows_processed_total{protocol,type,subtype,verdict,CTX}
    hubble_drop_total{CTX,reason,protocol}                      every flow with verdict DROPPED
    hubble_policy_verdicts_total{direction,match,action,CTX}    policy-verdict and L7 flows
    hubble_http_requests_total{CTX,method,protocol,reporter}    L7 HTTP REQUEST flows
    hubble_http_responses_total{CTX,method,protocol,status,reporter}   L7 HTTP RESPONSE flows
    hubble_http_request_duration_seconds{CTX,method,reporter}   histogram of RESPONSE latency_ns
    hubble_dns_queries_total{CTX,rcode,qtypes,ips_returned}     DNS REQUEST flows ("Policy denied" if DROPPED)
    hubble_dns_responses_total{CTX,rcode,qtypes,ips_returned}   DNS RESPONSE flows
    hubble_dns_response_types_total{CTX,type,qtypes}            per record type of a response
    hubble_tcp_flags_total{flag,family,CTX}                     SYN, SYN-ACK, FIN, RST of forwarded flows

Beside them, one counter of l7lab's own (Hubble's drop metric names no policy):

    l7lab_policy_drops_total{lab,policy_kind,policy_namespace,policy_name,direction,match,reason,CTX}

one per flow a policy dropped (a policy-verdict flow or an L7 request with verdict DROPPED),
by the policy that dropped it: the flow's `*_denied_by`, or, when it names none (a default deny:
no rule matched on an endpoint a policy isolates; an L7 request of a protocol the redirect's
rules do not cover), the policies that isolate the deciding endpoint in that direction, as
`isolating(namespace, pod, direction)` names them.

Cardinality is bounded: the context labels name the lab's own pods, namespaces and workloads
(a scenario's handful; world hosts have none); methods, protocols and DNS query types outside
the standard sets count as "OTHER" (and so does a DNS message asking more than two types); status and rcode are small integers and names; policies
are those applied to the lab. Nothing a client sends can create series without bound.

This module is pure: dicts in, numbers out; no I/O, no lab.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from .abi import IDENTITY_HOST  # policy verdicts of the host's own traffic are not counted (Hubble: allowed anyway)
from .hubble import (DNS_RCODE_TEXT, EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT, EVENT_TRACE, POLICY_MATCH_NAMES,
                     trace_point_text)

# The Go client's prometheus.DefBuckets: Hubble's HTTP histogram sets no buckets of its own.
# (prometheus_client's Python defaults differ: .075, .75, 7.5 more.)
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Hubble's labelsContext labels, in Hubble's order (api/context.go contextLabelsList).
CONTEXT_LABELS: tuple[str, ...] = ("source_pod", "source_namespace", "source_workload",
                                   "destination_pod", "destination_namespace", "destination_workload")

# The vocabulary (event types, trace points, policy match names, DNS rcode names) is hubble.py's.

# The bounded vocabularies of labels a client chooses the value of.
OTHER = "OTHER"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
HTTP_PROTOCOLS = frozenset({"HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/2.0", "HTTP/3"})
DNS_TYPES = frozenset({"A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "ANY", "CAA", "DS",
                       "DNSKEY", "HTTPS", "SVCB", "NAPTR", "OPT", "RRSIG", "NSEC", "NSEC3", "AXFR", "IXFR"})

Labels = tuple[str, ...]
# (pod namespace, pod name, "INGRESS"/"EGRESS") -> (kind, namespace, name) of the policies isolating it there
Isolating = Callable[[str, str, str], list[tuple[str, str, str]]]


@dataclass(frozen=True)
class Family:
    """One metric: its name as scraped, help text and label names (in Hubble's order)."""

    name: str
    help: str
    labels: Labels


FLOWS = Family("hubble_flows_processed_total", "Total number of flows processed",
               ("protocol", "type", "subtype", "verdict", *CONTEXT_LABELS))
DROPS = Family("hubble_drop_total", "Number of drops", (*CONTEXT_LABELS, "reason", "protocol"))
POLICY_VERDICTS = Family("hubble_policy_verdicts_total", "Total number of Cilium network policy verdicts",
                         ("direction", "match", "action", *CONTEXT_LABELS))
HTTP_REQUESTS = Family("hubble_http_requests_total", "Count of HTTP requests",
                       (*CONTEXT_LABELS, "method", "protocol", "reporter"))
HTTP_RESPONSES = Family("hubble_http_responses_total", "Count of HTTP responses",
                        (*CONTEXT_LABELS, "method", "protocol", "status", "reporter"))
HTTP_DURATION = Family("hubble_http_request_duration_seconds", "Quantiles of HTTP request duration in seconds",
                       (*CONTEXT_LABELS, "method", "reporter"))
DNS_QUERIES = Family("hubble_dns_queries_total", "Number of DNS queries observed",
                     (*CONTEXT_LABELS, "rcode", "qtypes", "ips_returned"))
DNS_RESPONSES = Family("hubble_dns_responses_total", "Number of DNS responses observed",
                       (*CONTEXT_LABELS, "rcode", "qtypes", "ips_returned"))
DNS_RESPONSE_TYPES = Family("hubble_dns_response_types_total", "Number of DNS response types observed",
                            (*CONTEXT_LABELS, "type", "qtypes"))
TCP_FLAGS = Family("hubble_tcp_flags_total", "TCP flag occurrences", ("flag", "family", *CONTEXT_LABELS))
POLICY_DROPS = Family("l7lab_policy_drops_total",
                      "Flows dropped by policy (policy verdicts and L7 requests), by the policy that dropped them",
                      ("policy_kind", "policy_namespace", "policy_name", "direction", "match", "reason",
                       *CONTEXT_LABELS))

COUNTERS: tuple[Family, ...] = (FLOWS, DROPS, POLICY_VERDICTS, HTTP_REQUESTS, HTTP_RESPONSES, DNS_QUERIES,
                                DNS_RESPONSES, DNS_RESPONSE_TYPES, TCP_FLAGS, POLICY_DROPS)
HISTOGRAMS: tuple[Family, ...] = (HTTP_DURATION,)
METRIC_NAMES: frozenset[str] = frozenset(f.name for f in (*COUNTERS, *HISTOGRAMS))


# --------------------------------------------------------------------------- reading a flow dict


def _bounded(value: str, known: frozenset[str]) -> str:
    return value if value in known else OTHER


def context_values(flow: Mapping[str, Any]) -> Labels:
    """The labelsContext values of a flow: pod name, namespace and first workload's name of
    each side ("" for what is not a pod), as Hubble's labelsContext gives them."""
    out: list[str] = []
    for side in ("source", "destination"):
        ep = flow.get(side) or {}
        workloads = ep.get("workloads") or []
        out += [str(ep.get("pod_name") or ""), str(ep.get("namespace") or ""),
                str(workloads[0].get("name") or "") if workloads else ""]
    return tuple(out)


def event_type(flow: Mapping[str, Any]) -> tuple[int, int]:
    et = flow.get("event_type") or {}
    return int(et.get("type") or 0), int(et.get("sub_type") or 0)


def flow_protocol(flow: Mapping[str, Any]) -> str:
    """Hubble's v1.FlowProtocol: the L7 protocol of an access-log flow, else the L4 one."""
    kind = event_type(flow)[0]
    if kind == EVENT_L7:
        l7 = flow.get("l7") or {}
        if l7.get("dns") is not None:
            return "DNS"
        if l7.get("http") is not None:
            return "HTTP"
        if l7.get("kafka") is not None:
            return "Kafka"
        return "Unknown L7"
    if kind in (EVENT_DROP, EVENT_TRACE, EVENT_POLICY_VERDICT):
        l4 = flow.get("l4") or {}
        for name in ("TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP"):
            if l4.get(name) is not None:
                return name
        return "Unknown L4"
    return "Unknown flow"


def _verdict(flow: Mapping[str, Any]) -> str:
    return str(flow.get("verdict") or "VERDICT_UNKNOWN")


def _direction(flow: Mapping[str, Any]) -> str:
    return str(flow.get("traffic_direction") or "TRAFFIC_DIRECTION_UNKNOWN")


def _match(flow: Mapping[str, Any]) -> str:
    """A policy verdict's match label: hubble.py's name of its policy_match_type (a number,
    left out when 0), lower-cased as Hubble's policy handler writes it."""
    return POLICY_MATCH_NAMES.get(int(flow.get("policy_match_type") or 0), "unknown").lower()


def _l7_match(l7: Mapping[str, Any]) -> str:
    return "l7/" + ("dns" if l7.get("dns") is not None else "http" if l7.get("http") is not None
                    else "kafka" if l7.get("kafka") is not None else "")


def _is_reply(flow: Mapping[str, Any]) -> bool:
    return bool(flow.get("is_reply"))  # a bool; left out for drops


MAX_QTYPES = 2  # a question carries one type; a message with more is labelled OTHER, not by every mix


def _qtypes(dns: Mapping[str, Any]) -> str:
    qtypes = [_bounded(str(q), DNS_TYPES) for q in dns.get("qtypes") or []]
    return ",".join(qtypes) if len(qtypes) <= MAX_QTYPES else OTHER


def _latency_seconds(l7: Mapping[str, Any]) -> float:
    return int(l7.get("latency_ns") or 0) / 1e9  # protojson writes uint64 as a string


# --------------------------------------------------------------------------- the counters


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(DURATION_BUCKETS):
            if value <= bound:
                self.buckets[i] += 1
                break
        self.total += value
        self.count += 1


@dataclass(frozen=True)
class HistogramValue:
    """A histogram series as scraped: cumulative counts per bucket bound (+Inf last), sum, count."""

    cumulative: tuple[tuple[str, int], ...]
    total: float
    count: int


@dataclass(frozen=True)
class HubbleSnapshot:
    """The counts at one moment; never changed afterwards (scrape threads read it without a lock)."""

    counters: Mapping[str, Mapping[Labels, int]] = field(default_factory=dict)
    histograms: Mapping[str, Mapping[Labels, HistogramValue]] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """Sum of a counter's series that carry `labels` (for tests and docs)."""
        family = {f.name: f for f in COUNTERS}[name]
        idx = {k: family.labels.index(k) for k in labels}
        return sum(v for key, v in self.counters.get(name, {}).items()
                   if all(key[i] == labels[k] for k, i in idx.items()))


class HubbleCounters:
    """The Hubble handlers' counts; touched only on the agent's loop."""

    def __init__(self, isolating: Isolating | None = None) -> None:
        self.isolating = isolating
        self.counters: dict[str, Counter[Labels]] = {f.name: Counter() for f in COUNTERS}
        self.histograms: dict[str, dict[Labels, _Histogram]] = {f.name: {} for f in HISTOGRAMS}

    def process(self, flow: Mapping[str, Any]) -> None:
        """Count one Hubble flow in every handler that takes it."""
        ctx = context_values(flow)
        self._flows(flow, ctx)
        self._drop(flow, ctx)
        self._policy(flow, ctx)
        self._http(flow, ctx)
        self._dns(flow, ctx)
        self._tcp(flow, ctx)
        self._policy_drop(flow, ctx)

    def snapshot(self) -> HubbleSnapshot:
        hist: dict[str, dict[Labels, HistogramValue]] = {}
        for name, series in self.histograms.items():
            hist[name] = {}
            for key, h in series.items():
                running, cumulative = 0, []
                for bound, n in zip(DURATION_BUCKETS, h.buckets):
                    running += n
                    cumulative.append((_le(bound), running))
                cumulative.append(("+Inf", h.count))
                hist[name][key] = HistogramValue(tuple(cumulative), h.total, h.count)
        return HubbleSnapshot({name: dict(c) for name, c in self.counters.items()}, hist)

    # -- the handlers, one per Hubble metric plugin ----------------------------------------
    def _flows(self, flow: Mapping[str, Any], ctx: Labels) -> None:
        kind, sub = event_type(flow)
        subtype = ""
        if kind == EVENT_L7:
            type_name = "L7"
            l7 = flow.get("l7") or {}
            subtype = "DNS" if l7.get("dns") is not None else "HTTP" if l7.get("http") is not None else ""
        elif kind == EVENT_DROP:
            type_name = "Drop"
        elif kind == EVENT_TRACE:
            type_name, subtype = "Trace", trace_point_text(sub)
        elif kind == EVENT_POLICY_VERDICT:
            type_name = "PolicyVerdict"
        else:
            type_name, subtype = "Unknown", str(kind)
        self.counters[FLOWS.name][(flow_protocol(flow), type_name, subtype, _verdict(flow), *ctx)] += 1

    def _drop(self, flow: Mapping[str, Any], ctx: Labels) -> None:
        if _verdict(flow) != "DROPPED":
            return
        reason = str(flow.get("drop_reason_desc") or "DROP_REASON_UNKNOWN")
        self.counters[DROPS.name][(*ctx, reason, flow_protocol(flow))] += 1

    def _policy(self, flow: Mapping[str, Any], ctx: Labels) -> None:
        kind = event_type(flow)[0]
        if kind == EVENT_POLICY_VERDICT:
            if int((flow.get("source") or {}).get("identity") or 0) == IDENTITY_HOST:
                return
            match = _match(flow)
        elif kind == EVENT_L7:
            match = _l7_match(flow.get("l7") or {})
        else:
            return
        key = (_direction(flow).lower(), match, _verdict(flow).lower(), *ctx)
        self.counters[POLICY_VERDICTS.name][key] += 1

    def _http(self, flow: Mapping[str, Any], ctx: Labels) -> None:
        l7 = flow.get("l7") or {}
        http = l7.get("http")
        if http is None:
            return
        reporter = {"EGRESS": "client", "INGRESS": "server"}.get(_direction(flow), "unknown")
        method = _bounded(str(http.get("method") or ""), HTTP_METHODS)
        protocol = _bounded(str(http.get("protocol") or ""), HTTP_PROTOCOLS)
        if l7.get("type") == "REQUEST":
            self.counters[HTTP_REQUESTS.name][(*ctx, method, protocol, reporter)] += 1
        elif l7.get("type") == "RESPONSE":
            status = str(int(http.get("code") or 0))
            self.counters[HTTP_RESPONSES.name][(*ctx, method, protocol, status, reporter)] += 1
            series = self.histograms[HTTP_DURATION.name].setdefault((*ctx, method, reporter), _Histogram())
            series.observe(_latency_seconds(l7))

    def _dns(self, flow: Mapping[str, Any], ctx: Labels) -> None:
        dns = (flow.get("l7") or {}).get("dns")
        if dns is None:
            return
        qtypes = _qtypes(dns)
        ips = str(len(dns.get("ips") or []))
        if _verdict(flow) == "DROPPED":
            self.counters[DNS_QUERIES.name][(*ctx, "Policy denied", qtypes, ips)] += 1
        elif not _is_reply(flow):
            self.counters[DNS_QUERIES.name][(*ctx, "", qtypes, ips)] += 1
        else:
            rcode = DNS_RCODE_TEXT.get(int(dns.get("rcode") or 0), "")
            self.counters[DNS_RESPONSES.name][(*ctx, rcode, qtypes, ips)] += 1
            for rrtype in dns.get("rrtypes") or []:
                self.counters[DNS_RESPONSE_TYPES.name][(*ctx, _bounded(str(rrtype), DNS_TYPES), qtypes)] += 1

    def _tcp(self, flow: Mapping[str, Any], ctx: Labels) -> None:
        if _verdict(flow) not in ("FORWARDED", "REDIRECTED"):
            return
        tcp = (flow.get("l4") or {}).get("TCP")
        ip = flow.get("IP")
        if not ip or not tcp or not tcp.get("flags"):
            return
        flags, family = tcp["flags"], str(ip.get("ipVersion") or "IP_NOT_USED")
        found = []
        if flags.get("FIN"):
            found.append("FIN")
        if flags.get("SYN"):
            found.append("SYN-ACK" if flags.get("ACK") else "SYN")
        if flags.get("RST"):
            found.append("RST")
        for flag in found:
            self.counters[TCP_FLAGS.name][(flag, family, *ctx)] += 1

    def _policy_drop(self, flow: Mapping[str, Any], ctx: Labels) -> None:
        """l7lab's own: a flow dropped by policy, by the policy that dropped it."""
        if _verdict(flow) != "DROPPED":
            return
        kind = event_type(flow)[0]
        l7 = flow.get("l7") or {}
        if kind == EVENT_POLICY_VERDICT:
            match = _match(flow)
        elif kind == EVENT_L7 and l7.get("type") == "REQUEST":
            match = _l7_match(l7)
        else:
            return  # a drop flow repeats its policy verdict's drop; a response is no new decision
        direction = _direction(flow)
        reason = str(flow.get("drop_reason_desc") or "")
        for policy_kind, namespace, name in self.deciding_policies(flow) or [("", "", "")]:
            key = (policy_kind, namespace, name, direction.lower(), match, reason, *ctx)
            self.counters[POLICY_DROPS.name][key] += 1

    def deciding_policies(self, flow: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        """The policies that dropped a flow: its `*_denied_by` for its direction (both when the
        direction is unknown), else the policies isolating the deciding endpoint (default deny)."""
        direction = _direction(flow)
        keys = {"INGRESS": ("ingress_denied_by",), "EGRESS": ("egress_denied_by",)}.get(
            direction, ("ingress_denied_by", "egress_denied_by"))
        found = sorted({(str(p.get("kind") or ""), str(p.get("namespace") or ""), str(p.get("name") or ""))
                        for key in keys for p in flow.get(key) or []})
        if found or self.isolating is None or direction not in ("INGRESS", "EGRESS"):
            return found
        endpoint = flow.get("destination" if direction == "INGRESS" else "source") or {}
        namespace, pod = str(endpoint.get("namespace") or ""), str(endpoint.get("pod_name") or "")
        return sorted(set(self.isolating(namespace, pod, direction))) if namespace and pod else []


def _le(bound: float) -> str:
    """A bucket bound as the Go client writes it ("0.005", "1", "2.5")."""
    return repr(bound).rstrip("0").rstrip(".") if "." in repr(bound) else repr(bound)


# --------------------------------------------------------------------------- exposition


def families(snapshot: HubbleSnapshot, lab: str) -> Iterator[Any]:
    """The metric families of a snapshot, every family present even before its first sample.
    l7lab's own counter carries the `lab` label as every `l7lab_` metric does; Hubble's have
    exactly Hubble's labels (a Prometheus tells labs apart by their scrape targets)."""
    for family in COUNTERS:
        own = family.name.startswith("l7lab_")
        head = [lab] if own else []
        out = CounterMetricFamily(family.name, family.help, labels=(["lab"] if own else []) + list(family.labels))
        for key, value in sorted(snapshot.counters.get(family.name, {}).items()):
            out.add_metric(head + list(key), value)
        yield out
    for family in HISTOGRAMS:
        hist = HistogramMetricFamily(family.name, family.help, labels=list(family.labels))
        for key, h in sorted(snapshot.histograms.get(family.name, {}).items()):
            hist.add_metric(list(key), [(le, float(n)) for le, n in h.cumulative], h.total)
        yield hist
