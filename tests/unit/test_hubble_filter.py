"""Hubble's filters over Hubble flow dicts (`dataplane/hubblefilter.py`): each filter flag, the
OR of one flag's values, the AND of different flags, `--pod` on either side, the namespace
flags, `--not`, and a clear error for every bad value. The flows are the product's own: typed
`Flow` records of the retail scenario's kinds (and a DNS question and a world host), turned into
Hubble flows by `dataplane/hubble.py`'s `hubble_flows`, so the filters are tested on what
`l7lab observe` really matches."""

from __future__ import annotations

from typing import Any

import pytest

from dataplane import hubble, hubblefilter
from dataplane.flowrecord import (L4, L7, Endpoint, Flow, FlowType, PolicyAttribution, ProxyEvent, TracePoint,
                                  TrafficDirection, Verdict)
from dataplane.hubblefilter import FilterError, Filters, parse_filters
from dataplane.hubbleobserve import agent_event
from dataplane.labelselector import parse_selector
from l7.dns import DnsFlow
from l7.http import HttpFlow

NODE = hubble.node_name("flt")
NS = "k8s:io.kubernetes.pod.namespace"
FRONTEND = dict(ip="10.10.0.11", namespace="retail", pod="frontend-app", endpoint_id=11, identity=257,
                labels={"app": "frontend-app", NS.removeprefix("k8s:"): "retail"})
INVENTORY = dict(ip="10.10.0.12", namespace="retail", pod="inventory-api", endpoint_id=12, identity=258,
                 labels={"app": "inventory-api", NS.removeprefix("k8s:"): "retail", "tier": "backend"})
REPORTING = dict(ip="10.10.0.13", namespace="retail", pod="reporting", endpoint_id=13, identity=259,
                 labels={"app": "reporting", NS.removeprefix("k8s:"): "retail"})
KUBE_DNS = dict(ip="10.10.0.53", namespace="kube-system", pod="kube-dns", endpoint_id=21, identity=300,
                labels={"k8s-app": "kube-dns", NS.removeprefix("k8s:"): "kube-system"})
# www.example.com, with the identity its toFQDNs rule gave it (a CIDR identity, not world's 2)
WORLD = dict(ip="203.0.113.20", identity=1 << 24, host="www.example.com", dns_names=("www.example.com",))
READ_ONLY = "CiliumNetworkPolicy retail/inventory-read-only"


def kernel(src: dict[str, Any], dst: dict[str, Any], verdict: Verdict, *, proto: str = "TCP", dport: int = 8080,
           flags: tuple[str, ...] = ("SYN",), reason: str = "NONE",
           direction: TrafficDirection = TrafficDirection.INGRESS) -> list[dict[str, Any]]:
    """The Hubble flows of a kernel record (a new flow's verdict, or a drop)."""
    record = Flow(1_796_000_000.0, FlowType.L3_L4, verdict, Endpoint(port=0 if proto == "ICMP" else 40000, **src),
                  Endpoint(port=0 if proto == "ICMP" else dport, **dst), L4(proto, flags if proto == "TCP" else ()),
                  direction, TracePoint.FROM_ENDPOINT, reason,
                  policy=PolicyAttribution((3,), (READ_ONLY,)) if verdict != Verdict.DROP else PolicyAttribution(),
                  proxy_port=15001 if verdict == Verdict.REDIRECT else 0, bytes=60)
    return hubble.hubble_flows(record, NODE)


def http(method: str, path: str, code: int, verdict: Verdict) -> list[dict[str, Any]]:
    """The Hubble flows of the proxy's record of one HTTP request to the inventory."""
    record = Flow(1_796_000_001.0, FlowType.L7, verdict, Endpoint(port=40000, **FRONTEND),
                  Endpoint(port=8080, **INVENTORY), L4("TCP"), TrafficDirection.INGRESS, TracePoint.PROXY,
                  policy=PolicyAttribution((), (READ_ONLY,)),
                  l7=L7(0.5, http=HttpFlow(method, f"http://inventory-api:8080{path}", path, "HTTP/1.1", code)))
    return hubble.hubble_flows(record, NODE)


