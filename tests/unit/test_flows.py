"""Flow records: the kernel's events and the proxy's records in one format, read back in time
order, robust to a line still being written."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from dataplane.datapath import FlowEvent
from dataplane.errors import L7LabError
from dataplane.flows import KERNEL_FLOWS, PROXY_RECORDS, RecordTail, describe, kernel_record
from dataplane.logfiles import RotatingLog, read_all
from dataplane.mapstate import Direction, EndpointState, MapState, RuleAttribution
from dataplane.metrics import parse_listen
from dataplane.reasons import DropReason, FlowVerdict, Hook

REPO = Path(__file__).resolve().parents[2]


def event(verdict: FlowVerdict, reason: DropReason = DropReason.NONE, rule_id: int = 0) -> FlowEvent:
    return FlowEvent(ts_ns=1, src="10.0.0.2", dst="10.0.0.3", sport=40000, dport=8080, protocol=6,
                     verdict=verdict, reason=reason, direction=Direction.INGRESS, src_identity=300,
                     dst_identity=301, src_endpoint=1, dst_endpoint=2, rule_id=rule_id, proxy_port=15001,
                     tcp_flags=0x02, hook=Hook.FROM_CONTAINER, ifindex=5, length=60)


def state() -> MapState:
    st = MapState()
    st.endpoints[2] = EndpointState(2, "shop/api", "10.0.0.3", 301, True, False)
    st.rules[7] = RuleAttribution(7, "CiliumNetworkPolicy shop/api-l7", 0, "ingress")
    return st


def test_kernel_record_names_pods_endpoint_and_rule() -> None:
    rec = kernel_record(event(FlowVerdict.REDIRECT, rule_id=7), state(), {"10.0.0.2": "shop/web"}, 1700000000.5)
    assert rec["type"] == "flow" and rec["verdict"] == "REDIRECT" and rec["reason"] == "NONE"
    assert rec["source"] == {"ip": "10.0.0.2", "port": 40000, "pod": "shop/web", "identity": 300}
    assert rec["destination"]["pod"] == "" and rec["endpoint"] == "shop/api"
    assert rec["policy"] == "CiliumNetworkPolicy shop/api-l7 ingress[0]" and rec["tcp_flags"] == ["SYN"]
    assert "REDIRECT" in describe(rec) and "to proxy port 15001" in describe(rec)
    drop = kernel_record(event(FlowVerdict.DROP, DropReason.POLICY_DENIED), state(), {}, 1.0)
    assert drop["policy"] == "" and "DROP POLICY_DENIED at ingress of shop/api" in describe(drop)


def test_observe_prints_paths_and_names_verbatim(tmp_path: Path) -> None:
    """A request path with brackets and colons is the client's text, not terminal markup."""
    path = "/api/[admin]/x[/]:x:?q=[a-z0-9]+"
    rec = {"type": "l7", "time": 1.0, "method": "GET", "path": path, "verdict": "denied", "status": 403,
           "source": {"pod": "shop/[web]"}, "destination": {"pod": "shop/api", "port": 8080},
           "policies": ["CiliumNetworkPolicy shop/[x]"]}
    console = Console(file=io.StringIO(), width=300, color_system=None)
    console.print(describe(rec), highlight=False, soft_wrap=True)
    assert console.file.getvalue().strip() == (f"L7    shop/[web] -> shop/api:8080 GET {path} denied 403 "
                                               "(CiliumNetworkPolicy shop/[x])")


def test_tail_merges_both_files_in_time_order_and_waits_for_whole_lines(tmp_path: Path) -> None:
    (tmp_path / KERNEL_FLOWS).write_text(json.dumps({"type": "flow", "time": 1.0, "verdict": "REDIRECT"}) + "\n"
                                         + json.dumps({"type": "flow", "time": 3.0, "verdict": "DROP"}) + "\n")
    (tmp_path / PROXY_RECORDS).write_text(json.dumps({"time": 2.0, "method": "GET"}) + "\n" + '{"time": 4.0, "met')
    tail = RecordTail(tmp_path)
    assert [(r["type"], r["time"]) for r in tail.read()] == [("flow", 1.0), ("l7", 2.0), ("flow", 3.0)]
    assert tail.read() == []
    with open(tmp_path / PROXY_RECORDS, "a") as f:
        f.write('hod": "POST"}\nnot json\n')
    assert [(r["type"], r.get("method")) for r in tail.read()] == [("l7", "POST")]  # torn line skipped


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
    flows = RotatingLog(lab / KERNEL_FLOWS, max_bytes=20_000)
    l7 = RotatingLog(lab / PROXY_RECORDS, max_bytes=20_000)
    for i in range(1000):
        flows.write_line(json.dumps({"type": "flow", "time": start + 2 * i, "seq": i, "verdict": "FORWARD"}))
        l7.write_line(json.dumps({"time": start + 2 * i + 1, "seq": i, "method": "GET", "path": f"/{i}"}))
    flows.close()
    l7.close()
    assert (lab / (KERNEL_FLOWS + ".1")).exists() and (lab / (PROXY_RECORDS + ".1")).exists()
    return tmp_path


def test_observe_last_and_since(recorded_lab: Path) -> None:
    out = observe(recorded_lab, "obs", "--last", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert [(r["type"], r["seq"]) for r in map(json.loads, out.stdout.splitlines())] == [("l7", 998), ("flow", 999), ("l7", 999)]
    out = observe(recorded_lab, "obs", "--last", "2", "--type", "flows", "--json")
    assert [(r["type"], r["seq"]) for r in map(json.loads, out.stdout.splitlines())] == [("flow", 998), ("flow", 999)]
    out = observe(recorded_lab, "obs", "--since", "30s", "--type", "l7", "--json")  # the 2000 s of records end about now
    seqs = [r["seq"] for r in map(json.loads, out.stdout.splitlines())]
    assert seqs and seqs[-1] == 999 and len(seqs) <= 16
    out = observe(recorded_lab, "obs", "--since", "1h", "--json")  # both files of both kinds: every record
    assert len(out.stdout.splitlines()) == sum(len(read_all(recorded_lab / "obs" / n)) for n in (KERNEL_FLOWS, PROXY_RECORDS))
    out = observe(recorded_lab, "obs", "--last", "1")
    assert out.returncode == 0 and "GET /999" in out.stdout


def test_observe_rejects_a_bad_start(recorded_lab: Path) -> None:
    for args, why in ((("--last", "-1"), "expected a number of records"), (("--since", "yesterday"), "expected a duration")):
        out = observe(recorded_lab, "obs", *args)
        assert out.returncode == 2 and why in out.stderr, out.stderr
