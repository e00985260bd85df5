"""l7lab records in Hubble's shape: each kind of record gives exactly the Hubble flows Cilium
would emit for the same event, with the values a Hubble user checks (verdict, event type, drop
reason, direction, ports and flags, labels, the policies behind it, the L7 part), and the lines
`hubble observe` and `cilium monitor` print for them."""

from __future__ import annotations

import json

import dns.message
import dns.rrset
import pytest

from dataplane import abi
from dataplane.abi import Direction, DropReason, FlowVerdict, Hook, Verdict as MapVerdict
from dataplane.ciliummonitor import monitor_line
from dataplane.datapath import FlowEvent
from dataplane.flowrecord import (Endpoint, Flow, FlowType, L4, L7, PolicyAttribution, TracePoint, TrafficDirection,
                                  Verdict)
from dataplane.flowrender import outcome
from dataplane.flows import Directory, kernel_flow
from dataplane.hubble import (POLICY_MATCH_L3_L4, POLICY_MATCH_NONE, compact, dict_text, event_type_name, hubble_flows,
                              jsonpb, node_name, policy_ref, rfc3339)
from dataplane.mapstate import EndpointState, MapState, PolicyEntry, PolicyKey, RuleAttribution
from l7.dns import DnsFlow
from l7.http import RECORDED_HEADER_VALUE, RECORDED_HEADERS, HttpFlow, recorded_headers
from proxy.dns import RECORDED_ANSWERS, answer_record

NODE = node_name("shp")
WHEN = 1796108353.004943  # 2026-12-01T06:59:13.004943Z
FRONTEND = {"app": "frontend-app", "io.kubernetes.pod.namespace": "retail"}
INVENTORY = {"app": "inventory-api", "io.kubernetes.pod.namespace": "retail"}
READ_ONLY = "CiliumNetworkPolicy retail/inventory-read-only"
DENY_REPORTING = "CiliumNetworkPolicy retail/deny-reporting"


def lab_state() -> MapState:
    """frontend-app (ep 11, id 256) and inventory-api (ep 12, id 257, ingress enforced): rule 2
    redirects frontend-app to port 8080, rule 3 allows it to port 9090, rule 4 denies reporting
    (id 259) any port, rule 5 allows anyone to port 7070."""
    st = MapState()
    st.endpoints[11] = EndpointState(11, "retail/frontend-app", "10.200.0.2", 256, False, False,
                                     labels=tuple(sorted(FRONTEND.items())))
    st.endpoints[12] = EndpointState(12, "retail/inventory-api", "10.200.0.3", 257, True, False,
                                     labels=tuple(sorted(INVENTORY.items())))
    st.rules[2] = RuleAttribution(2, READ_ONLY, 0, "ingress")
    st.rules[3] = RuleAttribution(3, READ_ONLY, 1, "ingress")
    st.rules[4] = RuleAttribution(4, DENY_REPORTING, 0, "ingressDeny")
    st.rules[5] = RuleAttribution(5, "NetworkPolicy retail/open-7070", 0, "ingress")
    st.policy[PolicyKey(12, Direction.INGRESS, 256, 6, 8080, 16)] = PolicyEntry(MapVerdict.REDIRECT, 15001, (2,))
    st.policy[PolicyKey(12, Direction.INGRESS, 256, 6, 9090, 16)] = PolicyEntry(MapVerdict.ALLOW, 0, (3,))
    st.policy[PolicyKey(12, Direction.INGRESS, 259, 0, 0, 0)] = PolicyEntry(MapVerdict.DENY, 0, (4,))
    st.policy[PolicyKey(12, Direction.INGRESS, 0, 6, 7070, 16)] = PolicyEntry(MapVerdict.ALLOW, 0, (5,))
    return st


DIRECTORY = Directory({"10.200.0.2": "retail/frontend-app", "10.200.0.3": "retail/inventory-api",
                       "10.200.0.5": "retail/reporting"},
                      {"10.200.0.1": "node", "203.0.113.20": "www", "203.0.113.22": "partner"},
                      {"203.0.113.20": ("www.example.com",)})


def kernel(verdict: FlowVerdict, reason: DropReason = DropReason.NONE, *, rule_id: int = 0, src: str = "10.200.0.2",
           src_identity: int = 256, src_endpoint: int = 11, dport: int = 8080, dst: str = "10.200.0.3",
           dst_identity: int = 257, dst_endpoint: int = 12, direction: Direction = Direction.INGRESS,
           hook: Hook = Hook.FROM_CONTAINER, flags: int = 0, other_rule_id: int = 0) -> Flow:
    ev = FlowEvent(ts_ns=1, src=src, dst=dst, sport=40512, dport=dport, protocol=6, verdict=verdict, reason=reason,
                   direction=direction, src_identity=src_identity, dst_identity=dst_identity,
                   src_endpoint=src_endpoint, dst_endpoint=dst_endpoint, rule_id=rule_id,
                   proxy_port=15001 if verdict == FlowVerdict.REDIRECT else 0, tcp_flags=0x02,
                   hook=hook, ifindex=5, length=74, flags=flags, other_rule_id=other_rule_id)
    return kernel_flow(ev, lab_state(), DIRECTORY, WHEN)


