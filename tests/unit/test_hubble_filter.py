"""Hubble's filters over Hubble flow dicts (`dataplane/hubblefilter.py`): each filter flag, the
OR of one flag's values, the AND of different flags, `--pod` on either side, the namespace
flags, `--not`, and a clear error for every bad value. The flows are built by hand in the shape
of `hubble observe -o json` (the retail scenario's pods)."""

from __future__ import annotations

from typing import Any

import pytest

from dataplane.hubblefilter import FilterError, Filters, parse_filters
from dataplane.labelselector import parse_selector

FRONTEND = {"ID": 11, "identity": 257, "namespace": "retail", "pod_name": "frontend-app",
            "labels": ["k8s:app=frontend-app", "k8s:io.kubernetes.pod.namespace=retail"],
            "workloads": [{"name": "frontend-app", "kind": "Pod"}]}
INVENTORY = {"ID": 12, "identity": 258, "namespace": "retail", "pod_name": "inventory-api",
             "labels": ["k8s:app=inventory-api", "k8s:io.kubernetes.pod.namespace=retail", "k8s:tier=backend"]}
REPORTING = {"ID": 13, "identity": 259, "namespace": "retail", "pod_name": "reporting",
             "labels": ["k8s:app=reporting", "k8s:io.kubernetes.pod.namespace=retail"]}
DNS = {"ID": 21, "identity": 300, "namespace": "kube-system", "pod_name": "kube-dns",
       "labels": ["k8s:io.kubernetes.pod.namespace=kube-system", "k8s:k8s-app=kube-dns"]}
WORLD = {"identity": 16777216, "labels": ["reserved:world"]}
IPS = {id(FRONTEND): "10.10.0.11", id(INVENTORY): "10.10.0.12", id(REPORTING): "10.10.0.13", id(DNS): "10.10.0.53",
       id(WORLD): "203.0.113.20"}


def flow(src: dict[str, Any], dst: dict[str, Any], verdict: str = "FORWARDED", *, event: dict[str, int] | None = None,
         proto: str = "TCP", sport: int = 40000, dport: int = 8080, flags: tuple[str, ...] = ("SYN",),
         http: dict[str, Any] | None = None, dns: dict[str, Any] | None = None, reply: bool = False,
         direction: str = "INGRESS") -> dict[str, Any]:
    l4: dict[str, Any] = ({"ICMPv4": {"type": 8, "code": 0}} if proto == "ICMPv4" else
                          {proto: {"source_port": sport, "destination_port": dport}})
    if proto == "TCP" and flags:
        l4["TCP"]["flags"] = {f: True for f in flags}
    out: dict[str, Any] = {
        "time": "2026-12-01T06:50:41.123456Z", "verdict": verdict,
        "IP": {"source": IPS[id(src)], "destination": IPS[id(dst)], "ipVersion": "IPv4"},
        "l4": l4, "source": src, "destination": dst, "Type": "L7" if http or dns else "L3_L4",
        "node_name": "l7lab/flt", "event_type": event or ({"type": 129} if http or dns else {"type": 5}),
        "traffic_direction": direction, "is_reply": reply, "Summary": ""}
    if verdict == "DROPPED":
        out["drop_reason_desc"] = "POLICY_DENIED"
    if http is not None or dns is not None:
        out["l7"] = {"type": "RESPONSE" if reply else "REQUEST", "latency_ns": "0",
                     **({"http": http} if http is not None else {"dns": dns})}
    return out


def request(method: str, path: str, verdict: str = "FORWARDED", dst: dict[str, Any] = INVENTORY) -> dict[str, Any]:
    return flow(FRONTEND, dst, verdict, http={"code": 0, "method": method, "url": f"http://inventory-api:8080{path}",
                                              "protocol": "HTTP/1.1", "headers": []})


def response(method: str, path: str, code: int, dst: dict[str, Any] = INVENTORY) -> dict[str, Any]:
    return flow(FRONTEND, dst, "FORWARDED" if code < 400 else "DROPPED", reply=True,
                http={"code": code, "method": method, "url": f"http://inventory-api:8080{path}", "protocol": "HTTP/1.1"})


