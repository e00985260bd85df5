"""Hubble's metric handlers over Hubble flow dicts: which flows each metric counts, with which
label values (as Cilium's pkg/hubble/metrics handlers give them), the policy that dropped a
flow, the histogram's buckets, the bounds on client-chosen label values, and the exposition
a Prometheus scrapes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from dataplane.hubblemetrics import (CONTEXT_LABELS, DURATION_BUCKETS, METRIC_NAMES, HubbleCounters,
                                     HubbleSnapshot, context_values)
from dataplane import lab as labmod
from dataplane.agent import LabService
from dataplane.flowrecord import L4, L7, Endpoint, Flow, FlowType, PolicyAttribution, TrafficDirection, Verdict
from dataplane.flowrender import json_line
from dataplane.hubble import hubble_flows
from dataplane.metrics import LabCollector, LabCounters, MetricsSnapshot
from dataplane.policy.engine import PolicyEngine
from dataplane.scenario import parse_scenario
from dataplane.yamlsource import load_documents
from l7.http import HttpFlow
from tests.support.policy import TWO_PODS_ALLOW_B


def endpoint(ns: str, pod: str, ident: int, ep_id: int) -> dict[str, Any]:
    return {"ID": ep_id, "identity": ident, "namespace": ns, "pod_name": pod,
            "labels": [f"k8s:app={pod}", f"k8s:io.kubernetes.pod.namespace={ns}"],
            "workloads": [{"name": pod, "kind": "Pod"}]}


FRONTEND = endpoint("retail", "frontend-app", 256, 11)
INVENTORY = endpoint("retail", "inventory-api", 257, 12)
REPORTING = endpoint("retail", "reporting", 258, 13)
WORLD = {"identity": 2, "labels": ["reserved:world"]}
HOST = {"identity": 1, "labels": ["reserved:host"]}
READ_ONLY = {"name": "inventory-read-only", "namespace": "retail", "kind": "CiliumNetworkPolicy",
             "labels": [], "revision": 1}


def l34(src: dict, dst: dict, verdict: str, event: dict, *, flags: dict | None = None, udp: bool = False,
        direction: str = "INGRESS", **extra: Any) -> dict[str, Any]:
    l4 = ({"UDP": {"source_port": 40000, "destination_port": 53}} if udp else
          {"TCP": {"source_port": 40000, "destination_port": 8080, "flags": flags or {"SYN": True}}})
    return {"time": "2026-12-01T06:50:41.123456Z", "verdict": verdict, "IP": {"source": "10.10.0.11",
            "destination": "10.10.0.12", "ipVersion": "IPv4"}, "l4": l4, "source": src, "destination": dst,
            "Type": "L3_L4", "node_name": "l7lab/retail", "event_type": event, "traffic_direction": direction,
            "is_reply": False, **extra}


def policy_drop(src: dict = REPORTING, dst: dict = INVENTORY, reason: str = "POLICY_DENIED",
                **extra: Any) -> list[dict[str, Any]]:
    """The two Hubble flows of a kernel policy drop: the policy verdict and the drop."""
    return [l34(src, dst, "DROPPED", {"type": 5}, drop_reason_desc=reason, policy_match_type=0, **extra),
            l34(src, dst, "DROPPED", {"type": 1, "sub_type": 133}, drop_reason_desc=reason, **extra)]


def redirect(src: dict = FRONTEND, dst: dict = INVENTORY) -> list[dict[str, Any]]:
    return [l34(src, dst, "REDIRECTED", {"type": 5}, policy_match_type=2, ingress_allowed_by=[READ_ONLY]),
            l34(src, dst, "REDIRECTED", {"type": 4, "sub_type": 1}, trace_observation_point="TO_PROXY")]


def http(method: str, code: int, *, denied: bool, latency_ns: int = 2_000_000, direction: str = "INGRESS",
         protocol: str = "HTTP/1.1") -> list[dict[str, Any]]:
    """An L7 request and its response, as the proxy's record gives them."""
    base = {"time": "2026-12-01T06:50:41.2Z", "IP": {"source": "10.10.0.11", "destination": "10.10.0.12",
            "ipVersion": "IPv4"}, "l4": {"TCP": {"source_port": 40000, "destination_port": 8080}},
            "Type": "L7", "node_name": "l7lab/retail", "event_type": {"type": 129},
            "traffic_direction": direction}
    request = {**base, "source": FRONTEND, "destination": INVENTORY, "is_reply": False,
               "verdict": "DROPPED" if denied else "FORWARDED",
               "l7": {"type": "REQUEST", "http": {"method": method, "url": "http://inventory-api:8080/x",
                                                  "protocol": protocol, "headers": []}}}
    if denied:
        request["ingress_denied_by"] = [READ_ONLY]
    response = {**base, "source": INVENTORY, "destination": FRONTEND, "is_reply": True, "verdict": "FORWARDED",
                "l7": {"type": "RESPONSE", "latency_ns": str(latency_ns),
                       "http": {"code": code, "method": method, "url": "http://inventory-api:8080/x",
                                "protocol": protocol, "headers": []}}}
    return [request, response]