def dns_question() -> list[dict[str, Any]]:
    record = Flow(1_796_000_002.0, FlowType.L7, Verdict.FORWARDED, Endpoint(port=40000, **FRONTEND),
                  Endpoint(port=53, **KUBE_DNS), L4("UDP"), TrafficDirection.EGRESS, TracePoint.PROXY,
                  l7=L7(0.2, dns=DnsFlow("www.example.com", ("A",), 0, ("203.0.113.20",), 30, (), ("A",))))
    return hubble.hubble_flows(record, NODE)


# The retail scenario's kinds of flows, each unpacked from its record's flows (so a record that
# gave another number of flows fails here): a redirect to the proxy (policy verdict + trace to
# the proxy), the L7 request and response of a GET (allowed) and a DELETE (denied: the request
# DROPPED, the proxy's 403 response FORWARDED), an L3/L4 policy drop of reporting (policy verdict
# + drop), a forward (policy verdict + trace to the endpoint), a packet of a redirected
# connection dropped because the proxy's socket is gone (a drop alone), a DNS question and its
# answer, a flow to a world host, an ICMP echo, and the agent's note that the proxy exited.
GET_VERDICT, GET_TRACE = kernel(FRONTEND, INVENTORY, Verdict.REDIRECT)
GET_REQUEST, GET_RESPONSE = http("GET", "/api/inventory/item123", 200, Verdict.FORWARDED)
DELETE_REQUEST, DELETE_RESPONSE = http("DELETE", "/api/inventory/item123", 403, Verdict.DENIED)
DROP_VERDICT, DROP = kernel(REPORTING, INVENTORY, Verdict.DROP, reason="POLICY_DENIED")
FORWARD, FORWARD_TRACE = kernel(INVENTORY, REPORTING, Verdict.FORWARD, dport=80)
(PROXY_DROP,) = kernel(FRONTEND, INVENTORY, Verdict.DROP, flags=("ACK", "PSH"), reason="PROXY_SOCKET_MISSING")
DNS_REQUEST, DNS_RESPONSE = dns_question()
WORLD_VERDICT, WORLD_TRACE = kernel(FRONTEND, WORLD, Verdict.FORWARD, dport=80, direction=TrafficDirection.EGRESS)
ICMP_VERDICT, ICMP_TRACE = kernel(FRONTEND, REPORTING, Verdict.FORWARD, proto="ICMP")
AGENT = agent_event(ProxyEvent(1_796_000_003.0, "exited", "the L7 proxy killed by SIGKILL", 4242), NODE)
ALL = {name: value for name, value in globals().items() if isinstance(value, dict) and (
    "verdict" in value or "agent_event" in value)}
WORLD_FLOW = {"WORLD_VERDICT", "WORLD_TRACE"}
ICMP = {"ICMP_VERDICT", "ICMP_TRACE"}
DNS_QUERY = {"DNS_REQUEST", "DNS_RESPONSE"}


def shown(*argv: str) -> set[str]:
    """The names of the flows above that `observe` flags `argv` show."""
    return {name for name, f in ALL.items() if filters(*argv).matches(f)}


def filters(*argv: str) -> Filters:
    pairs: list[tuple[str, str]] = []
    args = list(argv)
    while args:
        flag = args.pop(0).lstrip("-")
        pairs.append((flag, "") if flag == "not" else (flag, args.pop(0)))
    return parse_filters(pairs)


HTTP = {"GET_REQUEST", "GET_RESPONSE", "DELETE_REQUEST", "DELETE_RESPONSE"}
POLICY_VERDICTS = {"GET_VERDICT", "DROP_VERDICT", "FORWARD", "WORLD_VERDICT", "ICMP_VERDICT"}


