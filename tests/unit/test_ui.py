"""The service map (`l7lab ui`): edges and their verdict classes from hand-built flow records,
the bounds on what the map keeps, and the HTTP API (graph, one edge's flows, live updates,
the page itself) through aiohttp's test client over a lab directory of real record files."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from dataplane.abi import Direction
from dataplane.errors import L7LabError
from dataplane.flowrecord import (Endpoint, Flow, FlowType, L4, L7, PolicyAttribution, ProxyEvent, TrafficDirection,
                                  Verdict)
from dataplane.flowrender import json_line
from dataplane.flows import KERNEL_FLOWS, PROXY_RECORDS
from dataplane.logfiles import RotatingLog
from dataplane.mapstate import MapState
from dataplane.policy import PolicyEngine
from dataplane.scenario import load_scenario
from dataplane.ui import graph, server
from dataplane.ui.graph import EdgeClass, ServiceMap, lab_nodes
from l7.dns import DnsFlow
from l7.http import HttpFlow
from tests.conftest import REPO

READ_ONLY = "CiliumNetworkPolicy retail/inventory-read-only"

FRONTEND = Endpoint("10.10.0.11", 40000, 256, "retail", "frontend-app")
INVENTORY = Endpoint("10.10.0.12", 8080, 257, "retail", "inventory-api")
REPORTING = Endpoint("10.10.0.13", 40001, 258, "retail", "reporting")
KUBE_DNS = Endpoint("10.20.0.10", 53, 260, "kube-system", "kube-dns")
WWW_IP = "203.0.113.20"


def endpoints() -> dict[str, Any]:
    """A lab record's endpoints, as `LabRecord.endpoints` holds them."""
    def ep(kind: str, ip: str, labels: dict[str, str]) -> SimpleNamespace:
        return SimpleNamespace(kind=kind, ip=ip, labels=labels)
    return {"retail/frontend-app": ep("pod", FRONTEND.ip, {"app": "frontend-app"}),
            "retail/inventory-api": ep("pod", INVENTORY.ip, {"app": "inventory-api"}),
            "retail/reporting": ep("pod", REPORTING.ip, {"app": "reporting"}),
            "kube-system/kube-dns": ep("pod", KUBE_DNS.ip, {"k8s-app": "kube-dns"}),
            "www": ep("world", WWW_IP, {})}


def kernel(when: float, verdict: Verdict, src: Endpoint, dst: Endpoint, rule: str = "", reason: str = "NONE") -> Flow:
    policy = PolicyAttribution((7,), (rule.rsplit(" ", 1)[0],), (rule,)) if rule else PolicyAttribution()
    return Flow(when, FlowType.L3_L4, verdict, src, dst, L4("TCP", ("SYN",)), TrafficDirection.INGRESS,
                drop_reason=reason, policy=policy)


def http(when: float, verdict: Verdict, method: str, code: int, src: Endpoint = FRONTEND,
         dst: Endpoint = INVENTORY) -> Flow:
    rules = (f"{READ_ONLY} ingress[0]",) if verdict == Verdict.FORWARDED else ()
    return Flow(when, FlowType.L7, verdict, src, dst, L4("TCP"), TrafficDirection.INGRESS,
                policy=PolicyAttribution((), (READ_ONLY,), rules),
                l7=L7(0.4, http=HttpFlow(method=method, url="http://inventory-api:8080/api/inventory/1",
                                         path="/api/inventory/1", protocol="HTTP/1.1", code=code)))


def dns(when: float, verdict: Verdict, rcode: int) -> Flow:
    return Flow(when, FlowType.L7, verdict, FRONTEND, KUBE_DNS, L4("UDP"), TrafficDirection.EGRESS,
                l7=L7(0.1, dns=DnsFlow(query="www.example.org", qtypes=("A",), rcode=rcode)))