def dns(query: str, rcode: int, *, denied: bool, ips: list[str] | None = None) -> list[dict[str, Any]]:
    bot, kube_dns = endpoint("shop", "mediabot", 300, 21), endpoint("kube-system", "kube-dns", 301, 22)
    base = {"IP": {"source": "10.10.0.21", "destination": "10.10.0.22", "ipVersion": "IPv4"},
            "l4": {"UDP": {"source_port": 40000, "destination_port": 53}}, "Type": "L7",
            "event_type": {"type": 129}, "traffic_direction": "EGRESS"}
    d = {"query": query + ".", "qtypes": ["A"], "observation_source": "proxy"}
    request = {**base, "source": bot, "destination": kube_dns, "is_reply": False,
               "verdict": "DROPPED" if denied else "FORWARDED", "l7": {"type": "REQUEST", "dns": dict(d)}}
    if denied:
        request["egress_denied_by"] = [{"name": "mediabot-dns", "namespace": "shop", "kind": "CiliumNetworkPolicy"}]
    response = {**base, "source": kube_dns, "destination": bot, "is_reply": True, "verdict": "FORWARDED",
                "l7": {"type": "RESPONSE", "latency_ns": "500000",
                       "dns": {**d, "rcode": rcode, "ips": ips or [], "rrtypes": ["A"] * len(ips or [])}}}
    return [request, response]


def counted(flows: list[dict[str, Any]], isolating: Any = None) -> HubbleSnapshot:
    counters = HubbleCounters(isolating)
    for flow in flows:
        counters.process(flow)
    return counters.snapshot()


def ctx(src: dict, dst: dict) -> tuple[str, ...]:
    return (src.get("pod_name", ""), src.get("namespace", ""), src.get("pod_name", ""),
            dst.get("pod_name", ""), dst.get("namespace", ""), dst.get("pod_name", ""))


def test_context_labels_are_hubbles_labels_context() -> None:
    assert CONTEXT_LABELS == ("source_pod", "source_namespace", "source_workload",
                              "destination_pod", "destination_namespace", "destination_workload")
    assert context_values(redirect()[0]) == ("frontend-app", "retail", "frontend-app",
                                             "inventory-api", "retail", "inventory-api")
    flow = l34(FRONTEND, WORLD, "FORWARDED", {"type": 5}, direction="EGRESS")
    assert context_values(flow) == ("frontend-app", "retail", "frontend-app", "", "", "")  # a world host is no pod