def test_no_filter_shows_everything() -> None:
    assert shown() == set(ALL) and not filters()


def test_verdict_values_are_or() -> None:
    # A denied request: the request DROPPED, the proxy's 403 answer FORWARDED, as Cilium's Envoy logs it.
    assert shown("--verdict", "DROPPED") == {"DELETE_REQUEST", "DROP_VERDICT", "DROP", "PROXY_DROP"}
    assert "DELETE_RESPONSE" in shown("--verdict", "FORWARDED")
    # A redirect's policy verdict is REDIRECTED; the trace of its packet to the proxy is FORWARDED.
    assert shown("--verdict", "REDIRECTED", "--verdict", "DROPPED") == {
        "GET_VERDICT", "DELETE_REQUEST", "DROP_VERDICT", "DROP", "PROXY_DROP"}
    assert shown("--verdict", "audit") == set()  # a name, in either case


def test_different_flags_are_and() -> None:
    assert shown("--verdict", "DROPPED", "--type", "l7") == {"DELETE_REQUEST"}
    assert shown("--verdict", "DROPPED", "--type", "l7", "--http-status", "403") == set()  # the request has no status
    assert shown("--verdict", "FORWARDED", "--type", "l7", "--http-status", "403") == {"DELETE_RESPONSE"}
    assert shown("--http-method", "DELETE", "--http-status", "403") == {"DELETE_RESPONSE"}


def test_pod_is_either_side_from_and_to_pod_one() -> None:
    from_reporting = {"DROP_VERDICT", "DROP"}
    to_reporting = {"FORWARD", "FORWARD_TRACE"} | ICMP
    assert shown("--from-pod", "retail/reporting") == from_reporting
    assert shown("--to-pod", "retail/reporting") == to_reporting
    assert shown("--pod", "retail/reporting") == from_reporting | to_reporting
    assert shown("--pod", "retail/rep") == from_reporting | to_reporting  # a prefix, as in Hubble
    assert shown("--pod", "reporting") == set()  # no namespace: "default", as in Hubble
    # A response comes from the server: the inventory's answers are flows from it.
    assert shown("--from-pod", "retail/reporting", "--from-pod", "retail/inventory-api") == \
        from_reporting | {"FORWARD", "FORWARD_TRACE", "GET_RESPONSE", "DELETE_RESPONSE"}
    # --pod X --pod Y: from X or Y, or to X or Y.
    assert shown("--pod", "kube-system/kube-dns", "--pod", "retail/reporting") == \
        from_reporting | to_reporting | DNS_QUERY
    # --pod with another flag: the other flag applies to both sides' filters.
    assert shown("--pod", "retail/reporting", "--verdict", "FORWARDED") == to_reporting


def test_namespaces() -> None:
    assert shown("--namespace", "kube-system") == DNS_QUERY
    assert shown("--to-namespace", "kube-system") == {"DNS_REQUEST"}
    assert shown("--from-namespace", "kube-system") == {"DNS_RESPONSE"}
    in_retail = set(ALL) - {"AGENT"} - WORLD_FLOW - DNS_QUERY
    assert shown("--from-namespace", "retail", "--to-namespace", "retail") == in_retail
    assert shown("--namespace", "retail", "--pod", "reporting") == shown("--pod", "retail/reporting")
    assert shown("--from-namespace", "retail", "--to-pod", "kube-dns") == set()  # kube-dns is not in default
    assert shown("--from-namespace", "retail", "--to-pod", "kube-system/kube-dns") == {"DNS_REQUEST"}
    # A world host has no namespace: no namespace filter matches it, so --not keeps it.
    assert shown("--not", "--to-namespace", "retail") == WORLD_FLOW | {"DNS_REQUEST", "AGENT"}
    assert shown("--not", "--namespace", "retail") == {"AGENT"}  # every flow has a retail end


