"""Labs on the real kernel: pods that connect, names that resolve, labs side by side, and
teardown that leaves nothing behind, even after the process that built the lab was killed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dataplane import lab as labmod
from dataplane import topology
from dataplane.agent.process import BUILD_TIMEOUT
from dataplane.lab import Lab
from dataplane.logfiles import read_all, request_log
from dataplane.runner import KernelExecutor, run_scenario
from dataplane.scenario import Destination, Probe, Scenario, Step, load_scenario
from dataplane.timescale import scaled
from tests.conftest import REPO, patient, unique_lab
from tests.support.cli_lab import L7LAB, curl, leftovers, nothing_left

CONNECTIVITY = REPO / "scenarios" / "connectivity.yaml"


def all_pairs_step(scenario: Scenario) -> Step:
    """Every pod to every other endpoint on every declared port, TCP and UDP."""
    probes = []
    for src in scenario.pods.values():
        targets = [(k, "pod", p.ip, p.ports) for k, p in scenario.pods.items() if k != src.key]
        targets += [(h.name, "world", h.address, h.ports) for h in scenario.world.values()]
        for name, kind, ip, ports in targets:
            for port in ports:
                probes.append(Probe(src.key, Destination(kind, name, ip, port.port), port.protocol, "allowed",
                                    None, 5.0, scenario.steps[0].probes[0].location))
    return Step(0, "all pairs", probes=tuple(probes))


@pytest.fixture
def scenario() -> Scenario:
    return load_scenario(CONNECTIVITY).with_name(unique_lab())


def test_every_pair_connects_on_every_port_and_only_own_names_resolve_without_dns(scenario: Scenario) -> None:
    assert len(scenario.pods) >= 6
    step = all_pairs_step(scenario)
    assert {p.protocol for p in step.probes} == {"TCP", "UDP"}
    with Lab(scenario) as lab:
        report = run_scenario(Scenario(**{**scenario.__dict__, "steps": (step,)}), KernelExecutor(lab))
        failed = [(r.probe.source, str(r.probe.destination), r.observed.detail) for r in report.results if not r.passed]
        assert not failed
        assert len(report.results) == len(step.probes) > 40
        # Each backend saw the probe's client address: the source pod's own IP.
        sample = next(r for r in report.results if r.probe.protocol == "TCP" and r.probe.destination.kind == "pod")
        assert sample.observed.body["client"].split(":")[0] == scenario.pods[sample.probe.source].ip

        ns = lab.record.endpoints["shop/frontend-app"].netns
        # The pod knows its own name (the kubelet writes it in the hosts file), and the lab has no
        # cluster DNS (no kube-dns pod): every other name is simply not found (exit 2: no such key).
        out = subprocess.run(["ip", "netns", "exec", ns, "getent", "hosts", "frontend-app"], capture_output=True, text=True)
        assert out.stdout.split()[:1] == ["10.200.0.2"], out
        for name in ("inventory-api", "ledger.payments", "api.partner.example.com", "nowhere.invalid"):
            out = subprocess.run(["ip", "netns", "exec", ns, "getent", "hosts", name], capture_output=True, text=True)
            assert out.returncode == 2, (name, out)
    assert nothing_left(scenario.name), leftovers(scenario.name)


def test_two_labs_side_by_side_do_not_interfere() -> None:
    base = load_scenario(CONNECTIVITY)
    a, b = patient(base.with_name(unique_lab("a"))), patient(base.with_name(unique_lab("b")))
    with Lab(a) as lab_a, Lab(b) as lab_b:
        # Same addresses in both labs: each probe must be answered inside its own lab.
        report_a = run_scenario(a, KernelExecutor(lab_a))
        report_b = run_scenario(b, KernelExecutor(lab_b))
        assert report_a.passed and report_b.passed
        paths_a = [r["path"] for r in read_all(request_log(labmod.lab_dir(a.name), "pod.shop.inventory-api"))]
        paths_b = [r["path"] for r in read_all(request_log(labmod.lab_dir(b.name), "pod.shop.inventory-api"))]
        assert paths_a.count("/api/inventory/item123") == 1 and paths_b.count("/api/inventory/item123") == 1
        lab_a.down()
        assert nothing_left(a.name)
        # Taking one lab down leaves the other working.
        again = run_scenario(b, KernelExecutor(lab_b))
        assert again.passed
    assert nothing_left(b.name)


def test_down_removes_everything_and_is_idempotent(scenario: Scenario) -> None:
    lab = Lab(scenario)
    rec = lab.up()
    pids = [r["pid"] for r in rec.resources if r["kind"] == "process"]
    assert len(pids) == len([e for e in rec.endpoints.values() if e.ports])
    assert all(Path(f"/proc/{p}").exists() for p in pids)
    assert leftovers(scenario.name)["netns"]
    removed = labmod.down(scenario.name)
    assert any(r.startswith("netns ") for r in removed)
    assert nothing_left(scenario.name), leftovers(scenario.name)
    assert not any(Path(f"/proc/{p}").exists() and "podserver" in Path(f"/proc/{p}/cmdline").read_text() for p in pids)
    assert labmod.down(scenario.name) == []
    assert labmod.clean(scenario.name) == []


def _kill_up_midway(name: str) -> None:
    proc = subprocess.Popen([*L7LAB, "up", str(CONNECTIVITY), "--name", name], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it while it is building: some namespaces exist, the servers are starting. The event is
    # awaited, not a time: `up` compiles the datapath before it makes any namespace, which takes
    # seconds here and minutes on an emulated machine. The bound is the one `up` itself has for
    # building a lab; `up` ending first (an error) stops the wait too.
    deadline = time.monotonic() + scaled(BUILD_TIMEOUT)
    while (len(topology.list_netns(labmod.lab_prefix(name))) < 4 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    assert proc.poll() is None, f"l7lab up exited with {proc.returncode} before it made the lab's namespaces"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = labmod.LabRecord.load(name)
    assert rec is None or rec.status != "up", "up finished before it could be killed"
    assert topology.list_netns(labmod.lab_prefix(name))


@pytest.mark.parametrize("verb", ["clean", "down"])
def test_after_sigkill_of_up_nothing_is_left(verb: str) -> None:
    name = unique_lab("k")
    _kill_up_midway(name)
    out = subprocess.run([*L7LAB, verb, name], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert nothing_left(name), leftovers(name)


def test_kill_after_servers_started_then_clean_all_labs_of_this_name() -> None:
    name = unique_lab("s")
    out = subprocess.run([*L7LAB, "up", str(CONNECTIVITY), "--name", name], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert leftovers(name)["processes"]
    # The record disappears (as after a crash that lost it): clean still finds everything.
    labmod.record_path(name).unlink()
    out = subprocess.run([*L7LAB, "clean", name], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and nothing_left(name), leftovers(name)


def test_cli_up_status_exec_down(scenario: Scenario, tmp_path: Path) -> None:
    name = scenario.name
    try:
        out = subprocess.run([*L7LAB, "up", str(CONNECTIVITY), "--name", name], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        again = subprocess.run([*L7LAB, "up", str(CONNECTIVITY), "--name", name], cwd=REPO, capture_output=True, text=True)
        assert again.returncode == 1 and "already up" in again.stderr
        status = json.loads(subprocess.run([*L7LAB, "status", "--lab", name, "--json"], cwd=REPO, capture_output=True, text=True).stdout)
        endpoints = {e["name"]: e for e in status[0]["endpoints"]}
        assert status[0]["status"] == "up" and endpoints["shop/inventory-api"]["ip"] == "10.200.0.3"
        assert endpoints["shop/inventory-api"]["ports"] == ["8080/TCP (http-api)", "9090/TCP (metrics)"]
        assert endpoints["partner"]["kind"] == "world"
        out = subprocess.run([*L7LAB, "exec", "--lab", name, "frontend-app", "--", "ip", "-4", "-o", "addr", "show", "eth0"],
                             cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0 and "10.200.0.2/32" in out.stdout
        out = curl(name, "frontend-app", "http://inventory-api.shop:8080/x?y=1")  # the address pinned: no DNS here
        answer = json.loads(out.stdout)
        assert answer["endpoint"] == "shop/inventory-api" and answer["path"] == "/x?y=1" and answer["client"].startswith("10.200.0.2:")
        out = subprocess.run([*L7LAB, "exec", "--lab", name, "nosuchpod", "--", "true"], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 1 and "unknown endpoint 'nosuchpod'" in out.stderr
    finally:
        out = subprocess.run([*L7LAB, "down", "--lab", name], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and nothing_left(name), out.stderr
    # down says what it removed: the namespaces, the lab's directory and its record.
    assert f"lab {name}: removed netns {labmod.node_netns(name)}" in out.stdout
    assert f"lab {name}: removed dir {labmod.lab_dir(name)}" in out.stdout
    assert f"lab {name}: removed record {labmod.record_path(name)}" in out.stdout
    gone = subprocess.run([*L7LAB, "status", name], cwd=REPO, capture_output=True, text=True)
    assert gone.returncode == 1 and f"no lab named {name!r} is up" in gone.stderr


def test_run_exit_codes(tmp_path: Path) -> None:
    name = unique_lab("r")
    # Every probe of connectivity.yaml expects an answer: a patient timeout costs nothing and keeps
    # a loaded machine from passing a slow answer off as a drop.
    assert "probeTimeout: 1.0" in CONNECTIVITY.read_text()
    patient_copy = tmp_path / "connectivity.yaml"
    patient_copy.write_text(CONNECTIVITY.read_text().replace("probeTimeout: 1.0", "probeTimeout: 5.0")
                            .replace("file: policies/", f"file: {REPO / 'scenarios' / 'policies'}/"))
    ok = subprocess.run([*L7LAB, "run", str(patient_copy), "--name", name, "--json"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["passed"] and report["probes"] == 9 and report["failed"] == 0
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(patient_copy.read_text().replace("to: toolbox:514, protocol: UDP, expect: allowed",
                                                      "to: toolbox:514, protocol: UDP, expect: dropped"))
    bad = subprocess.run([*L7LAB, "run", str(wrong), "--name", name, "--json"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 3
    failed = [r for r in json.loads(bad.stdout)["results"] if not r["passed"]]
    assert [(f["to"], f["expected"], f["observed"]) for f in failed] == [("tools/toolbox:514", "dropped", "allowed")]
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("name: x\npods: []\n")
    err = subprocess.run([*L7LAB, "run", str(invalid)], cwd=REPO, capture_output=True, text=True)
    assert err.returncode == 1 and "invalid.yaml:2: pods: must not be empty" in err.stderr
    assert nothing_left(name)


def test_down_refuses_a_record_edited_to_reach_outside_and_clean_still_removes_the_lab(tmp_path: Path) -> None:
    """The record is a file: one that lists a directory the lab does not own stops `down` before
    anything is removed; `clean LAB` (which does not read it) then removes the lab."""
    name = unique_lab("e")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("must stay\n")
    out = subprocess.run([*L7LAB, "up", str(CONNECTIVITY), "--name", name], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    try:
        path = labmod.record_path(name)
        rec = json.loads(path.read_text())
        rec["resources"].append({"kind": "dir", "path": str(outside)})
        path.write_text(json.dumps(rec))
        before = leftovers(name)
        out = subprocess.run([*L7LAB, "down", name], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 1, out.stdout
        assert f"refusing to remove {outside}: lab {name!r} owns only" in out.stderr
        assert f"nothing of lab {name} was removed" in out.stderr
        assert leftovers(name) == before  # every namespace, file and process of the lab is still there
    finally:
        out = subprocess.run([*L7LAB, "clean", name], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"lab {name}: removed netns {labmod.node_netns(name)}" in out.stdout
    assert nothing_left(name), leftovers(name)
    assert (outside / "canary").read_text() == "must stay\n"