def test_a_policy_drop_counts_as_hubble_counts_it() -> None:
    snap = counted(policy_drop())
    c = ctx(REPORTING, INVENTORY)
    assert snap.counters["hubble_flows_processed_total"] == {("TCP", "PolicyVerdict", "", "DROPPED", *c): 1,
                                                             ("TCP", "Drop", "", "DROPPED", *c): 1}
    # Hubble's drop handler counts every DROPPED flow: the verdict and the drop notification both
    assert snap.counters["hubble_drop_total"] == {(*c, "POLICY_DENIED", "TCP"): 2}
    assert snap.counters["hubble_policy_verdicts_total"] == {("ingress", "none", "dropped", *c): 1}
    assert snap.counters["hubble_tcp_flags_total"] == {}  # only forwarded and redirected flows count


def test_a_redirect_is_a_policy_verdict_a_trace_and_a_syn() -> None:
    snap = counted(redirect())
    c = ctx(FRONTEND, INVENTORY)
    assert snap.counters["hubble_flows_processed_total"] == {("TCP", "PolicyVerdict", "", "REDIRECTED", *c): 1,
                                                             ("TCP", "Trace", "to-proxy", "REDIRECTED", *c): 1}
    assert snap.counters["hubble_policy_verdicts_total"] == {("ingress", "l3-l4", "redirected", *c): 1}
    assert snap.counters["hubble_tcp_flags_total"] == {("SYN", "IPv4", *c): 2}
    assert snap.counters["hubble_drop_total"] == {}


def test_tcp_flags_as_hubble_names_them() -> None:
    flows = [l34(FRONTEND, INVENTORY, "FORWARDED", {"type": 4, "sub_type": 0}, flags=f)
             for f in ({"SYN": True, "ACK": True}, {"FIN": True, "ACK": True}, {"RST": True}, {"ACK": True})]
    c = ctx(FRONTEND, INVENTORY)
    assert counted(flows).counters["hubble_tcp_flags_total"] == {("SYN-ACK", "IPv4", *c): 1,
                                                                 ("FIN", "IPv4", *c): 1, ("RST", "IPv4", *c): 1}


def test_the_hosts_own_policy_verdicts_are_not_counted() -> None:
    snap = counted([l34(HOST, INVENTORY, "FORWARDED", {"type": 5}, policy_match_type=4)])
    assert snap.counters["hubble_policy_verdicts_total"] == {}
    assert sum(snap.counters["hubble_flows_processed_total"].values()) == 1


def test_http_requests_responses_and_latency() -> None:
    snap = counted(http("GET", 200, denied=False, latency_ns=3_000_000) + http("DELETE", 403, denied=True))
    fwd, back = ctx(FRONTEND, INVENTORY), ctx(INVENTORY, FRONTEND)
    assert snap.counters["hubble_http_requests_total"] == {(*fwd, "GET", "HTTP/1.1", "server"): 1,
                                                          (*fwd, "DELETE", "HTTP/1.1", "server"): 1}
    # the response flow goes the other way: its context is the response's own (httpV1)
    assert snap.counters["hubble_http_responses_total"] == {(*back, "GET", "HTTP/1.1", "200", "server"): 1,
                                                           (*back, "DELETE", "HTTP/1.1", "403", "server"): 1}
    get = snap.histograms["hubble_http_request_duration_seconds"][(*back, "GET", "server")]
    assert get.count == 1 and abs(get.total - 0.003) < 1e-12
    assert dict(get.cumulative)["0.005"] == 1 and dict(get.cumulative)["+Inf"] == 1
    assert [le for le, _ in get.cumulative] == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
                                                "2.5", "5", "10", "+Inf"]
    assert snap.counters["hubble_policy_verdicts_total"] == {
        ("ingress", "l7/http", "forwarded", *fwd): 1, ("ingress", "l7/http", "dropped", *fwd): 1,
        ("ingress", "l7/http", "forwarded", *back): 2}
    assert snap.counters["hubble_drop_total"] == {(*fwd, "DROP_REASON_UNKNOWN", "HTTP"): 1}
    assert snap.value("hubble_flows_processed_total", type="L7", subtype="HTTP") == 4