def test_labels() -> None:
    to_reporting = {"FORWARD", "FORWARD_TRACE"} | ICMP
    to_frontend = {"GET_RESPONSE", "DELETE_RESPONSE", "DNS_RESPONSE"}  # the answers
    assert shown("--from-label", "app=reporting") == {"DROP_VERDICT", "DROP"}
    assert shown("--from-label", "k8s:app=reporting") == {"DROP_VERDICT", "DROP"}
    assert shown("--from-label", "container:app=reporting") == set()  # another source
    assert shown("--to-label", "app in (reporting, kube-dns)") == to_reporting
    assert shown("--to-label", "k8s-app in (reporting, kube-dns)") == {"DNS_REQUEST"}
    assert shown("--to-label", "tier") == shown("--to-pod", "retail/inventory-api")
    assert shown("--to-label", "!tier", "--to-namespace", "retail") == to_reporting | to_frontend
    assert shown("--to-label", "reserved:world") == WORLD_FLOW
    assert shown("--label", "app=reporting") == shown("--pod", "retail/reporting")
    assert shown("--to-label", "app!=inventory-api,k8s:io.kubernetes.pod.namespace=retail") == \
        to_reporting | to_frontend
    assert shown("--to-label", "app notin (inventory-api)", "--to-label", "tier=backend") == \
        set(ALL) - {"AGENT"}  # two selectors are OR: every flow has a destination that passes one


def test_selector_syntax() -> None:
    assert [(r.source, r.key, r.op, r.values) for r in parse_selector("k8s:app in (a, b),!debug,tier")] == [
        ("k8s", "app", "in", ("a", "b")), ("any", "debug", "!", ()), ("any", "tier", "exists", ())]
    assert [(r.key, r.op) for r in parse_selector("io.kubernetes.pod.namespace==x,n>3")] == [
        ("io.kubernetes.pod.namespace", "="), ("n", "gt")]
    for bad in ("app=", "app in a", "=x", "app=x,,", "app in (a", "app=x y", "n>three"):
        if bad == "app=":
            assert parse_selector(bad)[0].values == ("",)  # an empty value is a value, as in Kubernetes
            continue
        with pytest.raises(ValueError):
            parse_selector(bad)


def test_identity() -> None:
    assert shown("--identity", "259") == shown("--pod", "retail/reporting")
    assert shown("--to-identity", "16777216") == WORLD_FLOW
    assert shown("--to-identity", "world") == set()  # www.example.com has its FQDN identity
    assert shown("--from-identity", "257", "--to-identity", "300") == {"DNS_REQUEST"}
    assert shown("--identity", "4294967295") == set()  # the largest identity Hubble takes


def test_protocol() -> None:
    assert shown("--protocol", "udp") == DNS_QUERY
    assert shown("--protocol", "icmp") == ICMP
    assert shown("--protocol", "dns") == DNS_QUERY
    assert shown("--protocol", "http") == HTTP
    assert shown("--protocol", "TCP") == set(ALL) - DNS_QUERY - ICMP - {"AGENT"}
    assert shown("--protocol", "udp", "--protocol", "icmp") == DNS_QUERY | ICMP


def test_ports() -> None:
    assert shown("--to-port", "53") == {"DNS_REQUEST"}
    assert shown("--to-port", "80") == {"FORWARD", "FORWARD_TRACE"} | WORLD_FLOW
    assert shown("--port", "53") == DNS_QUERY
    assert shown("--from-port", "8080") == {"GET_RESPONSE", "DELETE_RESPONSE"}  # a response's source is the server
    assert shown("--port", "40000", "--protocol", "udp") == DNS_QUERY  # either side's port
    assert ICMP <= shown("--not", "--port", "1")  # no port at all: ICMP matches no port filter, so it stays