def pod(ip: str, port: int, identity: int, name: str, labels: dict[str, str], endpoint_id: int) -> Endpoint:
    return Endpoint(ip, port, identity, "retail", name, "", labels, endpoint_id)


FRONTEND_EP = pod("10.200.0.2", 34995, 256, "frontend-app", FRONTEND, 11)
INVENTORY_EP = pod("10.200.0.3", 8080, 257, "inventory-api", INVENTORY, 12)


def http_record(verdict: Verdict, code: int, method: str = "DELETE", policies: tuple[str, ...] = (READ_ONLY,),
                headers: tuple[tuple[str, str], ...] = (("Host", "inventory-api:8080"),)) -> Flow:
    url = "http://inventory-api:8080/api/inventory/item123"
    return Flow(WHEN, FlowType.L7, verdict, FRONTEND_EP, INVENTORY_EP, L4("TCP"), TrafficDirection.INGRESS,
                TracePoint.PROXY, summary="why", policy=PolicyAttribution((), policies, ()),
                l7=L7(2.5, http=HttpFlow(method, url, "/api/inventory/item123", "HTTP/1.1", code, headers)))


def dns_record(verdict: Verdict, name: str, rcode: int, **answer) -> Flow:
    mediabot = Endpoint("10.200.0.7", 51000, 300, "shop", "mediabot", "", {"app": "mediabot"}, 21)
    kube_dns = Endpoint("10.200.0.6", 53, 301, "kube-system", "kube-dns", "", {"k8s-app": "kube-dns"}, 20)
    return Flow(WHEN, FlowType.L7, verdict, mediabot, kube_dns, L4("UDP"), TrafficDirection.EGRESS, TracePoint.PROXY,
                policy=PolicyAttribution((), ("CiliumNetworkPolicy shop/mediabot-dns",), ()),
                l7=L7(0.75, dns=DnsFlow(name, ("A",), rcode, **answer)))


def kinds(flows: list[dict]) -> list[tuple[str, str]]:
    return [(event_type_name(f), f["verdict"]) for f in flows]


# --------------------------------------------------------------------------- kernel records


def test_a_redirect_is_a_redirected_policy_verdict_and_a_trace_to_the_proxy() -> None:
    verdict, trace = flows = hubble_flows(kernel(FlowVerdict.REDIRECT, rule_id=2), NODE)
    assert kinds(flows) == [("policy-verdict", "REDIRECTED"), ("trace", "FORWARDED")]
    assert verdict["event_type"] == {"type": 5} and verdict["policy_match_type"] == 2  # L3-L4: peer and port
    assert verdict["traffic_direction"] == "INGRESS" and verdict["is_reply"] is False and verdict["Type"] == "L3_L4"
    assert verdict["time"] == "2026-12-01T06:59:13.004943Z" and verdict["node_name"] == "l7lab/shp"
    assert verdict["IP"] == {"source": "10.200.0.2", "destination": "10.200.0.3", "ipVersion": "IPv4"}
    assert verdict["l4"] == {"TCP": {"source_port": 40512, "destination_port": 8080, "flags": {"SYN": True}}}
    assert verdict["source"] == {"ID": 11, "identity": 256, "namespace": "retail", "pod_name": "frontend-app",
                                 "labels": ["k8s:app=frontend-app", "k8s:io.kubernetes.pod.namespace=retail"],
                                 "workloads": [{"name": "frontend-app", "kind": "Pod"}]}
    assert verdict["ingress_allowed_by"] == [policy_ref(READ_ONLY)] and "drop_reason_desc" not in verdict
    assert verdict["Summary"] == "TCP Flags: SYN"
    assert trace["event_type"] == {"type": 4, "sub_type": 1} and trace["trace_observation_point"] == "TO_PROXY"
    assert trace["proxy_port"] == 15001 and trace["interface"] == {"index": 5} and "ingress_allowed_by" not in trace
    assert compact(verdict) == ("Dec  1 06:59:13.004: retail/frontend-app:40512 (ID:256) -> retail/inventory-api:8080 "
                                "(ID:257) policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)")
    assert compact(trace) == ("Dec  1 06:59:13.004: retail/frontend-app:40512 (ID:256) -> retail/inventory-api:8080 "
                              "(ID:257) to-proxy FORWARDED (TCP Flags: SYN)")
    assert monitor_line(verdict) == ("Policy verdict log: flow 0x0 local EP ID 12, remote ID 256, proto 6, ingress, "
                                     "action redirect, auth: disabled, match L3-L4, "
                                     "10.200.0.2:40512 -> 10.200.0.3:8080 tcp SYN")
    assert monitor_line(trace) == ("-> proxy port 15001 flow 0x0 , identity 256->257 state new ifindex 5 "
                                   "orig-ip 0.0.0.0: 10.200.0.2:40512 -> 10.200.0.3:8080 tcp SYN")