def test_the_reporter_is_the_side_whose_proxy_saw_it() -> None:
    snap = counted(http("GET", 200, denied=False, direction="EGRESS")[:1]
                   + http("GET", 200, denied=False, direction="TRAFFIC_DIRECTION_UNKNOWN")[:1])
    assert snap.value("hubble_http_requests_total", reporter="client") == 1
    assert snap.value("hubble_http_requests_total", reporter="unknown") == 1


def test_latency_lands_in_hubbles_buckets() -> None:
    assert DURATION_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    flows = [f for ns in (1_000_000, 7_000_000, 300_000_000, 20_000_000_000)
             for f in http("GET", 200, denied=False, latency_ns=ns)[1:]]
    (h,) = counted(flows).histograms["hubble_http_request_duration_seconds"].values()
    cumulative = dict(h.cumulative)
    assert (cumulative["0.005"], cumulative["0.01"], cumulative["0.25"], cumulative["0.5"], cumulative["10"],
            cumulative["+Inf"]) == (1, 2, 2, 3, 3, 4)
    assert h.count == 4


def test_dns_queries_refusals_and_answers() -> None:
    snap = counted(dns("www.example.org", 5, denied=True) + dns("www.example.com", 0, denied=False,
                                                                 ips=["203.0.113.20"]))
    bot = endpoint("shop", "mediabot", 300, 21)
    kube_dns = endpoint("kube-system", "kube-dns", 301, 22)
    q, r = ctx(bot, kube_dns), ctx(kube_dns, bot)
    assert snap.counters["hubble_dns_queries_total"] == {(*q, "Policy denied", "A", "0"): 1, (*q, "", "A", "0"): 1}
    assert snap.counters["hubble_dns_responses_total"] == {(*r, "Query Refused", "A", "0"): 1,
                                                          (*r, "No Error", "A", "1"): 1}
    assert snap.counters["hubble_dns_response_types_total"] == {(*r, "A", "A"): 1}
    assert snap.value("hubble_policy_verdicts_total", match="l7/dns", action="dropped") == 1


def test_the_policy_that_dropped_a_flow() -> None:
    """Denied-by names it (an explicit deny, an L7 denial); a default deny is the isolating policy's."""
    isolating_calls = []

    def isolating(namespace: str, pod: str, direction: str) -> list[tuple[str, str, str]]:
        isolating_calls.append((namespace, pod, direction))
        return [("CiliumNetworkPolicy", "retail", "inventory-read-only")] if pod == "inventory-api" else []

    flows = (policy_drop() + policy_drop() + http("DELETE", 403, denied=True)
             + policy_drop(reason="POLICY_DENY", ingress_denied_by=[{**READ_ONLY, "name": "deny-reporting"}])
             + policy_drop(src=INVENTORY, dst=endpoint("retail", "payment-gateway", 259, 14)))
    snap = counted(flows, isolating)
    c = ctx(REPORTING, INVENTORY)
    pay = ctx(INVENTORY, endpoint("retail", "payment-gateway", 259, 14))
    assert snap.counters["l7lab_policy_drops_total"] == {
        ("CiliumNetworkPolicy", "retail", "inventory-read-only", "ingress", "none", "POLICY_DENIED", *c): 2,
        ("CiliumNetworkPolicy", "retail", "inventory-read-only", "ingress", "l7/http", "", *ctx(FRONTEND, INVENTORY)): 1,
        ("CiliumNetworkPolicy", "retail", "deny-reporting", "ingress", "none", "POLICY_DENY", *c): 1,
        ("", "", "", "ingress", "none", "POLICY_DENIED", *pay): 1,  # nothing isolates it here: no policy to name
    }
    # the deciding endpoint (ingress: the destination), asked only when no deny names a policy
    assert set(isolating_calls) == {("retail", "inventory-api", "INGRESS"), ("retail", "payment-gateway", "INGRESS")}


