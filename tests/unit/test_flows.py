"""Flow records: one typed record for kernel events and proxy requests, its JSON round trip,
the renderers, the one writer of flows.jsonl, and the records read back in time order, robust
to a line still being written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.datapath import FlowEvent
from dataplane.errors import L7LabError
from dataplane.flowrecord import (Endpoint, Flow, FlowType, L4, L7, PolicyAttribution, ProxyEvent, TracePoint,
                                  TrafficDirection, Verdict, record_from_json)
from dataplane import flowrender
from dataplane.flowrender import json_line, outcome
from dataplane.flows import KERNEL_FLOWS, PROXY_RECORDS, Directory, FlowLog, RecordTail, kernel_flow
from dataplane.logfiles import RotatingLog, read_all
from dataplane.mapstate import EndpointState, MapState, RuleAttribution
from dataplane.abi import Direction
from dataplane.metrics import parse_listen
from dataplane.abi import DropReason, FlowVerdict, Hook
from dataplane.scenario import Relabel, Step
from l7.dns import DnsFlow
from l7.http import HttpFlow

REPO = Path(__file__).resolve().parents[2]


def event(verdict: FlowVerdict, reason: DropReason = DropReason.NONE, rule_id: int = 0,
          direction: Direction = Direction.INGRESS) -> FlowEvent:
    return FlowEvent(ts_ns=1, src="10.0.0.2", dst="10.0.0.3", sport=40000, dport=8080, protocol=6,
                     verdict=verdict, reason=reason, direction=direction, src_identity=300,
                     dst_identity=301, src_endpoint=1, dst_endpoint=2, rule_id=rule_id, proxy_port=15001,
                     tcp_flags=0x12, hook=Hook.FROM_CONTAINER, ifindex=5, length=60)


def state() -> MapState:
    st = MapState()
    st.endpoints[1] = EndpointState(1, "shop/web", "10.0.0.2", 300, False, False, labels=(("app", "web"),))
    st.endpoints[2] = EndpointState(2, "shop/api", "10.0.0.3", 301, True, False, labels=(("app", "api"),))
    st.rules[7] = RuleAttribution(7, "CiliumNetworkPolicy shop/api-l7", 0, "ingress")
    return st


DIRECTORY = Directory({"10.0.0.2": "shop/web", "10.0.0.3": "shop/api"}, {"203.0.113.5": "partner", "10.0.0.1": "node"})


def test_kernel_flow_names_pods_labels_endpoint_and_rule() -> None:
    flow = kernel_flow(event(FlowVerdict.REDIRECT, rule_id=7), state(), DIRECTORY, 1700000000.5)
    assert (flow.type, flow.verdict, flow.drop_reason) == (FlowType.L3_L4, Verdict.REDIRECT, "NONE")
    assert flow.source == Endpoint("10.0.0.2", 40000, 300, "shop", "web", "", {"app": "web"}, endpoint_id=1)
    assert flow.destination.name == "shop/api" and flow.destination.labels == {"app": "api"}
    assert flow.direction == TrafficDirection.INGRESS and flow.trace_point == TracePoint.FROM_ENDPOINT
    assert flow.l4 == L4("TCP", ("SYN", "ACK")) and flow.bytes == 60 and flow.proxy_port == 15001
    assert flow.policy == PolicyAttribution((7,), ("CiliumNetworkPolicy shop/api-l7",),
                                            ("CiliumNetworkPolicy shop/api-l7 ingress[0]",))
    assert outcome(flow) == ("REDIRECT at ingress of shop/api by CiliumNetworkPolicy shop/api-l7 ingress[0] "
                             "to proxy port 15001")
    drop = kernel_flow(event(FlowVerdict.DROP, DropReason.POLICY_DENIED), state(), DIRECTORY, 1.0)
    assert drop.policy == PolicyAttribution() and outcome(drop) == "DROP POLICY_DENIED at ingress of shop/api"
    egress = kernel_flow(event(FlowVerdict.DROP, DropReason.POLICY_DENIED, direction=Direction.EGRESS), state(),
                         DIRECTORY, 1.0)
    assert outcome(egress) == "DROP POLICY_DENIED at egress of shop/web"


def test_world_hosts_and_the_node_are_named_but_are_not_pods() -> None:
    ev = event(FlowVerdict.DROP, DropReason.POLICY_DENIED, direction=Direction.EGRESS)
    ev = FlowEvent(**{**ev.__dict__, "src": "10.0.0.1", "dst": "203.0.113.5"})
    flow = kernel_flow(ev, state(), DIRECTORY, 1.0)
    assert (flow.source.name, flow.source.namespace, flow.destination.name) == ("node", "", "partner")
    assert outcome(flow) == "DROP POLICY_DENIED"  # no pod's policy to name


def l7_http_flow() -> Flow:
    return Flow(1700000001.25, FlowType.L7, Verdict.DENIED,
                Endpoint("10.0.0.2", 40000, 300, "shop", "web", "", {"app": "web"}),
                Endpoint("10.0.0.3", 8080, 301, "shop", "api", "", {"app": "api"}), L4("TCP"),
                TrafficDirection.INGRESS, TracePoint.PROXY, summary="L7 ingress of shop/api: no rule allows it",
                policy=PolicyAttribution((), ("CiliumNetworkPolicy shop/api-l7",)),
                l7=L7(1.5, http=HttpFlow("GET", "http://api/admin", "/admin", "HTTP/1.1", 403)))


def test_every_kind_of_record_survives_its_json_round_trip() -> None:
    records = [
        kernel_flow(event(FlowVerdict.REDIRECT, rule_id=7), state(), DIRECTORY, 1700000000.5),
        kernel_flow(event(FlowVerdict.AUDIT, DropReason.POLICY_DENIED), state(), DIRECTORY, 2.0),
        l7_http_flow(),
        Flow(3.0, FlowType.L7, Verdict.FORWARDED, Endpoint("10.0.0.2", 5353, 300, "shop", "web"),
             Endpoint("10.0.0.53", 53, 2), L4("UDP"), TrafficDirection.EGRESS, TracePoint.PROXY,
             policy=PolicyAttribution((4, 9), ("CiliumNetworkPolicy shop/dns",), ("CiliumNetworkPolicy shop/dns egress[0]",)),
             l7=L7(0.25, dns=DnsFlow("api.example.com", ("A",), 0))),
        Flow(4.0, FlowType.L7, Verdict.ERROR, Endpoint("10.0.0.2", 1), Endpoint("10.0.0.3", 2), L4("TCP"),
             l7=L7(0.0, http=HttpFlow("", "", "", "", 400))),
        ProxyEvent(5.0, "exited", "the L7 proxy killed by SIGKILL", 1234),
        ProxyEvent(6.0, "restart failed", "no socket", None),
    ]
    for record in records:
        line = json_line(record)
        assert record_from_json(json.loads(line)) == record, line
        assert json.loads(line)["type"] in ("L3_L4", "L7", "PROXY")


def test_lines_that_are_not_records_read_as_none() -> None:
    for data in (None, [], "x", {}, {"time": 1.0}, {"time": 1.0, "type": "L7", "verdict": "maybe"},
                 {"time": "soon", "type": "PROXY"}, {"type": "L3_L4", "verdict": "DROP"}):
        assert record_from_json(data) is None, data


def test_the_record_renderers_are_the_ones_the_product_uses() -> None:
    """json_line (the files, `observe --json`) and outcome (`run`'s kernel column): people read
    flows as Hubble prints them (dataplane/hubble.py), so there is no other text renderer."""
    public = {name for name in vars(flowrender) if not name.startswith("_") and callable(getattr(flowrender, name))
              and getattr(getattr(flowrender, name), "__module__", "") == flowrender.__name__}
    assert public == {"json_line", "outcome"}


def test_a_dns_records_outcome_is_its_verdict_and_rcode() -> None:
    rec = Flow(1.0, FlowType.L7, Verdict.DENIED, Endpoint("10.0.0.2", 5000, 0, "shop", "web"),
               Endpoint("10.0.0.53", 53), L4("UDP"), l7=L7(0.1, dns=DnsFlow("evil.example", ("AAAA",), 5)))
    assert outcome(rec) == "denied 5"
    assert rec.l7 is not None and rec.l7.protocol == "DNS"


def test_a_relabel_shows_in_the_labels_of_later_kernel_records() -> None:
    """Labels come from the map state in force when the record is made, not from the lab's start."""
    from dataplane.policy import PolicyEngine  # noqa: PLC0415
    from tests.support.policy import scenario  # noqa: PLC0415

    engine = PolicyEngine(scenario("""\
name: relabel
namespaces: [{name: shop}]
pods:
  - {name: web, namespace: shop, labels: {app: web}, ports: [{port: 80}]}
  - {name: api, namespace: shop, labels: {app: api}, ports: [{port: 80}]}
"""))
    pods = {key: pod.ip for key, pod in engine.scenario.pods.items()}
    directory = Directory({ip: key for key, ip in pods.items()})
    ev = FlowEvent(**{**event(FlowVerdict.FORWARD).__dict__, "src": pods["shop/web"], "dst": pods["shop/api"]})
    before = kernel_flow(ev, engine.map_state(), directory, 1.0)
    assert before.source.labels["app"] == "web" and "tier" not in before.source.labels
    assert before.source.labels["io.kubernetes.pod.namespace"] == "shop"
    engine.apply_step(Step(0, "relabel", relabel=(Relabel("pod", "shop/web", {"tier": "front"}, ("app",)),)))
    after = kernel_flow(ev, engine.map_state(), directory, 2.0)
    assert after.source.labels["tier"] == "front" and "app" not in after.source.labels
    assert after.destination.labels == before.destination.labels
    assert MapState.from_json(json.loads(json.dumps(engine.map_state().to_json()))).endpoints == \
        engine.map_state().endpoints  # the proxy's copy of the state carries the labels too


def test_the_flow_log_is_the_one_writer_and_rotates(tmp_path: Path) -> None:
    log = FlowLog(tmp_path, max_bytes=3000)
    flows = [kernel_flow(event(FlowVerdict.FORWARD), state(), DIRECTORY, float(i)) for i in range(40)]
    log.write(flows[:20])
    log.write([ProxyEvent(20.5, "restarted", "pid 9", 9)])
    log.write(flows[20:])
    log.close()
    assert (tmp_path / KERNEL_FLOWS).stat().st_size <= 3000 and (tmp_path / (KERNEL_FLOWS + ".1")).exists()
    tail = RecordTail(tmp_path, names=(KERNEL_FLOWS,))
    tail.start_at_last(5)
    got = tail.read()
    assert [r.time for r in got] == [35.0, 36.0, 37.0, 38.0, 39.0] and got[-1] == flows[-1]


def seq_flow(seq: int, when: float, kind: FlowType = FlowType.L7) -> Flow:
    return Flow(when, kind, Verdict.FORWARDED if kind == FlowType.L7 else Verdict.FORWARD,
                Endpoint("10.0.0.2", 1), Endpoint("10.0.0.3", 80), L4("TCP"),
                l7=L7(1.0, http=HttpFlow("GET", "", f"/{seq}", "HTTP/1.1", 200)) if kind == FlowType.L7 else None,
                bytes=seq)


def seq(record: Flow) -> int:
    return int(record.http.path[1:]) if record.http is not None else record.bytes


def test_tail_merges_both_files_in_time_order_and_waits_for_whole_lines(tmp_path: Path) -> None:
    (tmp_path / KERNEL_FLOWS).write_text(json_line(seq_flow(0, 1.0, FlowType.L3_L4)) + "\n"
                                         + json_line(seq_flow(1, 3.0, FlowType.L3_L4)) + "\n")
    torn = json_line(seq_flow(3, 4.0))
    (tmp_path / PROXY_RECORDS).write_text(json_line(seq_flow(2, 2.0)) + "\n" + torn[:20])
    tail = RecordTail(tmp_path)
    assert [(r.type, r.time) for r in tail.read()] == [(FlowType.L3_L4, 1.0), (FlowType.L7, 2.0), (FlowType.L3_L4, 3.0)]
    assert tail.read() == []
    with open(tmp_path / PROXY_RECORDS, "a") as f:
        f.write(torn[20:] + "\nnot json\n")
    assert [seq(r) for r in tail.read()] == [3]  # the torn line, once whole; the line that is no record skipped


def test_tail_of_a_lab_without_records_is_empty(tmp_path: Path) -> None:
    assert RecordTail(tmp_path / "missing").read() == []


def test_metrics_listen_only_on_loopback() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("localhost:9100") == ("127.0.0.1", 9100)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad, why in (("0.0.0.0:9464", "not a loopback address"), ("10.0.0.1:9464", "not a loopback address"),
                     ("127.0.0.1", "expects HOST:PORT"), ("127.0.0.1:99999", "expects HOST:PORT"),
                     ("example.com:80", "not a loopback address")):
        with pytest.raises(L7LabError, match=why):
            parse_listen(bad)


def observe(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "L7LAB_RUN_DIR": str(run_dir)}
    return subprocess.run([sys.executable, "-m", "dataplane.cli", "observe", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


@pytest.fixture
def recorded_lab(tmp_path: Path) -> Path:
    """A lab as `observe` finds it (record + directory), with rotated kernel and L7 records:
    kernel records at even seconds, L7 records at odd ones, from `now - 2000 s` on."""
    (tmp_path / "obs.json").write_text(json.dumps({"lab": "obs", "scenario": "s.yaml", "status": "up"}))
    lab = tmp_path / "obs"
    lab.mkdir()
    start = time.time() - 2000
    flows = RotatingLog(lab / KERNEL_FLOWS, max_bytes=40_000)
    l7 = RotatingLog(lab / PROXY_RECORDS, max_bytes=40_000)
    for i in range(1000):
        flows.write_line(json_line(seq_flow(i, start + 2 * i, FlowType.L3_L4)))
        l7.write_line(json_line(seq_flow(i, start + 2 * i + 1)))
    flows.close()
    l7.close()
    assert (lab / (KERNEL_FLOWS + ".1")).exists() and (lab / (PROXY_RECORDS + ".1")).exists()
    return tmp_path


def test_observe_last_and_since(recorded_lab: Path) -> None:
    out = observe(recorded_lab, "obs", "--last", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert [(r["type"], seq(Flow.from_json(r))) for r in map(json.loads, out.stdout.splitlines())] == \
        [("L7", 998), ("L3_L4", 999), ("L7", 999)]
    out = observe(recorded_lab, "obs", "--last", "2", "--type", "flows", "--json")
    assert [(r["type"], seq(Flow.from_json(r))) for r in map(json.loads, out.stdout.splitlines())] == \
        [("L3_L4", 998), ("L3_L4", 999)]
    out = observe(recorded_lab, "obs", "--since", "30s", "--type", "l7", "--json")  # the 2000 s of records end about now
    seqs = [seq(Flow.from_json(r)) for r in map(json.loads, out.stdout.splitlines())]
    assert seqs and seqs[-1] == 999 and len(seqs) <= 16
    out = observe(recorded_lab, "obs", "--since", "1h", "--json")  # both files of both kinds: every record
    assert len(out.stdout.splitlines()) == sum(len(read_all(recorded_lab / "obs" / n)) for n in (KERNEL_FLOWS, PROXY_RECORDS))
    out = observe(recorded_lab, "obs", "--last", "1")  # the last Hubble flow: the response to the last request
    assert out.returncode == 0 and out.stdout.count("\n") == 1 and "http-response FORWARDED (HTTP/1.1 200" in out.stdout


def test_observe_rejects_a_bad_start(recorded_lab: Path) -> None:
    for args, why in ((("--last", "-1"), "expected a number of flows"), (("--since", "yesterday"), "expected a duration")):
        out = observe(recorded_lab, "obs", *args)
        assert out.returncode == 2 and why in out.stderr, out.stderr