def test_a_forward_is_an_allowed_policy_verdict_and_a_trace_to_the_endpoint() -> None:
    verdict, trace = flows = hubble_flows(kernel(FlowVerdict.FORWARD, rule_id=3, dport=9090), NODE)
    assert kinds(flows) == [("policy-verdict", "FORWARDED"), ("trace", "FORWARDED")]
    assert verdict["ingress_allowed_by"][0]["name"] == "inventory-read-only"
    assert trace["event_type"] == {"type": 4} and trace["trace_observation_point"] == "TO_ENDPOINT"  # sub_type 0
    assert trace["traffic_direction"] == "INGRESS" and trace["is_reply"] is False
    assert compact(trace).endswith("(ID:257) to-endpoint FORWARDED (TCP Flags: SYN)")
    assert monitor_line(trace) == ("-> endpoint 12 flow 0x0 , identity 256->257 state new ifindex 5 orig-ip 0.0.0.0: "
                                   "10.200.0.2:40512 -> 10.200.0.3:9090 tcp SYN")
    # a rule that names a port but any peer is L4-only; one that names the peer alone L3-only
    l4_only = hubble_flows(kernel(FlowVerdict.FORWARD, rule_id=5, dport=7070), NODE)[0]
    assert l4_only["policy_match_type"] == 3 and "policy-verdict:L4-Only INGRESS ALLOWED" in compact(l4_only)


def test_a_flow_both_sides_allowed_names_both_policies() -> None:
    """The source's egress rule and the destination's ingress rule both allowed the flow: the
    policy verdict carries ingress_allowed_by and egress_allowed_by, as Hubble's does."""
    st_rule = "NetworkPolicy retail/frontend-out"
    record = kernel(FlowVerdict.FORWARD, rule_id=3, dport=9090, other_rule_id=6)
    assert record.other_direction_policy == PolicyAttribution()  # rule 6 is not in the state: named by nobody
    state = lab_state()
    state.rules[6] = RuleAttribution(6, st_rule, 0, "egress")
    ev = FlowEvent(ts_ns=1, src="10.200.0.2", dst="10.200.0.3", sport=40512, dport=9090, protocol=6,
                   verdict=FlowVerdict.FORWARD, reason=DropReason.NONE, direction=Direction.INGRESS,
                   src_identity=256, dst_identity=257, src_endpoint=11, dst_endpoint=12, rule_id=3, proxy_port=0,
                   tcp_flags=0x02, hook=Hook.FROM_CONTAINER, ifindex=5, length=74, other_rule_id=6)
    record = kernel_flow(ev, state, DIRECTORY, WHEN)
    assert record.other_direction_policy.rules == (f"{st_rule} egress[0]",)
    assert Flow.from_json(json.loads(json.dumps(record.to_json()))) == record
    verdict = hubble_flows(record, NODE)[0]
    assert verdict["ingress_allowed_by"][0]["name"] == "inventory-read-only"
    assert verdict["egress_allowed_by"][0]["name"] == "frontend-out"


def test_an_audit_is_an_audited_policy_verdict_and_the_packet_goes_on() -> None:
    verdict, trace = flows = hubble_flows(kernel(FlowVerdict.AUDIT, src="10.200.0.5", src_identity=260,
                                                 src_endpoint=13), NODE)
    assert kinds(flows) == [("policy-verdict", "AUDIT"), ("trace", "FORWARDED")]
    assert "policy_match_type" not in verdict and verdict["is_reply"] is False
    assert compact(verdict).endswith("policy-verdict:none INGRESS AUDITED (TCP Flags: SYN)")
    assert "action audit, auth: disabled, match none" in monitor_line(verdict)


def test_a_policy_drop_is_a_denied_policy_verdict_and_a_drop() -> None:
    record = kernel(FlowVerdict.DROP, DropReason.POLICY_DENIED, src="10.200.0.5", src_identity=260, src_endpoint=13)
    verdict, drop = flows = hubble_flows(record, NODE)
    assert kinds(flows) == [("policy-verdict", "DROPPED"), ("drop", "DROPPED")]
    assert verdict["drop_reason_desc"] == "POLICY_DENIED" and verdict["drop_reason"] == 133
    assert "is_reply" not in verdict and "ingress_denied_by" not in verdict  # default deny: no rule to name
    assert drop["event_type"] == {"type": 1, "sub_type": 133} and drop["drop_reason_desc"] == "POLICY_DENIED"
    assert drop["traffic_direction"] == "INGRESS" and "is_reply" not in drop
    assert drop["source"]["workloads"] == [{"name": "reporting", "kind": "Pod"}]  # no app label: the pod's name
    assert compact(verdict) == ("Dec  1 06:59:13.004: retail/reporting:40512 (ID:260) <> retail/inventory-api:8080 "
                                "(ID:257) policy-verdict:none INGRESS DENIED (TCP Flags: SYN)")
    assert compact(drop) == ("Dec  1 06:59:13.004: retail/reporting:40512 (ID:260) <> retail/inventory-api:8080 "
                             "(ID:257) Policy denied DROPPED (TCP Flags: SYN)")
    assert monitor_line(drop) == ("xx drop (Policy denied) flow 0x0 to endpoint 12, ifindex 5, file bpf_lxc.c:0, , "
                                  "identity 260->257: 10.200.0.5:40512 -> 10.200.0.3:8080 tcp SYN")
    assert monitor_line(verdict) == ("Policy verdict log: flow 0x0 local EP ID 12, remote ID 260, proto 6, ingress, "
                                     "action deny, auth: disabled, match none, "
                                     "10.200.0.5:40512 -> 10.200.0.3:8080 tcp SYN")