def test_an_l7_denial_naming_no_policy_is_the_isolating_policys() -> None:
    """A request of a protocol the redirect's rules do not cover (HTTP on a DNS-only port) is
    denied naming no policy: the policy isolating the deciding endpoint (egress: the source) is named."""
    request, _response = dns("x.example.org", 5, denied=True)
    del request["egress_denied_by"]
    snap = counted([request], lambda ns, pod, d: [("CiliumNetworkPolicy", ns, f"{pod}-{d.lower()}")])
    assert snap.value("l7lab_policy_drops_total", policy_name="mediabot-egress", policy_namespace="shop",
                      match="l7/dns", direction="egress") == 1


def test_client_chosen_values_are_bounded() -> None:
    flows = [f for m in ("FROB", "GET\x00", "get") for f in http(m, 400, denied=False, protocol="HTTP/9")]
    snap = counted(flows)
    assert {k[-3:] for k in snap.counters["hubble_http_requests_total"]} == {("OTHER", "OTHER", "server")}
    assert snap.value("hubble_http_requests_total", method="OTHER") == 3
    many = dns("x.example.com", 0, denied=False)
    many[0]["l7"]["dns"]["qtypes"] = ["A", "TYPE65280"]
    mixed = dns("x.example.com", 0, denied=False)
    mixed[0]["l7"]["dns"]["qtypes"] = ["A", "AAAA", "MX", "TXT"]
    qtypes = {k[-2] for k in counted(many[:1] + mixed[:1]).counters["hubble_dns_queries_total"]}
    assert qtypes == {"A,OTHER", "OTHER"}


def scrape(snapshot: MetricsSnapshot) -> dict[str, Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LabCollector("retail", lambda: snapshot))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def test_the_scrape_carries_every_hubble_family_beside_l7labs() -> None:
    counters = HubbleCounters(lambda _n, _p, _d: [("CiliumNetworkPolicy", "retail", "inventory-read-only")])
    flows = (policy_drop() + redirect() + http("DELETE", 403, denied=True) + dns("x.example.org", 5, denied=True)
             + dns("www.example.com", 0, denied=False, ips=["203.0.113.20"]))
    for flow in flows:
        counters.process(flow)
    snapshot = MetricsSnapshot.take(LabCounters(counters), {}, policies=2, proxy_up=True, proxy_restarts=0)
    parsed, text = scrape(snapshot)
    names = {s.name for f in parsed.values() for s in f.samples}
    assert {n for n in METRIC_NAMES if not n.endswith("_seconds")} <= names
    assert {"hubble_http_request_duration_seconds_bucket", "hubble_http_request_duration_seconds_sum",
            "hubble_http_request_duration_seconds_count"} <= names
    assert {"l7lab_flow_events", "l7lab_proxy_up"} <= set(parsed)  # l7lab's own stay beside them
    line = ('l7lab_policy_drops_total{destination_namespace="retail",destination_pod="inventory-api",'
            'destination_workload="inventory-api",direction="ingress",lab="retail",match="none",'
            'policy_kind="CiliumNetworkPolicy",policy_name="inventory-read-only",policy_namespace="retail",'
            'reason="POLICY_DENIED",source_namespace="retail",source_pod="reporting",source_workload="reporting"} 1.0')
    assert line in text.splitlines()
    bucket = next(s for s in parsed["hubble_http_request_duration_seconds"].samples
                  if s.name.endswith("_bucket") and s.labels["le"] == "0.005")
    assert bucket.value == 1 and "lab" not in bucket.labels  # Hubble's labels, and only those
    assert set(bucket.labels) == {*CONTEXT_LABELS, "method", "reporter", "le"}


def test_families_are_present_before_any_flow() -> None:
    parsed, _ = scrape(MetricsSnapshot())
    assert {"hubble_flows_processed", "hubble_drop", "hubble_http_request_duration_seconds",
            "l7lab_policy_drops"} <= set(parsed)


