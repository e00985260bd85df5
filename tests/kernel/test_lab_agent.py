"""A lab started with `l7lab up` keeps its agent: the kernel's flow records and the proxy's L7
records through `observe`, policy changes through `apply`, `delete` and `label`, all on real
traffic; a change that fails changes nothing; a killed agent leaves the lab enforcing and
`down` still removes everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dataplane import lab as labmod
from dataplane.flowrecord import Flow, FlowType, Record, record_type
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.cli_lab import (AUDITOR_POLICY, L7LAB, NO_PROXY, READ_ONLY, RETAIL, agent_status, curl,
                                   free_loopback_port, l7lab, leftovers, nothing_left, observe, reaches, scrape)

pytestmark = pytest.mark.kernel

BROKEN_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: broken, namespace: retail}
spec:
  endpointSelector: {}
  ingress:
    - fromCIDR: [300.1.1.1/8]
"""


def test_observe_shows_kernel_flows_and_l7_records(retail: str) -> None:
    inventory = "http://inventory-api:8080/api/inventory/1"
    denied = curl(retail, "frontend-app", inventory, "-X", "DELETE")
    assert denied.stdout.strip() == "Access denied"
    assert json.loads(curl(retail, "frontend-app", inventory).stdout)["endpoint"] == "retail/inventory-api"
    assert not reaches(retail, "reporting", inventory, False)

    def complete(records: list[Record]) -> bool:
        return (len([r for r in records if r.type == "L7"]) >= 2
                and any(r.type == "L3_L4" and r.verdict == "DROP" for r in records))
    records = observe(retail, complete)
    assert all(isinstance(r, Flow) for r in records)
    l7 = [r for r in records if r.type == "L7"]
    assert [(r.http.method, r.http.code, r.verdict) for r in l7] == [("DELETE", 403, "denied"), ("GET", 200, "forwarded")]
    assert all(r.source.name == "retail/frontend-app" and r.destination.name == "retail/inventory-api"
               and READ_ONLY in r.policy.policies and r.source.labels["app"] == "frontend-app"
               and r.direction == "ingress" and r.trace_point == "proxy" for r in l7)
    flows = [r for r in records if r.type == "L3_L4"]
    redirects = [f for f in flows if f.verdict == "REDIRECT"]
    # One kernel record per connection handed to the proxy, beside the proxy's record of it.
    assert len(redirects) == 2 and all(
        (f.source.name, f.destination.name, f.destination.port, f.l4.protocol) ==
        ("retail/frontend-app", "retail/inventory-api", 8080, "TCP")
        and f.policy.rules == (f"{READ_ONLY} ingress[0]",) and f.proxy_port == 15001
        and f.destination.labels["app"] == "inventory-api" for f in redirects)
    drops = [f for f in flows if f.verdict == "DROP"]
    assert drops and all((f.source.name, f.drop_reason, f.direction, f.deciding_endpoint.name) ==
                         ("retail/reporting", "POLICY_DENIED", "ingress", "retail/inventory-api") for f in drops)
    assert all("SYN" in f.l4.tcp_flags and f.trace_point == "from-endpoint" for f in drops)
    # One stream on one clock: each connection's kernel REDIRECT comes before the proxy's
    # record of its request, and the second connection after the first request.
    story = [(r.type, r.verdict) for r in records
             if r.type == "L7" or (r.verdict == "REDIRECT" and r.source.name == "retail/frontend-app")]
    assert story == [("L3_L4", "REDIRECT"), ("L7", "denied"), ("L3_L4", "REDIRECT"), ("L7", "forwarded")]
    only_l7 = observe(retail, lambda r: True, "--type", "l7")
    assert {record_type(r) for r in only_l7} == {"L7"} and len(only_l7) == 2
    text = l7lab("observe", retail).stdout.splitlines()  # Hubble's compact lines
    assert any("http-request DROPPED (HTTP/1.1 DELETE http://inventory-api:8080/api/inventory/1)" in line
               for line in text), text
    assert any("retail/reporting:" in line and "retail/inventory-api:8080" in line and "Policy denied DROPPED" in line
               for line in text), text
    metrics = json.loads((labmod.lab_dir(retail) / "metrics.json").read_text())["metrics"]
    assert any(m["verdict"] == "DROP" and m["reason"] == "POLICY_DENIED" and m["packets"] >= 1 for m in metrics)