def edges_of(smap: ServiceMap) -> dict[tuple[str, str], str]:
    return {(e["from"], e["to"]): e["verdict"] for e in smap.graph()["edges"]}


# --------------------------------------------------------------------------- the map


def test_each_verdict_has_its_class_and_an_edge_shows_its_worst_recent_one() -> None:
    assert {graph.edge_class(http(0, v, "GET", 200)) for v in Verdict} <= set(EdgeClass)  # every verdict has one
    smap = ServiceMap(lab_nodes(endpoints()))
    inv = ("retail/frontend-app", "retail/inventory-api")
    redirect = f"{READ_ONLY} ingress[0]"
    assert smap.add([kernel(1, Verdict.REDIRECT, FRONTEND, INVENTORY, redirect), http(2, Verdict.FORWARDED, "GET", 200)]) == [inv]
    assert edges_of(smap) == {inv: "forwarded"}
    smap.add([kernel(3, Verdict.REDIRECT, FRONTEND, INVENTORY, redirect), http(4, Verdict.DENIED, "DELETE", 403)])
    assert edges_of(smap)[inv] == "l7-denied"
    smap.add([http(5, Verdict.FORWARDED, "GET", 200)])
    assert edges_of(smap)[inv] == "l7-denied"  # still among the recent ones
    smap.add([kernel(6, Verdict.AUDIT, REPORTING, INVENTORY)])
    smap.add([kernel(7, Verdict.DROP, REPORTING, INVENTORY, reason="POLICY_DENIED")])
    rep = ("retail/reporting", "retail/inventory-api")
    assert edges_of(smap)[rep] == "dropped"  # dropped > audit
    smap.add([kernel(8, Verdict.AUDIT, FRONTEND, REPORTING), kernel(9, Verdict.FORWARD, FRONTEND, REPORTING)])
    assert edges_of(smap)[("retail/frontend-app", "retail/reporting")] == "audit"  # audit > forwarded
    smap.add([http(10, Verdict.ERROR, "", 400)])  # the proxy could not serve it: dropped > l7-denied
    assert edges_of(smap)[inv] == "dropped"
    counts = {(e["from"], e["to"]): e["counts"] for e in smap.graph()["edges"]}
    assert counts[inv] == {"forwarded": 4, "audit": 0, "l7-denied": 1, "dropped": 1}
    assert [graph.worst(c) for c in ([], [EdgeClass.AUDIT, EdgeClass.L7_DENIED])] == [EdgeClass.FORWARDED, EdgeClass.L7_DENIED]
    assert smap.graph()["classes"] == ["dropped", "l7-denied", "audit", "forwarded"]


def test_recent_means_the_last_records_of_the_edge_and_memory_stays_bounded() -> None:
    smap = ServiceMap(lab_nodes(endpoints()), max_edges=3)
    inv = ("retail/frontend-app", "retail/inventory-api")
    smap.add([http(1, Verdict.DENIED, "DELETE", 403)])
    smap.add([http(2 + i, Verdict.FORWARDED, "GET", 200) for i in range(graph.RECENT_PER_EDGE - 1)])
    assert edges_of(smap)[inv] == "l7-denied"
    smap.add([http(100, Verdict.FORWARDED, "GET", 200)])  # the DELETE is no longer among the last 50
    assert edges_of(smap)[inv] == "forwarded"
    detail = smap.edge(*inv)
    assert len(detail["flows"]) == graph.RECENT_PER_EDGE and detail["counts"]["l7-denied"] == 1
    assert detail["flows"][0]["time"] == 100  # newest first
    # Past max_edges the edge that was quiet longest goes.
    others = [Endpoint(f"198.51.100.{i}", 80) for i in range(3)]
    smap.add([kernel(200 + i, Verdict.FORWARD, FRONTEND, ep) for i, ep in enumerate(others)])
    assert list(edges_of(smap)) == [("retail/frontend-app", f"198.51.100.{i}") for i in range(3)]
    assert smap.edge(*inv) is None