def test_an_explicit_deny_names_its_policy_and_is_cilium_policy_deny() -> None:
    record = kernel(FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY, rule_id=4, src="10.200.0.5", src_identity=259,
                    src_endpoint=13)
    verdict, drop = hubble_flows(record, NODE)
    assert verdict["drop_reason_desc"] == drop["drop_reason_desc"] == "POLICY_DENY" and drop["drop_reason"] == 181
    assert verdict["policy_match_type"] == 1  # the deny names the peer, any port: L3-only
    assert verdict["ingress_denied_by"] == [{
        "name": "deny-reporting", "namespace": "retail", "kind": "CiliumNetworkPolicy",
        "labels": ["k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
                   "k8s:io.cilium.k8s.policy.name=deny-reporting", "k8s:io.cilium.k8s.policy.namespace=retail"]}]
    assert compact(drop).endswith("Policy denied by denylist DROPPED (TCP Flags: SYN)")
    assert monitor_line(drop).startswith("xx drop (Policy denied by denylist) flow 0x0 to endpoint 12")


@pytest.mark.parametrize("reason, name, number, text", [
    (DropReason.SOURCE_SPOOFED, "INVALID_SOURCE_IP", 132, "Invalid source ip"),
    (DropReason.MALFORMED_L4, "INVALID_PACKET_DROPPED", 134, "Invalid packet"),
    (DropReason.PROXY_SOCKET_MISSING, "SOCKET_LOOKUP_FAILED", 178, "Socket lookup failed"),
    (DropReason.FRAGMENT_UNKNOWN, "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", 175,
     "First logical datagram fragment not found"),
])
def test_a_drop_that_no_policy_decided_is_one_drop_flow(reason: DropReason, name: str, number: int, text: str) -> None:
    flows = hubble_flows(kernel(FlowVerdict.DROP, reason, direction=Direction.EGRESS), NODE)
    assert kinds(flows) == [("drop", "DROPPED")]
    (drop,) = flows
    assert (drop["drop_reason_desc"], drop["drop_reason"], drop["event_type"]) == (name, number,
                                                                                   {"type": 1, "sub_type": number})
    assert drop["traffic_direction"] == "EGRESS" and "policy_match_type" not in drop
    assert f" {text} DROPPED (TCP Flags: SYN)" in compact(drop)
    assert monitor_line(drop).startswith(f"xx drop ({text}) flow 0x0 to endpoint 12, ifindex 5")


def test_world_hosts_and_the_node_are_reserved_identities_with_names() -> None:
    record = kernel(FlowVerdict.DROP, DropReason.POLICY_DENIED, dst="203.0.113.20", dst_identity=16777217,
                    dst_endpoint=0, direction=Direction.EGRESS, dport=80)
    verdict = hubble_flows(record, NODE)[0]
    assert verdict["destination"] == {"identity": 16777217, "labels": ["reserved:world"]}
    assert verdict["destination_names"] == ["www.example.com"] and verdict["traffic_direction"] == "EGRESS"
    assert compact(verdict) == ("Dec  1 06:59:13.004: retail/frontend-app:40512 (ID:256) <> www.example.com:80 "
                                "(ID:16777217) policy-verdict:none EGRESS DENIED (TCP Flags: SYN)")
    unnamed = kernel(FlowVerdict.DROP, DropReason.POLICY_DENIED, dst="203.0.113.22", dst_identity=2, dst_endpoint=0,
                     direction=Direction.EGRESS, dport=80)
    drop = hubble_flows(unnamed, NODE)[1]
    assert drop["destination_names"] == ["partner"]  # no DNS name in the scenario: the lab's name of the host
    assert "<> partner:80 (world) Policy denied DROPPED" in compact(drop)
    node = kernel(FlowVerdict.FORWARD, rule_id=3, src="10.200.0.1", src_identity=1, src_endpoint=0, dport=9090)
    assert hubble_flows(node, NODE)[0]["source"] == {"identity": 1, "labels": ["reserved:host"]}
    assert compact(hubble_flows(node, NODE)[0]).startswith("Dec  1 06:59:13.004: 10.200.0.1:40512 (host) -> ")