# The retail scenario's kinds of flows: a redirect to the proxy (policy verdict + trace to the
# proxy), the L7 request and response of a GET (allowed) and a DELETE (denied), an L3/L4 drop of
# reporting (policy verdict + drop), a DNS question and a world flow.
GET_VERDICT = flow(FRONTEND, INVENTORY, "REDIRECTED")
GET_TRACE = flow(FRONTEND, INVENTORY, "REDIRECTED", event={"type": 4, "sub_type": 1})
GET_REQUEST = request("GET", "/api/inventory/item123")
GET_RESPONSE = response("GET", "/api/inventory/item123", 200)
DELETE_REQUEST = request("DELETE", "/api/inventory/item123", "DROPPED")
DELETE_RESPONSE = response("DELETE", "/api/inventory/item123", 403)
DROP_VERDICT = flow(REPORTING, INVENTORY, "DROPPED")
DROP = flow(REPORTING, INVENTORY, "DROPPED", event={"type": 1, "sub_type": 133})
FORWARD = flow(INVENTORY, REPORTING, dport=80, event={"type": 5})
FORWARD_TRACE = flow(INVENTORY, REPORTING, dport=80, event={"type": 4}, flags=("SYN", "ACK"))
DNS_QUERY = flow(FRONTEND, DNS, proto="UDP", dport=53, direction="EGRESS",
                 dns={"query": "www.example.com.", "qtypes": ["A"], "observation_source": "proxy"})
WORLD_FLOW = {**flow(FRONTEND, WORLD, dport=80, direction="EGRESS"), "destination_names": ["www.example.com"]}
ICMP = flow(FRONTEND, REPORTING, proto="ICMPv4")
AGENT = {"agent_event": {"type": "AGENT_EVENT_UNKNOWN", "unknown": {"type": "proxy exited", "notification": "..."}}}
ALL = {name: value for name, value in globals().items() if isinstance(value, dict) and (
    "verdict" in value or "agent_event" in value)}


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


def test_no_filter_shows_everything() -> None:
    assert shown() == set(ALL) and not filters()


def test_verdict_values_are_or() -> None:
    assert shown("--verdict", "DROPPED") == {"DELETE_REQUEST", "DELETE_RESPONSE", "DROP_VERDICT", "DROP"}
    assert shown("--verdict", "REDIRECTED", "--verdict", "DROPPED") == {
        "GET_VERDICT", "GET_TRACE", "DELETE_REQUEST", "DELETE_RESPONSE", "DROP_VERDICT", "DROP"}
    assert shown("--verdict", "audit") == set()  # a name, in either case


def test_different_flags_are_and() -> None:
    assert shown("--verdict", "DROPPED", "--type", "l7") == {"DELETE_REQUEST", "DELETE_RESPONSE"}
    assert shown("--verdict", "DROPPED", "--type", "l7", "--http-status", "403") == {"DELETE_RESPONSE"}
    assert shown("--http-method", "DELETE", "--http-status", "403") == {"DELETE_RESPONSE"}


def test_pod_is_either_side_from_and_to_pod_one() -> None:
    from_reporting = {"DROP_VERDICT", "DROP"}
    to_reporting = {"FORWARD", "FORWARD_TRACE", "ICMP"}
    assert shown("--from-pod", "retail/reporting") == from_reporting
    assert shown("--to-pod", "retail/reporting") == to_reporting
    assert shown("--pod", "retail/reporting") == from_reporting | to_reporting
    assert shown("--pod", "retail/rep") == from_reporting | to_reporting  # a prefix, as in Hubble
    assert shown("--pod", "reporting") == set()  # no namespace: "default", as in Hubble
    assert shown("--from-pod", "retail/reporting", "--from-pod", "retail/inventory-api") == \
        from_reporting | {"FORWARD", "FORWARD_TRACE"}
    # --pod X --pod Y: from X or Y, or to X or Y.
    assert shown("--pod", "kube-system/kube-dns", "--pod", "retail/reporting") == \
        from_reporting | to_reporting | {"DNS_QUERY"}
    # --pod with another flag: the other flag applies to both sides' filters.
    assert shown("--pod", "retail/reporting", "--verdict", "FORWARDED") == to_reporting