# --------------------------------------------------------------------------- fed by the agent


def test_the_agent_counts_the_proxys_records_and_names_the_isolating_policy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service counts each L7 record it reads as its Hubble flows, and a default deny of an
    endpoint is the drop of the policies that isolate it in that direction."""
    class NoKernel:
        def poll_events(self, timeout_ms: int = 0) -> list:
            return []

        def metrics_detail(self) -> dict:
            return {}

        def sync(self, state: Any, interfaces: dict[int, int]) -> None:
            return None

        def open_connections(self) -> set:
            return set()

    monkeypatch.setattr(labmod, "RUN_DIR", os.path.realpath(tmp_path))
    (doc,) = load_documents("name: hm\n" + TWO_PODS_ALLOW_B, "hm.yaml")
    scenario = parse_scenario(doc, Path("hm.yaml"))
    lab = labmod.Lab(scenario, "hm-test", datapath=NoKernel(), policy=PolicyEngine(scenario))  # type: ignore[arg-type]
    labmod.lab_dir(lab.name).mkdir(parents=True)
    lab.record.save()
    svc = LabService(lab)
    svc.proxy.next_attempt = float("inf")
    svc.open()
    try:
        a, b = scenario.pods["x/a"], scenario.pods["x/b"]
        a_id = svc.engine.endpoint_id("x/a")
        assert svc.isolating_policies("x", "a", "INGRESS") == [("NetworkPolicy", "x", "allow-b")]
        assert svc.isolating_policies("x", "a", "EGRESS") == []  # allow-b isolates a's ingress only
        assert svc.isolating_policies("x", "b", "INGRESS") == []
        assert svc.isolating_policies("x", "nobody", "INGRESS") == []
        record = Flow(1764561600.2, FlowType.L7, Verdict.DENIED,
                      Endpoint(b.ip, 40000, 300, "x", "b", labels={"app": "b"}),
                      Endpoint(a.ip, 80, 301, "x", "a", labels={"app": "a"}, endpoint_id=a_id),
                      L4("TCP"), TrafficDirection.INGRESS,
                      policy=PolicyAttribution(policies=("NetworkPolicy x/allow-b",)),
                      l7=L7(0.5, HttpFlow(method="DELETE", url="http://a/x", path="/x", protocol="HTTP/1.1", code=403)))
        with (labmod.lab_dir(lab.name) / "l7-events.jsonl").open("a") as f:
            f.write(json_line(record) + "\n")
        svc.take_snapshot()
        snap = svc.snapshot.hubble
        assert snap.value("hubble_http_requests_total", method="DELETE", destination_pod="a") == 1
        assert snap.value("hubble_http_responses_total", status="403") == 1
        assert snap.value("l7lab_policy_drops_total", policy_name="allow-b", match="l7/http") == 1
    finally:
        svc.close()


def test_the_proxys_upstream_leg_is_no_policy_verdict() -> None:
    """The proxy's upstream connection skipped policy (the datapath's from-proxy flag): its one
    Hubble flow is a to-endpoint trace, counted as processed, never as a policy verdict."""
    record = Flow(time=1796108353.0, type=FlowType.L3_L4, verdict=Verdict.FORWARD,
                  source=Endpoint("10.10.0.1", 45438, 256, host="node"),
                  destination=Endpoint("10.10.0.12", 8080, 257, "retail", "inventory-api", "",
                                       {"app": "inventory-api"}, 12),
                  l4=L4("TCP", ("SYN",)), direction=TrafficDirection.INGRESS, from_proxy=True)
    snap = counted(hubble_flows(record, "l7lab/retail"))
    assert snap.counters["hubble_policy_verdicts_total"] == {}
    c = ("", "", "", "inventory-api", "retail", "inventory-api")
    assert snap.counters["hubble_flows_processed_total"] == {("TCP", "Trace", "to-endpoint", "FORWARDED", *c): 1}