# --------------------------------------------------------------------------- L7 records


def test_a_forwarded_request_is_a_request_and_a_response_with_status_and_latency() -> None:
    request, response = flows = hubble_flows(http_record(Verdict.FORWARDED, 200, "GET"), NODE)
    assert kinds(flows) == [("l7", "FORWARDED"), ("l7", "FORWARDED")]
    assert request["Type"] == "L7" and request["event_type"] == {"type": 129} and request["is_reply"] is False
    assert request["l7"] == {"type": "REQUEST", "http": {
        "method": "GET", "url": "http://inventory-api:8080/api/inventory/item123", "protocol": "HTTP/1.1",
        "headers": [{"key": "Host", "value": "inventory-api:8080"}]}}
    assert request["ingress_allowed_by"] == [policy_ref(READ_ONLY)]
    assert request["l4"] == {"TCP": {"source_port": 34995, "destination_port": 8080}}  # no packet, no flags
    assert response["is_reply"] is True and response["l7"]["type"] == "RESPONSE"
    assert response["l7"]["latency_ns"] == "2500000" and response["l7"]["http"]["code"] == 200
    assert response["source"]["pod_name"] == "inventory-api" and response["IP"]["source"] == "10.200.0.3"
    assert response["l4"] == {"TCP": {"source_port": 8080, "destination_port": 34995}}
    assert compact(request) == ("Dec  1 06:59:13.004: retail/frontend-app:34995 (ID:256) -> retail/inventory-api:8080 "
                                "(ID:257) http-request FORWARDED (HTTP/1.1 GET "
                                "http://inventory-api:8080/api/inventory/item123)")
    assert compact(response) == ("Dec  1 06:59:13.004: retail/frontend-app:34995 (ID:256) <- retail/inventory-api:8080 "
                                 "(ID:257) http-response FORWARDED (HTTP/1.1 200 2ms (GET "
                                 "http://inventory-api:8080/api/inventory/item123))")
    assert monitor_line(request) == (
        "<- Request http from 11 ([k8s:app=frontend-app k8s:io.kubernetes.pod.namespace=retail]) to 12 "
        "([k8s:app=inventory-api k8s:io.kubernetes.pod.namespace=retail]), identity 256->257, verdict Forwarded "
        "GET http://inventory-api:8080/api/inventory/item123 => 0")
    assert monitor_line(response) == (
        "<- Response http to 11 ([k8s:app=frontend-app k8s:io.kubernetes.pod.namespace=retail]) from 12 "
        "([k8s:app=inventory-api k8s:io.kubernetes.pod.namespace=retail]), identity 257->256, verdict Forwarded "
        "GET http://inventory-api:8080/api/inventory/item123 => 200")


def test_a_denied_request_is_dropped_and_names_the_policy_its_403_is_forwarded() -> None:
    request, response = hubble_flows(http_record(Verdict.DENIED, 403), NODE)
    assert (request["verdict"], response["verdict"]) == ("DROPPED", "FORWARDED")
    assert request["ingress_denied_by"] == [policy_ref(READ_ONLY)] and "ingress_allowed_by" not in request
    assert "drop_reason_desc" not in request  # an L7 drop has no datapath drop reason
    assert response["l7"]["http"]["code"] == 403
    assert "http-request DROPPED (HTTP/1.1 DELETE http://inventory-api:8080/api/inventory/item123)" in compact(request)
    assert "http-response FORWARDED (HTTP/1.1 403 2ms (DELETE " in compact(response)
    assert monitor_line(request).endswith(
        "verdict Denied DELETE http://inventory-api:8080/api/inventory/item123 => 403")


def test_a_broken_request_is_an_error_with_a_response_only_if_one_was_sent() -> None:
    bad = Flow(WHEN, FlowType.L7, Verdict.ERROR, FRONTEND_EP, INVENTORY_EP, L4("TCP"), trace_point=TracePoint.PROXY,
               l7=L7(0.1, http=HttpFlow("", "", "", "", 400)))
    request, response = hubble_flows(bad, NODE)
    assert (request["verdict"], response["verdict"], response["l7"]["http"]) == ("ERROR", "FORWARDED", {"code": 400})
    assert "traffic_direction" not in request and "http-request ERROR" in compact(request)
    unreachable = http_record(Verdict.ERROR, 0, "GET", policies=())
    assert kinds(hubble_flows(unreachable, NODE)) == [("l7", "ERROR")]  # nothing sent back: no response