def test_namespaces() -> None:
    assert shown("--namespace", "kube-system") == {"DNS_QUERY"}
    assert shown("--to-namespace", "kube-system") == {"DNS_QUERY"}
    assert shown("--from-namespace", "kube-system") == set()
    in_retail = set(ALL) - {"AGENT", "WORLD_FLOW", "DNS_QUERY"}
    assert shown("--from-namespace", "retail", "--to-namespace", "retail") == in_retail
    assert shown("--namespace", "retail", "--pod", "reporting") == shown("--pod", "retail/reporting")
    assert shown("--from-namespace", "retail", "--to-pod", "kube-dns") == set()  # kube-dns is not in default
    assert shown("--from-namespace", "retail", "--to-pod", "kube-system/kube-dns") == {"DNS_QUERY"}
    # A world host has no namespace: no namespace filter matches it, so --not keeps it.
    assert shown("--not", "--to-namespace", "retail") == {"WORLD_FLOW", "DNS_QUERY", "AGENT"}
    assert shown("--not", "--namespace", "retail") == {"AGENT"}  # every flow has a retail end


def test_labels() -> None:
    assert shown("--from-label", "app=reporting") == {"DROP_VERDICT", "DROP"}
    assert shown("--from-label", "k8s:app=reporting") == {"DROP_VERDICT", "DROP"}
    assert shown("--from-label", "container:app=reporting") == set()  # another source
    assert shown("--to-label", "app in (reporting, kube-dns)") == {"FORWARD", "FORWARD_TRACE", "ICMP"}
    assert shown("--to-label", "k8s-app in (reporting, kube-dns)") == {"DNS_QUERY"}
    assert shown("--to-label", "tier") == shown("--to-pod", "retail/inventory-api")
    assert shown("--to-label", "!tier", "--to-namespace", "retail") == {"FORWARD", "FORWARD_TRACE", "ICMP"}
    assert shown("--to-label", "reserved:world") == {"WORLD_FLOW"}
    assert shown("--label", "app=reporting") == shown("--pod", "retail/reporting")
    assert shown("--to-label", "app!=inventory-api,k8s:io.kubernetes.pod.namespace=retail") == \
        {"FORWARD", "FORWARD_TRACE", "ICMP"}
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
    assert shown("--to-identity", "16777216") == {"WORLD_FLOW"}
    assert shown("--to-identity", "world") == set()  # www.example.com has its FQDN identity
    assert shown("--from-identity", "257", "--to-identity", "300") == {"DNS_QUERY"}


def test_protocol() -> None:
    assert shown("--protocol", "udp") == {"DNS_QUERY"}
    assert shown("--protocol", "icmp") == {"ICMP"}
    assert shown("--protocol", "dns") == {"DNS_QUERY"}
    assert shown("--protocol", "http") == {"GET_REQUEST", "GET_RESPONSE", "DELETE_REQUEST", "DELETE_RESPONSE"}
    assert shown("--protocol", "TCP") == set(ALL) - {"DNS_QUERY", "ICMP", "AGENT"}
    assert shown("--protocol", "udp", "--protocol", "icmp") == {"DNS_QUERY", "ICMP"}


def test_ports() -> None:
    assert shown("--to-port", "53") == {"DNS_QUERY"}
    assert shown("--to-port", "80") == {"FORWARD", "FORWARD_TRACE", "WORLD_FLOW"}
    assert shown("--port", "53") == {"DNS_QUERY"}
    assert shown("--from-port", "8080") == set()
    assert shown("--port", "40000", "--protocol", "udp") == {"DNS_QUERY"}  # either side's port
    assert "ICMP" in shown("--not", "--port", "1")  # no port at all: ICMP matches no port filter, so it stays


def test_http() -> None:
    assert shown("--http-method", "delete") == {"DELETE_REQUEST", "DELETE_RESPONSE"}  # any case
    assert shown("--http-method", "GET", "--http-method", "DELETE") == {
        "GET_REQUEST", "GET_RESPONSE", "DELETE_REQUEST", "DELETE_RESPONSE"}
    assert shown("--http-status", "403") == {"DELETE_RESPONSE"}  # requests carry no status
    assert shown("--http-status", "4+") == {"DELETE_RESPONSE"}
    assert shown("--http-status", "2+", "--http-status", "5+") == {"GET_RESPONSE"}
    assert shown("--http-status", "20+") == {"GET_RESPONSE"}
    assert shown("--http-path", "^/api/inventory/item[0-9]+$", "--http-method", "GET") == {"GET_REQUEST", "GET_RESPONSE"}
    assert shown("--http-path", "item") == shown("--protocol", "http")  # searched, not anchored, as Go's MatchString
    assert shown("--http-path", "inventory-api") == set()  # the path only, not the host
    assert shown("--http-url", "inventory-api:8080/api") == shown("--protocol", "http")


