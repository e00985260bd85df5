"""Real records in Hubble's shape: the retail scenario runs on a real lab (namespaces, BPF, the
L7 proxy), and the records it wrote render to the Hubble flows a Hubble user expects: a
policy-verdict and a drop for the pod no rule admits, a redirected policy verdict and a trace to
the proxy for the frontend, and a dropped DELETE with its 403 response, naming the policy."""

from __future__ import annotations

import time

from typing import Any

from dataplane.flowrecord import Flow
from dataplane.flows import RecordTail
from dataplane.hubble import compact, hubble_flows, node_name, policy_ref
from dataplane.lab import Lab, lab_dir
from dataplane.policy import PolicyEngine
from dataplane.runner import KernelExecutor, run_scenario
from dataplane.scenario import load_scenario
from tests.conftest import REPO, patient, unique_lab
from tests.support.wait import wait_for

READ_ONLY = "CiliumNetworkPolicy retail/inventory-read-only"


def pods(flow: dict[str, Any]) -> tuple[str, str]:
    return flow["source"].get("pod_name", ""), flow["destination"].get("pod_name", "")


def test_retail_records_render_to_the_hubble_flows_a_user_expects(datapath) -> None:  # noqa: ANN001 - fixture
    scenario = patient(load_scenario(REPO / "scenarios" / "retail.yaml").with_name(unique_lab("hb")))
    # The session shares one datapath: a previous test's events still in its ring buffer may be
    # drained into this lab's file with this lab's names (addresses repeat across labs); only
    # what happened after this lab began is its own.
    began = time.time()
    with Lab(scenario, datapath=datapath, policy=PolicyEngine(scenario)) as lab:
        report = run_scenario(scenario, KernelExecutor(lab, lab.policy), lab.name)
        assert report.results and all(r.passed for r in report.results)
        tail = RecordTail(lab_dir(lab.name))
        records: list[Flow] = []

        def delete_answered() -> bool:
            records.extend(r for r in tail.read() if isinstance(r, Flow) and r.time >= began)
            return any(r.http is not None and r.http.method == "DELETE" for r in records)

        wait_for("the proxy's record of the DELETE", delete_answered)
        node = node_name(lab.name)
        flows = [f for r in records for f in hubble_flows(r, node)]

    # reporting -> inventory-api: no rule admits it; a policy verdict and a drop, nothing else
    # (one connection; while its probe waits, a loaded machine may see the client retransmit the
    # dropped SYN, and each SYN is judged again: the same pair per SYN)
    dropped = [f for f in flows if pods(f) == ("reporting", "inventory-api")]
    pair = [(5, "DROPPED", "POLICY_DENIED"), (1, "DROPPED", "POLICY_DENIED")]
    seen = [(f["event_type"]["type"], f["verdict"], f.get("drop_reason_desc")) for f in dropped]
    assert seen and seen == pair * (len(seen) // 2), seen
    assert len({f["l4"]["TCP"]["source_port"] for f in dropped}) == 1
    verdict, drop = dropped[:2]
    assert verdict["traffic_direction"] == drop["traffic_direction"] == "INGRESS"
    assert "k8s:app=reporting" in verdict["source"]["labels"] and verdict["destination"]["ID"] > 0
    assert drop["l4"]["TCP"]["destination_port"] == 8080 and drop["l4"]["TCP"]["flags"] == {"SYN": True}
    assert "Policy denied DROPPED (TCP Flags: SYN)" in compact(drop)

    # frontend-app -> inventory-api: redirected to the proxy by the L3-L4 rule of the policy
    to_inventory = [f for f in flows if pods(f) == ("frontend-app", "inventory-api") and f["Type"] == "L3_L4"]
    redirects = [f for f in to_inventory if f["event_type"] == {"type": 5}]
    assert redirects and all(f["verdict"] == "REDIRECTED" and f.get("policy_match_type") == 2 for f in redirects), \
        [(f["time"], f["verdict"], f.get("policy_match_type"), f["l4"]) for f in redirects]
    assert all(f["ingress_allowed_by"] == [policy_ref(READ_ONLY)] for f in redirects)
    traces = [f for f in to_inventory if f["event_type"]["type"] == 4]
    assert len(traces) == len(redirects)
    assert all(t["trace_observation_point"] == "TO_PROXY" and t["proxy_port"] == 15001 for t in traces)

    # the proxy's upstream legs (node -> a redirected pod, frontend-app's identity in the mark):
    # no policy decided them, so each is a to-endpoint trace only, as Cilium shows it
    upstream = [r for r in records if r.from_proxy]
    assert "inventory-api" in {r.destination.pod for r in upstream}
    assert all(r.source.host == "node" and r.destination.namespace == "retail" for r in upstream)
    assert all(r.policy_match_type == 0 and not r.policy.rule_ids for r in upstream)
    upstream_flows = [f for r in upstream for f in hubble_flows(r, node)]
    assert [(f["event_type"]["type"], f["trace_observation_point"]) for f in upstream_flows] == \
        [(4, "TO_ENDPOINT")] * len(upstream)
    assert {f["source"]["identity"] for f in upstream_flows} == {redirects[0]["source"]["identity"]}
    node_ip = upstream_flows[0]["IP"]["source"]
    assert not [f for f in flows if f["IP"]["source"] == node_ip and f["event_type"]["type"] == 5
                and f["source"].get("identity") != 1]  # the node's own traffic (identity host) is decided

    # inventory-api -> reporting: no policy selects either side in that direction, so the new
    # flow is a trace alone, no policy verdict (Cilium sends verdicts only where policy is enforced)
    open_flows = [f for f in flows if pods(f) == ("inventory-api", "reporting")]
    assert [(f["event_type"]["type"], f["trace_observation_point"]) for f in open_flows] == [(4, "TO_ENDPOINT")]

    # the DELETE: dropped by the policy, answered 403 by the proxy
    delete = [f for f in flows if f.get("l7", {}).get("http", {}).get("method") == "DELETE"]
    assert [(f["l7"]["type"], f["verdict"]) for f in delete] == [("REQUEST", "DROPPED"), ("RESPONSE", "FORWARDED")]
    request, response = delete
    assert request["ingress_denied_by"] == [policy_ref(READ_ONLY)] and request["source"]["ID"] > 0
    assert {"key": "Host", "value": "inventory-api:8080"} in request["l7"]["http"]["headers"]
    assert response["l7"]["http"]["code"] == 403 and int(response["l7"]["latency_ns"]) > 0
    assert response["is_reply"] is True and pods(response) == ("inventory-api", "frontend-app")
    assert "http-response FORWARDED (HTTP/1.1 403 " in compact(response)