def test_dns_questions_and_answers() -> None:
    request, response = flows = hubble_flows(
        dns_record(Verdict.FORWARDED, "www.example.com", 0, ips=("203.0.113.20",), ttl=300, rrtypes=("A",)), NODE)
    assert kinds(flows) == [("l7", "FORWARDED"), ("l7", "FORWARDED")]
    assert request["l7"] == {"type": "REQUEST", "dns": {"query": "www.example.com.", "observation_source": "proxy",
                                                         "qtypes": ["A"]}}
    assert request["l4"] == {"UDP": {"source_port": 51000, "destination_port": 53}}
    assert request["egress_allowed_by"][0]["name"] == "mediabot-dns" and request["traffic_direction"] == "EGRESS"
    assert response["l7"]["dns"] == {"query": "www.example.com.", "observation_source": "proxy", "qtypes": ["A"],
                                     "ips": ["203.0.113.20"], "ttl": 300, "rrtypes": ["A"]}  # rcode 0 left out
    assert compact(request).endswith("(ID:301) dns-request proxy FORWARDED (DNS Query www.example.com. A)")
    assert compact(response) == ("Dec  1 06:59:13.004: shop/mediabot:51000 (ID:300) <- kube-system/kube-dns:53 "
                                 "(ID:301) dns-response proxy FORWARDED (DNS Answer \"203.0.113.20\" TTL: 300 "
                                 "(Proxy www.example.com. A))")
    assert monitor_line(response).endswith(
        "verdict Forwarded DNS proxy: www.example.com. A TTL: 300 Answer: '203.0.113.20'")
    refused_request, refused = hubble_flows(dns_record(Verdict.DENIED, "www.example.org", 5), NODE)
    assert refused_request["verdict"] == "DROPPED" and refused_request["egress_denied_by"][0]["name"] == "mediabot-dns"
    assert refused["l7"]["dns"]["rcode"] == 5 and "ips" not in refused["l7"]["dns"]
    assert "dns-response proxy FORWARDED (DNS Answer RCode: Query Refused TTL: 0 (Proxy www.example.org. A))" \
        in compact(refused)
    assert monitor_line(refused_request).endswith("verdict Denied DNS proxy: www.example.org. A")


def test_an_answer_whose_addresses_were_learned_says_for_which_selectors() -> None:
    """The selectors a DNS answer taught (DnsFlow.learned) are l7lab's: Hubble's DNS fields stay
    as Hubble has them, the summary names them after Hubble's words, and the record keeps them."""
    learned = dns_record(Verdict.FORWARDED, "api.example.com", 0, ips=("203.0.113.20",), ttl=30,
                         cnames=("www.example.com",), rrtypes=("CNAME", "A"),
                         learned=("matchPattern *.example.com", "matchName api.example.com"))
    _, response = hubble_flows(learned, NODE)
    assert "learned" not in response["l7"]["dns"]
    assert compact(response).endswith('(DNS Answer "203.0.113.20" CNAMEs: "www.example.com." TTL: 30 '
                                      "(Proxy api.example.com. A) learned for matchPattern *.example.com, "
                                      "matchName api.example.com)")
    assert outcome(learned) == ("forwarded 0 learned for matchPattern *.example.com, matchName api.example.com "
                                "(CiliumNetworkPolicy shop/mediabot-dns)")
    assert Flow.from_json(json.loads(json.dumps(learned.to_json()))).dns.learned == learned.dns.learned
    assert DnsFlow.from_json({"query": "a.example", "rcode": 0}).learned == ()  # records written before the field
    _, plain = hubble_flows(dns_record(Verdict.FORWARDED, "www.example.com", 0, ips=("203.0.113.20",)), NODE)
    assert "learned" not in compact(plain)


# --------------------------------------------------------------------------- formats and record fields


def test_jsonpb_wraps_the_flow_as_hubble_observe_does() -> None:
    flow = hubble_flows(http_record(Verdict.DENIED, 403), NODE)[0]
    assert jsonpb(flow) == {"flow": flow, "node_name": "l7lab/shp", "time": "2026-12-01T06:59:13.004943Z"}
    assert json.loads(json.dumps(jsonpb(flow))) == jsonpb(flow)
    assert dict_text(flow).splitlines() == [
        "  TIMESTAMP: Dec  1 06:59:13.004", "     SOURCE: retail/frontend-app:34995",
        "DESTINATION: retail/inventory-api:8080", "       TYPE: http-request", "    VERDICT: DROPPED",
        "    SUMMARY: HTTP/1.1 DELETE http://inventory-api:8080/api/inventory/item123"]


def test_timestamps_are_protojson_rfc3339() -> None:
    assert rfc3339(1796108353.0) == "2026-12-01T06:59:13Z"
    assert rfc3339(1796108353.5) == "2026-12-01T06:59:13.500Z"
    assert rfc3339(1796108353.000001) == "2026-12-01T06:59:13.000001Z"


def test_cluster_wide_and_kubernetes_policies_are_named_as_cilium_labels_them() -> None:
    assert policy_ref("CiliumClusterwideNetworkPolicy lockdown") == {
        "name": "lockdown", "kind": "CiliumClusterwideNetworkPolicy",
        "labels": ["k8s:io.cilium.k8s.policy.derived-from=CiliumClusterwideNetworkPolicy",
                   "k8s:io.cilium.k8s.policy.name=lockdown"]}
    assert policy_ref("NetworkPolicy shop/allow-web")["kind"] == "NetworkPolicy"