def test_http() -> None:
    assert shown("--http-method", "delete") == {"DELETE_REQUEST", "DELETE_RESPONSE"}  # any case
    assert shown("--http-method", "GET", "--http-method", "DELETE") == HTTP
    assert shown("--http-status", "403") == {"DELETE_RESPONSE"}  # requests carry no status
    assert shown("--http-status", "4+") == {"DELETE_RESPONSE"}
    assert shown("--http-status", "2+", "--http-status", "5+") == {"GET_RESPONSE"}
    assert shown("--http-status", "20+") == {"GET_RESPONSE"}
    assert shown("--http-path", "^/api/inventory/item[0-9]+$", "--http-method", "GET") == {"GET_REQUEST", "GET_RESPONSE"}
    assert shown("--http-path", "item") == shown("--protocol", "http")  # searched, not anchored, as Go's MatchString
    assert shown("--http-path", "inventory-api") == set()  # the path only, not the host
    assert shown("--http-url", "inventory-api:8080/api") == shown("--protocol", "http")


def test_http_filters_need_a_type_filter_that_takes_l7() -> None:
    """pkg/hubble/filters/http.go: no --type, or one of them l7; other types are refused (below)."""
    assert shown("--type", "l7", "--http-status", "403") == {"DELETE_RESPONSE"}
    assert shown("--type", "drop", "--type", "l7", "--http-method", "DELETE") == {"DELETE_REQUEST", "DELETE_RESPONSE"}
    # A --not flag is in the other list: each list is checked on its own, as Hubble's filters are.
    assert shown("--type", "l7", "--not", "--http-status", "403") == HTTP - {"DELETE_RESPONSE"} | DNS_QUERY
    assert shown("--type", "drop", "--not", "--http-method", "GET") == {"DROP", "PROXY_DROP"}


def test_types() -> None:
    assert shown("--type", "l7") == HTTP | DNS_QUERY
    assert shown("--type", "drop") == {"DROP", "PROXY_DROP"}
    assert shown("--type", "drop:133") == {"DROP"}
    assert shown("--type", "drop:178") == {"PROXY_DROP"}  # SOCKET_LOOKUP_FAILED
    assert shown("--type", "drop:130") == set()
    assert shown("--type", "trace") == {"GET_TRACE", "FORWARD_TRACE", "WORLD_TRACE", "ICMP_TRACE"}
    assert shown("--type", "trace:to-proxy") == {"GET_TRACE"}
    assert shown("--type", "trace:to-endpoint") == {"FORWARD_TRACE", "ICMP_TRACE"}  # sub_type 0, left out of the JSON
    assert shown("--type", "trace:to-stack") == {"WORLD_TRACE"}
    assert shown("--type", "trace:to-crypto") == set()  # a point l7lab never reports, still a name --type takes
    assert shown("--type", "policy-verdict") == POLICY_VERDICTS
    assert shown("--type", "drop", "--type", "policy-verdict") == POLICY_VERDICTS | {"DROP", "PROXY_DROP"}
    assert shown("--type", "agent") == {"AGENT"}
    assert shown("--type", "5") == POLICY_VERDICTS
    assert shown("--type", "255:255") == set()  # the largest type and sub-type (one byte each)


def test_vocabulary_is_hubble_py_s() -> None:
    """One table per concept, in dataplane/hubble.py: the filters read its names."""
    assert hubblefilter.VERDICTS is hubble.VERDICTS
    assert hubblefilter.EVENT_TYPES == {name: number for number, name in hubble.EVENT_TYPE_NAMES.items()}
    assert hubblefilter.TRACE_POINTS == {name: number for number, name in hubble.TRACE_POINTS.values()}
    assert hubblefilter.TRACE_POINTS["from-crypto"] == 12 and hubble.TRACE_POINT_OF_SUBTYPE[13] == "TO_CRYPTO"
    # Every event type and trace point of a flow hubble.py makes is one a --type name selects.
    for f in (v for v in ALL.values() if "event_type" in v):
        kind = hubble.event_type_name(f)
        point = f.get("trace_observation_point")
        name = f"{kind}:{hubble.TRACE_POINTS[point][1]}" if point else kind
        assert f in [x for x in ALL.values() if filters("--type", name).matches(x)], name