def test_apply_label_delete_change_enforcement_at_once(retail: str, tmp_path: Path) -> None:
    url = "http://inventory-api:8080/api/inventory/1"
    policy = tmp_path / "auditors.yaml"
    policy.write_text(AUDITOR_POLICY)
    assert not reaches(retail, "reporting", url, False)

    out = l7lab("apply", "--lab", retail, str(policy))
    assert out.returncode == 0 and "applied CiliumNetworkPolicy retail/auditors-read" in out.stdout, out
    assert not reaches(retail, "reporting", url, False)  # no pod is an auditor yet

    out = l7lab("label", "pod", "reporting", "role=auditor", "--lab", retail)
    assert out.returncode == 0, out.stderr
    assert reaches(retail, "reporting", url, True)
    # Records carry the labels in force when they are made: the drop before the relabel without
    # the new label, the kernel's verdict on the connection after it with it.
    def from_reporting(records: list[Record]) -> list[Flow]:
        return [r for r in records if isinstance(r, Flow) and r.source.name == "retail/reporting"]
    mine = from_reporting(observe(retail, lambda rs: any(r.verdict == "FORWARD" for r in from_reporting(rs))))
    assert mine[0].verdict == "DROP" and "role" not in mine[0].source.labels
    after = [r for r in mine if r.verdict == "FORWARD"]
    assert after and all(r.type == FlowType.L3_L4 for r in after)
    assert all(r.source.labels["role"] == "auditor" and r.source.labels["app"] == "reporting"
               and r.policy.policies == ("CiliumNetworkPolicy retail/auditors-read",) for r in after)
    status = agent_status(retail)
    assert {e["name"]: e for e in status["endpoints"]}["retail/reporting"]["labels"] == {"app": "reporting", "role": "auditor"}
    assert "CiliumNetworkPolicy retail/auditors-read" in status["agent"]["policies"]

    assert l7lab("label", "pod", "retail/reporting", "role-", "--lab", retail).returncode == 0
    assert not reaches(retail, "reporting", url, False)
    assert l7lab("label", "pod", "retail/reporting", "role=auditor", "--lab", retail).returncode == 0
    assert reaches(retail, "reporting", url, True)

    out = l7lab("apply", "--lab", retail, str(policy))  # the same name again: it replaces the one in force
    assert out.returncode == 0 and ("applied CiliumNetworkPolicy retail/auditors-read (replaced the version in force)"
                                    in out.stdout), out
    out = l7lab("apply", "--lab", retail, str(policy), "--json")
    reply = json.loads(out.stdout)
    assert (reply["added"], reply["replaced"]) == ([], ["CiliumNetworkPolicy retail/auditors-read"]), reply

    out = l7lab("delete", "cnp", "auditors-read", "-n", "retail", "--lab", retail, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["removed"] == ["CiliumNetworkPolicy retail/auditors-read"]
    assert not reaches(retail, "reporting", url, False)
    # The L7 rules still hold through all of it.
    assert curl(retail, "frontend-app", url, "-X", "DELETE").stdout.strip() == "Access denied"


def test_a_failed_change_changes_nothing(retail: str, tmp_path: Path) -> None:
    good, bad = tmp_path / "auditors.yaml", tmp_path / "broken.yaml"
    good.write_text(AUDITOR_POLICY)
    bad.write_text(BROKEN_POLICY)
    assert l7lab("label", "pod", "reporting", "role=auditor", "--lab", retail).returncode == 0
    before = agent_status(retail)["agent"]["policies"]

    out = l7lab("apply", "--lab", retail, str(good), str(bad))
    assert out.returncode == 1
    assert f"{bad}:7: CiliumNetworkPolicy retail/broken: spec.ingress[0].fromCIDR[0]: invalid CIDR '300.1.1.1/8'" in out.stderr
    assert "nothing changed" in out.stderr
    assert agent_status(retail)["agent"]["policies"] == before
    assert not reaches(retail, "reporting", "http://inventory-api:8080/", False)  # the good file was not applied either

    out = l7lab("delete", "cnp", "no-such-policy", "-n", "retail", "--lab", retail)
    assert out.returncode == 1 and "no policy CiliumNetworkPolicy retail/no-such-policy is applied" in out.stderr
    out = l7lab("label", "pod", "retail/nobody", "a=b", "--lab", retail)
    assert out.returncode == 1 and "no pod 'retail/nobody'" in out.stderr
    out = l7lab("label", "namespace", "retail", "not a label", "--lab", retail)
    assert out.returncode == 1 and "expected KEY=VALUE or KEY-" in out.stderr
    out = l7lab("label", "namespace", "retail", "kubernetes.io/metadata.name=shop", "--lab", retail)
    assert out.returncode == 1 and "kubernetes.io/metadata.name cannot be changed" in out.stderr, out
    assert agent_status(retail)["agent"]["policies"] == before


IPV6_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: all-egress, namespace: retail}
spec:
  endpointSelector: {matchLabels: {app: no-such-pod}}
  egress:
    - toCIDR: [0.0.0.0/0, "::/0"]