def test_new_record_fields_round_trip_and_old_lines_still_read() -> None:
    record = kernel(FlowVerdict.REDIRECT, rule_id=2)
    assert (record.policy_match_type, record.ifindex, record.source.endpoint_id) == (2, 5, 11)
    assert Flow.from_json(record.to_json()) == record
    world = kernel(FlowVerdict.FORWARD, dst="203.0.113.20", dst_identity=2, dst_endpoint=0, dport=80)
    assert world.destination.dns_names == ("www.example.com",)
    assert Flow.from_json(json.loads(json.dumps(world.to_json()))) == world
    dns = dns_record(Verdict.FORWARDED, "a.example.com", 0, ips=("192.0.2.1", "192.0.2.2"), ttl=60,
                     cnames=("b.example.com",), rrtypes=("CNAME", "A", "A"))
    assert Flow.from_json(json.loads(json.dumps(dns.to_json()))) == dns
    http = http_record(Verdict.FORWARDED, 200, headers=(("Host", "x"), ("X-Id", "1")))
    assert Flow.from_json(json.loads(json.dumps(http.to_json()))) == http
    assert http.l7 is not None and http.l7.latency_ns == 2_500_000
    old = {"time": 1.0, "type": "L7", "verdict": "forwarded", "source": {"ip": "10.0.0.1"},
           "destination": {"ip": "10.0.0.2"}, "l7": {"latency_ms": 1.5, "http": {
               "method": "GET", "url": "http://a/", "path": "/", "protocol": "HTTP/1.1", "code": 200}}}
    read = Flow.from_json(old)
    assert read.l7 is not None and read.l7.latency_ns == 1_500_000 and read.http is not None
    assert read.http.headers == () and read.source.endpoint_id == 0 and read.policy_match_type == 0


def test_recorded_headers_are_bounded() -> None:
    many = [(f"X-H{i}", "v" * (RECORDED_HEADER_VALUE + 50)) for i in range(RECORDED_HEADERS + 10)]
    kept = recorded_headers(many)
    assert len(kept) == RECORDED_HEADERS and kept[0][0] == "X-H0"
    assert all(len(value) == RECORDED_HEADER_VALUE and value.endswith("...") for _, value in kept)
    assert recorded_headers({"Host": "a"}) == (("Host", "a"),)


def test_the_dns_proxy_records_the_answer_it_relays() -> None:
    query = dns.message.make_query("www.example.com", "A")
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text("www.example.com.", 300, "IN", "CNAME", "Edge.Example.NET."))
    answer.answer.append(dns.rrset.from_text("edge.example.net.", 60, "IN", "A", "192.0.2.7", "192.0.2.8"))
    recorded = answer_record(dns.message.from_wire(answer.to_wire()))
    assert sorted(recorded.pop("ips")) == ["192.0.2.7", "192.0.2.8"]  # in the answer's order, which DNS leaves open
    assert recorded == {"ttl": 60, "cnames": ("edge.example.net",), "rrtypes": ("CNAME", "A", "A")}
    many = dns.message.make_response(query)
    many.answer.append(dns.rrset.from_text("www.example.com.", 5, "IN", "A",
                                           *(f"198.51.100.{i}" for i in range(RECORDED_ANSWERS + 8))))
    kept = answer_record(many)
    assert len(kept["ips"]) == len(kept["rrtypes"]) == RECORDED_ANSWERS
    assert answer_record(dns.message.make_response(query)) == {"ips": (), "ttl": 0, "cnames": (), "rrtypes": ()}


def test_an_error_and_an_audit_in_cilium_monitor_words() -> None:
    unreachable = hubble_flows(http_record(Verdict.ERROR, 0, "GET", policies=()), NODE)[0]
    assert monitor_line(unreachable) == (
        "<- Request http from 11 ([k8s:app=frontend-app k8s:io.kubernetes.pod.namespace=retail]) to 12 "
        "([k8s:app=inventory-api k8s:io.kubernetes.pod.namespace=retail]), identity 256->257, verdict Error "
        "GET http://inventory-api:8080/api/inventory/item123 => 0")
    audit, trace = hubble_flows(kernel(FlowVerdict.AUDIT, src="10.200.0.5", src_identity=260, src_endpoint=13), NODE)
    assert monitor_line(audit) == ("Policy verdict log: flow 0x0 local EP ID 12, remote ID 260, proto 6, ingress, "
                                   "action audit, auth: disabled, match none, "
                                   "10.200.0.5:40512 -> 10.200.0.3:8080 tcp SYN")
    assert monitor_line(trace).startswith("-> endpoint 12 flow 0x0 , identity 260->257 state new ifindex 5")