def test_nodes_are_pods_by_namespace_dns_world_hosts_the_node_and_strangers() -> None:
    smap = ServiceMap(lab_nodes(endpoints()))
    www_by_ip = Endpoint(WWW_IP, 80)  # the proxy's records name pods only: a world host by its address
    node = Endpoint("10.10.0.1", 0, 1, host="node")
    stranger = Endpoint("192.0.2.9", 443)
    smap.add([kernel(1, Verdict.FORWARD, FRONTEND, www_by_ip), kernel(2, Verdict.FORWARD, node, INVENTORY),
              kernel(3, Verdict.DROP, FRONTEND, stranger, reason="POLICY_DENIED"), dns(4, Verdict.DENIED, 5),
              ProxyEvent(5, "exited", "killed")])
    assert set(edges_of(smap)) == {("retail/frontend-app", "www"), ("node", "retail/inventory-api"),
                                   ("retail/frontend-app", "192.0.2.9"), ("retail/frontend-app", "kube-system/kube-dns")}
    kinds = {n["id"]: (n["kind"], n["namespace"], n["name"]) for n in smap.graph()["nodes"]}
    assert kinds == {"retail/frontend-app": ("pod", "retail", "frontend-app"),
                     "retail/inventory-api": ("pod", "retail", "inventory-api"),
                     "retail/reporting": ("pod", "retail", "reporting"),
                     "kube-system/kube-dns": ("dns", "kube-system", "kube-dns"),
                     "www": ("world", "", "www"), "node": ("node", "", "lab node"),
                     "192.0.2.9": ("other", "", "192.0.2.9")}
    row = smap.edge("retail/frontend-app", "kube-system/kube-dns")["flows"][0]
    assert row["dns"] == {"query": "www.example.org", "qtypes": ["A"], "rcode": 5} and row["class"] == "l7-denied"


def test_a_flow_row_names_the_policy_the_rule_and_the_request() -> None:
    drop = graph.flow_detail(kernel(1, Verdict.DROP, REPORTING, INVENTORY, reason="POLICY_DENIED"))
    assert (drop["class"], drop["verdict"], drop["drop_reason"], drop["policies"], drop["http"]) == \
        ("dropped", "DROP", "POLICY_DENIED", [], None)
    redirect = graph.flow_detail(kernel(2, Verdict.REDIRECT, FRONTEND, INVENTORY, f"{READ_ONLY} ingress[0]"))
    assert redirect["rules"] == [f"{READ_ONLY} ingress[0]"] and redirect["policies"] == [READ_ONLY]
    denied = graph.flow_detail(http(3, Verdict.DENIED, "DELETE", 403))
    assert (denied["class"], denied["policies"], denied["http"]["method"], denied["http"]["path"], denied["http"]["code"]) == \
        ("l7-denied", [READ_ONLY], "DELETE", "/api/inventory/1", 403)


# --------------------------------------------------------------------------- the server


def write_records(lab_dir: Path, records: list[Flow]) -> None:
    """Append records to the lab's files as the agent and the proxy do (kernel / L7 apart)."""
    lab_dir.mkdir(exist_ok=True)
    for name, kind in ((KERNEL_FLOWS, FlowType.L3_L4), (PROXY_RECORDS, FlowType.L7)):
        log = RotatingLog(lab_dir / name)
        for record in records:
            if record.type == kind:
                log.write_line(json_line(record))
        log.close()


async def read_event(stream: Any) -> dict[str, Any]:
    """The next `data:` message of an event stream (comments and `retry:` skipped)."""
    while True:
        line = (await asyncio.wait_for(stream.readline(), 30)).decode()
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])