"""


def test_apply_notes_an_ipv6_cidr_and_applies_the_rest(retail: str, tmp_path: Path) -> None:
    policy = tmp_path / "all-egress.yaml"
    policy.write_text(IPV6_POLICY)
    out = l7lab("apply", "--lab", retail, str(policy))
    assert out.returncode == 0, out.stderr
    assert ("notice: CiliumNetworkPolicy retail/all-egress spec.egress[0]: IPv6 CIDR ::/0 accepted; the lab is IPv4 "
            "only" in out.stdout), out.stdout
    assert "CiliumNetworkPolicy retail/all-egress" in agent_status(retail)["agent"]["policies"]
    reply = json.loads(l7lab("apply", "--lab", retail, str(policy), "--json").stdout)
    assert reply["replaced"] == ["CiliumNetworkPolicy retail/all-egress"] and len(reply["notices"]) == 1
    out = l7lab("delete", "cnp", "all-egress", "-n", "retail", "--lab", retail, "--json")
    assert out.returncode == 0 and "notices" not in json.loads(out.stdout)


def test_killed_agent_leaves_the_lab_enforcing_and_down_cleans_up(retail: str, tmp_path: Path) -> None:
    pid = agent_status(retail)["agent"]["pid"]
    # The agent lives in the lab's node namespace, so whatever removes the lab finds it.
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{labmod.node_netns(retail)}").st_ino
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + scaled(5)
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    url = "http://inventory-api:8080/api/inventory/1"
    assert json.loads(curl(retail, "frontend-app", url).stdout)["endpoint"] == "retail/inventory-api"
    assert curl(retail, "frontend-app", url, "-X", "DELETE").stdout.strip() == "Access denied"
    assert not reaches(retail, "reporting", url, False)
    policy = tmp_path / "auditors.yaml"
    policy.write_text(AUDITOR_POLICY)
    out = l7lab("apply", "--lab", retail, str(policy))
    assert out.returncode == 1 and "is not running" in out.stderr
    assert agent_status(retail)["agent"]["running"] is False


def test_a_change_the_proxy_cannot_confirm_is_rolled_back(retail: str, tmp_path: Path) -> None:
    """The proxy is frozen (SIGSTOP): it cannot confirm new L7 rules, so the change is refused
    and undone; the kernel and the proxy keep the policy they had."""
    rec = labmod.LabRecord.load(retail)
    proxy = next(r["pid"] for r in rec.resources if r["kind"] == "process" and "proxy" in r.get("what", ""))
    policy = tmp_path / "auditors.yaml"
    policy.write_text(AUDITOR_POLICY)
    before = agent_status(retail)["agent"]["policies"]
    os.kill(proxy, signal.SIGSTOP)
    try:
        out = l7lab("apply", "--lab", retail, str(policy))
    finally:
        os.kill(proxy, signal.SIGCONT)
    assert out.returncode == 1 and "could not be enforced and was rolled back" in out.stderr, out
    assert agent_status(retail)["agent"]["policies"] == before
    assert l7lab("label", "pod", "reporting", "role=auditor", "--lab", retail).returncode == 0
    assert not reaches(retail, "reporting", "http://inventory-api:8080/", False)  # the allow never took effect
    url = "http://inventory-api:8080/api/inventory/1"
    assert curl(retail, "frontend-app", url, "-X", "DELETE").stdout.strip() == "Access denied"
    assert json.loads(curl(retail, "frontend-app", url).stdout)["endpoint"] == "retail/inventory-api"


def test_run_keep_hands_the_lab_to_an_agent() -> None:
    name = unique_lab("rk")
    try:
        out = l7lab("run", str(RETAIL), "--name", name, "--keep", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["passed"], out.stderr
        assert f"lab {name} kept up (agent pid" in out.stderr
        status = agent_status(name)
        assert status["agent"]["running"] and READ_ONLY in status["agent"]["policies"]
        # The run's own probes are in the flow records too.
        ran = observe(name, lambda r: any(x.verdict == "REDIRECT" and x.source.name == "retail/frontend-app"
                                          for x in r) and any(x.verdict == "DROP" and
                                                              x.source.name == "retail/reporting" for x in r),
                      "--type", "flows")
        assert any(r.verdict == "REDIRECT" and r.source.name == "retail/frontend-app" for r in ran)
        assert any(r.verdict == "DROP" and r.source.name == "retail/reporting" for r in ran)
        url = "http://inventory-api:8080/api/inventory/1"
        assert not reaches(name, "reporting", url, False)
        # The agent reloads the proxy it did not start (by pid) and diffs the maps it inherited.
        assert l7lab("label", "pod", "reporting", "app=frontend-app", "--lab", name).returncode == 0
        assert reaches(name, "reporting", url, True)
        assert curl(name, "reporting", url, "-X", "DELETE").stdout.strip() == "Access denied"
        records = observe(name, lambda r: any(x.type == "L3_L4" and x.source.name == "retail/reporting"
                                              and x.verdict == "REDIRECT" for x in r))
        assert any(r.type == "L3_L4" and r.source.name == "retail/reporting" and r.verdict == "DROP"
                   for r in records)
    finally:
        assert l7lab("down", name).returncode == 0
    assert nothing_left(name), leftovers(name)


def test_up_serves_prometheus_metrics_on_loopback() -> None:
    name, port = unique_lab("pm"), free_loopback_port()
    try:
        up = l7lab("up", str(RETAIL), "--name", name, "--metrics", f"127.0.0.1:{port}", "--json")
        assert up.returncode == 0, up.stderr
        url = json.loads(up.stdout)["metrics"]
        assert url == f"http://127.0.0.1:{port}/metrics"
        inventory = "http://inventory-api:8080/api/inventory/1"
        before = scrape(url)
        assert curl(name, "frontend-app", inventory, "-X", "DELETE").stdout.strip() == "Access denied"
        assert not reaches(name, "reporting", inventory, False)
        drops_key = (f'l7lab_datapath_packets_total{{direction="ingress",lab="{name}",reason="POLICY_DENIED",'
                     f'verdict="DROP"}}')
        denied_key = f'l7lab_l7_records_total{{lab="{name}",protocol="HTTP",verdict="denied"}}'
        deadline = time.monotonic() + scaled(30)
        while True:
            after = scrape(url)
            if after.get(denied_key, 0) >= 1 and after.get(drops_key, 0) > before.get(drops_key, 0):
                break
            assert time.monotonic() < deadline, after
            time.sleep(0.2)
        assert after[f'l7lab_policies{{lab="{name}"}}'] == 2
        assert after[f'l7lab_flow_events_total{{lab="{name}",verdict="REDIRECT"}}'] >= 1
        assert agent_status(name)["agent"]["metrics_url"] == url
        # Loopback only, and the port answers nothing but /metrics.
        with pytest.raises(urllib.error.HTTPError) as info:
            NO_PROXY.open(url.replace("/metrics", "/"), timeout=scaled(10))
        assert info.value.code == 404
    finally:
        assert l7lab("down", name).returncode == 0
    assert nothing_left(name), leftovers(name)
    with pytest.raises(OSError):  # the agent is gone, and its listener with it
        NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_up_refuses_a_metrics_address_off_loopback() -> None:
    name = unique_lab("pm")
    out = l7lab("up", str(RETAIL), "--name", name, "--metrics", "0.0.0.0:9464")
    assert out.returncode == 1 and "not a loopback address" in out.stderr
    assert nothing_left(name)


def test_flow_records_are_rotated_and_observe_follows() -> None:
    name = unique_lab("fr")
    env = {**os.environ, "L7LAB_FLOWS_ROTATE_BYTES": "1500"}  # a record or two per file
    try:
        up = subprocess.run([*L7LAB, "up", str(RETAIL), "--name", name], cwd=REPO, capture_output=True, text=True,
                            timeout=scaled(120), env=env)
        assert up.returncode == 0, up.stderr
        for _ in range(6):
            assert not reaches(name, "reporting", "http://inventory-api:8080/", False)
        flows = labmod.lab_dir(name) / "flows.jsonl"
        deadline = time.monotonic() + scaled(30)
        while not (flows.with_name("flows.jsonl.1")).exists():
            assert time.monotonic() < deadline, "flows.jsonl was never rotated"
            time.sleep(0.1)
        assert flows.with_name("flows.jsonl.1").stat().st_size > 0

        def probe_and_observe() -> list[Record]:
            assert not reaches(name, "reporting", "http://inventory-api:8080/", False)
            out = l7lab("observe", name, "--json", "--type", "flows")
            assert out.returncode == 0, out.stderr
            return [Flow.from_json(json.loads(line)) for line in out.stdout.splitlines()]
        # A probe's records can push the new file over the limit again (it is rotated once more,
        # and is empty until the next record): probe until observe reads records of this file.
        deadline = time.monotonic() + scaled(60)
        while not (records := probe_and_observe()):
            assert time.monotonic() < deadline, "observe never showed a record of the current file"
        assert all(r.verdict == "DROP" and r.source.name == "retail/reporting" for r in records)
    finally:
        assert l7lab("down", name).returncode == 0
    assert nothing_left(name), leftovers(name)