def test_types() -> None:
    assert shown("--type", "l7") == {"GET_REQUEST", "GET_RESPONSE", "DELETE_REQUEST", "DELETE_RESPONSE", "DNS_QUERY"}
    assert shown("--type", "drop") == {"DROP"}
    assert shown("--type", "drop:133") == {"DROP"}
    assert shown("--type", "drop:130") == set()
    assert shown("--type", "trace") == {"GET_TRACE", "FORWARD_TRACE"}
    assert shown("--type", "trace:to-proxy") == {"GET_TRACE"}
    assert shown("--type", "trace:to-endpoint") == {"FORWARD_TRACE"}  # sub_type 0, left out of the JSON
    policy_verdicts = {"GET_VERDICT", "DROP_VERDICT", "FORWARD", "WORLD_FLOW", "ICMP"}
    assert shown("--type", "policy-verdict") == policy_verdicts
    assert shown("--type", "drop", "--type", "policy-verdict") == policy_verdicts | {"DROP"}
    assert shown("--type", "agent") == {"AGENT"}
    assert shown("--type", "5") == policy_verdicts


def test_tcp_flags_and_direction() -> None:
    assert shown("--tcp-flags", "syn,ack") == {"FORWARD_TRACE"}
    assert shown("--traffic-direction", "egress") == {"DNS_QUERY", "WORLD_FLOW"}


def test_fqdn() -> None:
    assert shown("--to-fqdn", "www.example.com") == {"WORLD_FLOW"}
    assert shown("--to-fqdn", "WWW.example.com.") == {"WORLD_FLOW"}  # any case, a trailing dot
    assert shown("--fqdn", "*.example.com") == {"WORLD_FLOW"}
    assert shown("--fqdn", "*") == {"WORLD_FLOW"}  # only flows with a name
    assert shown("--to-fqdn", "example.com") == set()  # the whole name
    assert shown("--from-fqdn", "*.example.com") == set()
    assert shown("--to-fqdn", "*.example.org", "--to-fqdn", "www.*.com") == {"WORLD_FLOW"}


def test_ip() -> None:
    assert shown("--to-ip", "203.0.113.0/24") == {"WORLD_FLOW"}
    assert shown("--ip", "10.10.0.53") == {"DNS_QUERY"}


def test_not_makes_a_blacklist_of_the_next_flag() -> None:
    assert shown("--not", "--verdict", "FORWARDED") == set(ALL) - {
        "GET_REQUEST", "GET_RESPONSE", "FORWARD", "FORWARD_TRACE", "DNS_QUERY", "WORLD_FLOW", "ICMP"}
    # --not covers one flag: the next one is a whitelist filter again.
    assert shown("--not", "--verdict", "FORWARDED", "--type", "l7") == {"DELETE_REQUEST", "DELETE_RESPONSE"}
    # Every --not of a command line builds one blacklist filter: its criteria are AND, as in Hubble.
    assert shown("--not", "--verdict", "DROPPED", "--not", "--type", "l7") == set(ALL) - {
        "DELETE_REQUEST", "DELETE_RESPONSE"}
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
    (("--namespace", "retail", "--from-pod", "x"), "filters --from-pod and --namespace cannot be combined"),
    (("--namespace", "retail", "--pod", "kube-system/kube-dns"), "namespace conflict: 'retail' does not contain"),
])
def test_bad_values_name_the_flag_and_what_was_expected(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(FilterError) as caught:
        filters(*argv)
    assert message in str(caught.value)


def test_conflicting_flags_may_go_to_different_lists() -> None:
    """A conflict is within the whitelist or within the blacklist, as in Hubble."""
    assert shown("--label", "app=reporting", "--not", "--from-label", "app=reporting") == {"FORWARD", "FORWARD_TRACE",
                                                                                         "ICMP"}