def test_the_api_serves_the_graph_an_edges_flows_and_live_updates(tmp_path: Path) -> None:
    lab_dir = tmp_path / "retail"
    old = [http(float(i), Verdict.FORWARDED, "GET", 200) for i in range(30)]
    write_records(lab_dir, [*old, kernel(100, Verdict.DROP, REPORTING, INVENTORY, reason="POLICY_DENIED"),
                            http(101, Verdict.DENIED, "DELETE", 403)])

    async def scenario() -> None:
        app = server.make_app("retail", lab_dir, ServiceMap(lab_nodes(endpoints())), start_records=10)
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/api/graph")
            assert resp.status == 200
            body = await resp.json()
            assert (body["lab"], body["lab_up"]) == ("retail", True)
            edges = {(e["from"], e["to"]): e for e in body["edges"]}
            assert {k: e["verdict"] for k, e in edges.items()} == {
                ("retail/frontend-app", "retail/inventory-api"): "l7-denied",
                ("retail/reporting", "retail/inventory-api"): "dropped"}
            # Read from near the end: 10 L7 records of the 31, not the whole file.
            assert edges[("retail/frontend-app", "retail/inventory-api")]["counts"] == \
                {"forwarded": 9, "audit": 0, "l7-denied": 1, "dropped": 0}
            assert {n["id"] for n in body["nodes"]} >= {"retail/frontend-app", "www", "node", "kube-system/kube-dns"}

            resp = await client.get("/api/edge", params={"from": "retail/frontend-app", "to": "retail/inventory-api"})
            detail = await resp.json()
            first = detail["flows"][0]
            assert (first["http"]["method"], first["http"]["code"], first["policies"]) == ("DELETE", 403, [READ_ONLY])
            assert (await client.get("/api/edge", params={"from": "retail/reporting", "to": "www"})).status == 404
            assert (await client.get("/api/edge", params={"from": "x"})).status == 400

            # Live: a new record reaches an open event stream as the changed edge, whole.
            events = await client.get("/api/events")
            assert events.headers["Content-Type"] == "text/event-stream"
            write_records(lab_dir, [kernel(200, Verdict.AUDIT, FRONTEND, Endpoint(WWW_IP, 80))])
            update = await read_event(events.content)
            assert [(e["from"], e["to"], e["verdict"]) for e in update["edges"]] == [("retail/frontend-app", "www", "audit")]
            assert {n["id"]: n["kind"] for n in update["nodes"]} == {"retail/frontend-app": "pod", "www": "world"}
            events.close()

            page = await client.get("/")
            text = await page.text()
            assert page.status == 200 and '<script src="/static/app.js"' in text and "https://" not in text
            assert "default-src 'self'" in page.headers["Content-Security-Policy"]
            script = await client.get("/static/app.js")
            assert script.status == 200 and "EventSource" in await script.text()
            assert (await client.get("/static/../server.py")).status in (403, 404)
            # A name rebound to 127.0.0.1 by some web page is refused.
            assert (await client.get("/api/graph", headers={"Host": "evil.example:12000"})).status == 403
            assert (await client.get("/api/graph", headers={"Host": "localhost:12000"})).status == 200

    asyncio.run(scenario())


def test_the_event_stream_tells_a_client_that_fell_behind_to_resync() -> None:
    async def scenario() -> None:
        hub = server.Hub()
        queue = hub.subscribe()
        for i in range(server.CLIENT_QUEUE + 5):
            hub.publish({"edges": [i]})
        got = [queue.get_nowait() for _ in range(queue.qsize())]
        assert {"resync": True} in got and len(got) <= server.CLIENT_QUEUE + 1
        hub.publish(None)
        assert queue.get_nowait() is None

    asyncio.run(scenario())


def test_listen_is_loopback_only_and_a_busy_port_is_named(tmp_path: Path) -> None:
    assert server.parse_listen("127.0.0.1:12000") == ("127.0.0.1", 12000)
    assert server.parse_listen("[::1]:12000") == ("::1", 12000)
    for bad, why in (("0.0.0.0:12000", "--listen: '0.0.0.0' is not a loopback address"),
                     ("12000", "--listen expects HOST:PORT")):
        with pytest.raises(L7LabError, match=why):
            server.parse_listen(bad)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(L7LabError, match="the port is already in use"):
            server.bind_listen("127.0.0.1", busy.getsockname()[1])