def test_the_proxys_upstream_leg_is_a_trace_to_the_endpoint_never_a_policy_verdict() -> None:
    """The datapath marks the event of a packet with the from-proxy mark (it skipped policy, as in
    Cilium): the record decides nothing although a rule would admit its identity and port, and
    Hubble shows it as the to-endpoint trace Cilium sends, with no policy verdict."""
    record = kernel(FlowVerdict.FORWARD, src="10.200.0.1", src_endpoint=0, hook=Hook.TO_CONTAINER,
                    flags=abi.FLOW_EVENT_F_FROM_PROXY)
    assert record.from_proxy and record.policy_match_type == POLICY_MATCH_NONE and not record.policy.rule_ids
    assert Flow.from_json(record.to_json()) == record
    flows = hubble_flows(record, NODE)
    assert [(f["event_type"], f["verdict"], f["trace_observation_point"]) for f in flows] == [
        ({"type": 4}, "FORWARDED", "TO_ENDPOINT")]
    assert "policy_match_type" not in flows[0] and flows[0]["source"]["identity"] == 256
    # the same packet without the flag is the node's own traffic, which policy decided
    assert kernel(FlowVerdict.FORWARD, src="10.200.0.1", src_endpoint=0,
                  hook=Hook.TO_CONTAINER).policy_match_type == POLICY_MATCH_L3_L4


def test_cilium_monitor_names_reserved_identities_unless_numeric() -> None:
    """Without `-n`, `cilium monitor` prints a reserved identity by name (NumericIdentity's
    String), in the policy verdict's remote ID and in a trace's or drop's identity pair."""
    record = kernel(FlowVerdict.FORWARD, src="203.0.113.20", src_identity=2, src_endpoint=0, dport=7070, rule_id=5)
    verdict, trace = hubble_flows(record, NODE)
    assert monitor_line(verdict) == ("Policy verdict log: flow 0x0 local EP ID 12, remote ID world, proto 6, ingress, "
                                     "action allow, auth: disabled, match L4-Only, "
                                     "203.0.113.20:40512 -> 10.200.0.3:7070 tcp SYN")
    assert "remote ID 2, proto 6, ingress" in monitor_line(verdict, numeric=True)
    assert ", identity world->257 state new" in monitor_line(trace)
    assert ", identity 2->257 state new" in monitor_line(trace, numeric=True)


def test_no_policy_verdict_where_the_deciding_endpoint_enforces_nothing() -> None:
    """frontend-app enforces no egress policy: its new flow to inventory-api's port is a trace
    alone (Cilium sends policy verdicts only where policy is enforced); inventory-api enforces
    ingress, so a flow it admits is a policy verdict and a trace."""
    open_egress = kernel(FlowVerdict.FORWARD, direction=Direction.EGRESS, dport=7070)
    assert not open_egress.policy_enforced
    assert Flow.from_json(json.loads(json.dumps(open_egress.to_json()))) == open_egress
    assert kinds(hubble_flows(open_egress, NODE)) == [("trace", "FORWARDED")]
    enforced = kernel(FlowVerdict.FORWARD, dport=7070, rule_id=5)
    assert enforced.policy_enforced
    assert kinds(hubble_flows(enforced, NODE)) == [("policy-verdict", "FORWARDED"), ("trace", "FORWARDED")]
    # a record written before the field existed keeps its verdict
    old = {k: v for k, v in open_egress.to_json().items() if k != "policy_enforced"}
    assert len(hubble_flows(Flow.from_json(old), NODE)) == 2


@pytest.mark.parametrize("rcode", [2, 5, 9, 23])
def test_a_dns_rcode_reads_the_same_in_the_summary_and_the_metric(rcode: int) -> None:
    """One rcode table (hubble.py's): the response's summary and hubble_dns_responses_total's
    rcode label name it alike."""
    from dataplane.hubblemetrics import HubbleCounters  # noqa: PLC0415
    _, response = hubble_flows(dns_record(Verdict.FORWARDED, "www.example.com", rcode), NODE)
    counters = HubbleCounters()
    counters.process(response)
    (labels,) = counters.snapshot().counters["hubble_dns_responses_total"]
    rcode_label = labels[6]
    assert rcode_label and not rcode_label.isdigit()
    assert f"RCode: {rcode_label} TTL" in response["Summary"]


def test_the_metrics_trace_and_match_labels_are_the_hubble_columns_words() -> None:
    from dataplane.hubblemetrics import HubbleCounters  # noqa: PLC0415
    for record in (kernel(FlowVerdict.REDIRECT, rule_id=2), kernel(FlowVerdict.FORWARD, rule_id=1)):
        counters = HubbleCounters()
        verdict, trace = hubble_flows(record, NODE)
        for flow in (verdict, trace):
            counters.process(flow)
        snap = counters.snapshot().counters
        (policy_labels,) = snap["hubble_policy_verdicts_total"]
        assert f"policy-verdict:{policy_labels[1]} ".lower() in compact(verdict).lower()
        subtypes = {labels[2] for labels in snap["hubble_flows_processed_total"] if labels[1] == "Trace"}
        assert subtypes == {compact(trace).split(" (ID:257) ")[1].split(" ")[0]}