def test_tcp_flags_and_direction() -> None:
    assert shown("--tcp-flags", "ack,psh") == {"PROXY_DROP"}  # all of them
    assert shown("--tcp-flags", "syn,ack") == set()
    assert shown("--tcp-flags", "syn") == {"GET_VERDICT", "GET_TRACE", "DROP_VERDICT", "DROP", "FORWARD",
                                           "FORWARD_TRACE"} | WORLD_FLOW  # an L7 flow has no packet
    assert shown("--traffic-direction", "egress") == DNS_QUERY | WORLD_FLOW


def test_fqdn() -> None:
    assert shown("--to-fqdn", "www.example.com") == WORLD_FLOW
    assert shown("--to-fqdn", "WWW.example.com.") == WORLD_FLOW  # any case, a trailing dot
    assert shown("--fqdn", "*.example.com") == WORLD_FLOW
    assert shown("--fqdn", "*") == WORLD_FLOW  # only flows with a name
    assert shown("--to-fqdn", "example.com") == set()  # the whole name
    assert shown("--from-fqdn", "*.example.com") == set()
    assert shown("--to-fqdn", "*.example.org", "--to-fqdn", "www.*.com") == WORLD_FLOW


def test_ip() -> None:
    assert shown("--to-ip", "203.0.113.0/24") == WORLD_FLOW
    assert shown("--ip", "10.10.0.53") == DNS_QUERY


def test_not_makes_a_blacklist_of_the_next_flag() -> None:
    not_forwarded = {"GET_VERDICT", "DELETE_REQUEST", "DROP_VERDICT", "DROP", "PROXY_DROP", "AGENT"}
    assert shown("--not", "--verdict", "FORWARDED") == not_forwarded
    # --not covers one flag: the next one is a whitelist filter again.
    assert shown("--not", "--verdict", "FORWARDED", "--type", "l7") == {"DELETE_REQUEST"}
    # Every --not of a command line builds one blacklist filter: its criteria are AND, as in Hubble.
    assert shown("--not", "--verdict", "DROPPED", "--not", "--type", "l7") == set(ALL) - {"DELETE_REQUEST"}
    assert shown("--not", "--pod", "retail/reporting") == set(ALL) - shown("--pod", "retail/reporting")
    assert shown("--not", "--type", "agent") == set(ALL) - {"AGENT"}


def test_agent_events_pass_only_type_filters() -> None:
    assert "AGENT" in shown() and "AGENT" in shown("--type", "agent", "--type", "l7")
    assert "AGENT" not in shown("--type", "l7") and "AGENT" not in shown("--verdict", "FORWARDED")
    assert "AGENT" in shown("--not", "--verdict", "FORWARDED")