def test_the_ui_verb_names_what_is_wrong_before_serving(tmp_path: Path) -> None:
    env = {**os.environ, "L7LAB_RUN_DIR": str(tmp_path)}

    def ui(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dataplane.cli", "ui", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)

    out = ui("--listen", "0.0.0.0:12000")
    assert out.returncode == 1 and "not a loopback address" in out.stderr, out
    out = ui()
    assert out.returncode == 1 and "no lab is up" in out.stderr, out
    out = ui("nolab", "--listen", "127.0.0.1:1")
    assert out.returncode == 1 and "no lab named 'nolab' is up" in out.stderr, out


def test_a_relabelled_pod_reaches_the_page_as_a_resync(tmp_path: Path) -> None:
    lab_dir = tmp_path / "retail"
    write_records(lab_dir, [http(1, Verdict.FORWARDED, "GET", 200)])
    current = endpoints()  # the lab's record, as `l7lab label` changes it

    def nodes_now() -> list[graph.MapNode]:
        return lab_nodes(current)

    async def scenario() -> None:
        app = server.make_app("retail", lab_dir, ServiceMap(nodes_now()), lab_nodes=nodes_now)
        async with TestClient(TestServer(app)) as client:
            events = await client.get("/api/events")
            current["retail/reporting"] = SimpleNamespace(kind="pod", ip=REPORTING.ip,
                                                          labels={"app": "reporting", "role": "auditor"})
            assert await read_event(events.content) == {"resync": True}
            events.close()
            nodes = {n["id"]: n for n in (await (await client.get("/api/graph")).json())["nodes"]}
            assert nodes["retail/reporting"]["labels"] == {"app": "reporting", "role": "auditor"}
            edge = (await (await client.get("/api/graph")).json())["edges"][0]
            assert (edge["from"], edge["to"]) == ("retail/frontend-app", "retail/inventory-api")  # kept

    asyncio.run(scenario())


# --------------------------------------------------------------------------- who dropped it, on whose behalf


def retail_state() -> MapState:
    """The retail scenario's map state as the lab writes it to policy.json (through its JSON)."""
    engine = PolicyEngine(load_scenario(REPO / "scenarios" / "retail.yaml"))
    return MapState.from_json(json.loads(json.dumps(engine.map_state().to_json())))


def test_a_default_deny_names_the_policy_isolating_the_pod_as_the_metrics_do() -> None:
    state = retail_state()
    # The one lookup: the agent's metrics ask it (LabService.isolating_policies), and so does the map.
    assert state.isolating_policies("retail/inventory-api", Direction.INGRESS) == \
        [("CiliumNetworkPolicy", "retail", "inventory-read-only")]
    assert state.isolating_policies("retail/inventory-api", Direction.EGRESS) == []  # no egress policy selects it
    assert state.isolating_policies("retail/reporting", Direction.INGRESS) == []
    smap = ServiceMap(lab_nodes(endpoints()))
    smap.set_policy_state(state)
    smap.add([kernel(1, Verdict.DROP, REPORTING, INVENTORY, reason="POLICY_DENIED"),
              kernel(2, Verdict.REDIRECT, FRONTEND, INVENTORY, f"{READ_ONLY} ingress[0]")])
    drop = smap.edge("retail/reporting", "retail/inventory-api")["flows"][0]
    assert (drop["policies"], drop["isolated_by"]) == ([], [READ_ONLY])
    redirect = smap.edge("retail/frontend-app", "retail/inventory-api")["flows"][0]
    assert redirect["isolated_by"] == []  # a rule decided it: that rule is named, not the isolation
    # An egress default deny is the source's: none isolates reporting's egress, so none is named.
    egress = Flow(3, FlowType.L3_L4, Verdict.DROP, REPORTING, Endpoint(WWW_IP, 80), L4("TCP", ("SYN",)),
                  TrafficDirection.EGRESS, drop_reason="POLICY_DENIED")
    assert graph.flow_detail(egress, state)["isolated_by"] == []
    assert graph.flow_detail(kernel(4, Verdict.DROP, REPORTING, INVENTORY, reason="POLICY_DENIED"))["isolated_by"] == []


def test_an_edge_from_the_node_carrying_a_pods_identity_is_the_proxys_upstream_leg() -> None:
    state = retail_state()
    frontend_identity = next(ep.identity for ep in state.endpoints.values() if ep.name == "retail/frontend-app")
    node_for_frontend = Endpoint("10.10.0.1", 41000, frontend_identity, host="node")
    node_itself = Endpoint("10.10.0.1", 41001, 1, host="node")
    smap = ServiceMap(lab_nodes(endpoints()))
    smap.set_policy_state(state)
    smap.add([kernel(1, Verdict.FORWARD, node_for_frontend, INVENTORY),
              kernel(2, Verdict.FORWARD, node_itself, REPORTING)])
    upstream = {(e["from"], e["to"]): e["proxy_upstream_for"] for e in smap.graph()["edges"]}
    assert upstream == {("node", "retail/inventory-api"): ["retail/frontend-app"],  # kept: it is real traffic
                        ("node", "retail/reporting"): []}  # the host's identity: the node's own traffic
    assert smap.edge("node", "retail/inventory-api")["proxy_upstream_for"] == ["retail/frontend-app"]
    # Without a map state, the identity is resolved through the records that named the pod.
    smap = ServiceMap(lab_nodes(endpoints()))
    upstream_leg = Endpoint("10.10.0.1", 41000, FRONTEND.identity, host="node")
    smap.add([kernel(1, Verdict.FORWARD, upstream_leg, INVENTORY)])
    assert smap.edge("node", "retail/inventory-api")["proxy_upstream_for"] == [f"identity {FRONTEND.identity}"]
    smap.add([http(2, Verdict.FORWARDED, "GET", 200)])  # names frontend-app with its identity
    assert smap.edge("node", "retail/inventory-api")["proxy_upstream_for"] == ["retail/frontend-app"]


def test_the_server_reads_the_policies_from_policy_json_and_again_after_an_apply(tmp_path: Path) -> None:
    lab_dir = tmp_path / "retail"
    write_records(lab_dir, [kernel(1, Verdict.DROP, REPORTING, INVENTORY, reason="POLICY_DENIED")])
    data = retail_state().to_json()
    (lab_dir / "policy.json").write_text(json.dumps(data))
    edge = {"from": "retail/reporting", "to": "retail/inventory-api"}

    async def scenario() -> None:
        app = server.make_app("retail", lab_dir, ServiceMap(lab_nodes(endpoints())))
        async with TestClient(TestServer(app)) as client:
            detail = await (await client.get("/api/edge", params=edge)).json()
            assert detail["flows"][0]["isolated_by"] == [READ_ONLY]
            events = await client.get("/api/events")
            # `l7lab apply` of a renamed policy: the lab replaces policy.json whole
            for ep in data["endpoints"]:
                if ep["name"] == "retail/inventory-api":
                    ep["ingress_isolated_by"] = [["CiliumNetworkPolicy", "retail", "inventory-locked"]]
            tmp = lab_dir / "policy.json.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, lab_dir / "policy.json")
            assert await read_event(events.content) == {"resync": True}
            events.close()
            detail = await (await client.get("/api/edge", params=edge)).json()
            assert detail["flows"][0]["isolated_by"] == ["CiliumNetworkPolicy retail/inventory-locked"]

    asyncio.run(scenario())