@pytest.mark.parametrize(("argv", "message"), [
    (("--verdict", "DENIED"), "--verdict: expected one of FORWARDED, DROPPED"),
    (("--type", "drops"), "--type: expected an event type (drop, debug"),
    (("--type", "trace:to-moon"), "--type: expected a sub-type name (to-endpoint"),
    (("--from-pod", ""), "--from-pod: expected [NAMESPACE/]POD"),
    (("--namespace", "a/b"), "--namespace: expected a namespace name"),
    (("--label", "app in a"), "--label: expected a label selector"),
    (("--identity", "everyone"), "--identity: expected a numeric security identity or one of host, world"),
    (("--protocol", "quic"), "--protocol: expected one of tcp, udp"),
    (("--port", "http"), "--port: expected a port number (0-65535), got 'http'"),
    (("--to-port", "70000"), "--to-port: expected a port number"),
    (("--http-path", "/api/(unclosed"), "--http-path: expected a regular expression (RE2 syntax)"),
    (("--http-path", "(a)\\1"), "--http-path: expected a regular expression (RE2 syntax)"),  # no backreferences in RE2
    (("--http-status", "4xx"), "--http-status: expected a status code (403) or a prefix of one (4+, 40+)"),
    (("--http-status", "600"), "--http-status: expected a status code"),
    (("--http-method", "GET /"), "--http-method: expected an HTTP method"),
    (("--tcp-flags", "syn,hello"), "--tcp-flags: expected TCP flags"),
    (("--traffic-direction", "up"), "--traffic-direction: expected ingress or egress"),
    (("--to-ip", "10.0.0.300"), "--to-ip: expected an IP address or a CIDR"),
    (("--to-fqdn", "www example.com"), "--to-fqdn: expected a DNS name or pattern"),
    (("--fqdn", "."), "--fqdn: expected a DNS name or pattern"),
    (("--fqdn", "x", "--to-ip", "10.0.0.1"), "filters --to-ip and --fqdn cannot be combined"),
    (("--not",), "--not: a trailing --not"),
    (("--not", "--not", "--verdict", "DROPPED"), "--not: consecutive --not"),
    (("--label", "a", "--from-label", "b"), "filters --label and --from-label cannot be combined"),
    (("--port", "1", "--to-port", "2"), "filters --port and --to-port cannot be combined"),
    # Numbers: ASCII digits, within the field's range, however long the text (int() refuses > 4300 digits).
    (("--port", "\u0663"), "--port: expected a port number (0-65535)"),  # ARABIC-INDIC DIGIT THREE
    (("--port", "9" * 5000), "--port: expected a port number (0-65535)"),
    (("--to-port", "-1"), "--to-port: expected a port number"),
    (("--identity", "4294967296"), "--identity: expected a numeric security identity"),
    (("--from-identity", "9" * 5000), "--from-identity: expected a numeric security identity"),
    (("--type", "99999999999999999999"), "--type: expected an event type (drop, debug, capture, trace, "
                                         "policy-verdict, trace-sock, l7, agent) or its number (0-255)"),
    (("--type", "9" * 5000), "--type: expected an event type"),
    (("--type", "drop:256"), "--type: expected a sub-type name or number (0-255) after drop:"),
    (("--type", "trace:" + "9" * 5000), "--type: expected a sub-type name (to-endpoint"),
    # HTTP criteria with event types that are not L7 (pkg/hubble/filters/http.go).
    (("--http-status", "403", "--type", "drop"), "--http-status: cannot be combined with --type drop: filtering by "
                                                 "HTTP status code requires the event type filter to match 'l7' events"),
    (("--type", "policy-verdict", "--http-method", "GET"), "--http-method: cannot be combined with --type "
                                                           "policy-verdict: filtering by HTTP method requires"),
    (("--type", "trace", "--type", "drop", "--http-path", "^/api"), "--http-path: cannot be combined with --type "
                                                                    "trace --type drop"),
    (("--type", "0", "--http-url", "x"), "--http-url: cannot be combined with --type 0"),  # Hubble: 129 only
    (("--not", "--type", "drop", "--not", "--http-status", "4+"), "--http-status: cannot be combined with --type drop"),
    (("--namespace", "retail", "--from-pod", "x"), "filters --from-pod and --namespace cannot be combined"),
    (("--namespace", "retail", "--pod", "kube-system/kube-dns"), "namespace conflict: 'retail' does not contain"),
])
def test_bad_values_name_the_flag_and_what_was_expected(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(FilterError) as caught:
        filters(*argv)
    assert message in str(caught.value)


def test_conflicting_flags_may_go_to_different_lists() -> None:
    """A conflict is within the whitelist or within the blacklist, as in Hubble."""
    assert shown("--label", "app=reporting", "--not", "--from-label", "app=reporting") == {"FORWARD",
                                                                                         "FORWARD_TRACE"} | ICMP
