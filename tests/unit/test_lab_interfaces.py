"""What the lab offers the agent instead of being reached into: relabel (persisted in the
record, and undone exactly), proxy adoption (a proxy watched by pid, as after `run --keep`'s
fork), and the process start time that tells a recorded process from a later one with its pid."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane import lab as labmod
from dataplane import processes
from dataplane.processes import WatchedProcess
from dataplane.scenario import Relabel, parse_scenario
from dataplane.supervisor import ProxySupervisor
from dataplane.yamlsource import load_documents

SCENARIO = """\
name: interfaces
namespaces:
  - {name: x}
pods:
  - {name: a, namespace: x, labels: {app: a, tier: web}}
  - {name: b, namespace: x, labels: {app: b}}
"""


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> labmod.Lab:
    monkeypatch.setattr(labmod, "RUN_DIR", os.path.realpath(tmp_path))
    (doc,) = load_documents(SCENARIO, "interfaces.yaml")
    scenario = parse_scenario(doc, Path("interfaces.yaml"))
    lab = labmod.Lab(scenario, "iface-test")
    for key, pod in scenario.pods.items():  # what _build records, without the kernel
        lab.record.endpoints[key] = labmod.EndpointRecord(key, "pod", f"ns-{pod.name}", pod.ip, "lxc0",
                                                          labels=dict(pod.labels))
    lab.record.save()
    return lab


def saved_labels(name: str) -> dict[str, dict[str, str]]:
    rec = labmod.LabRecord.load(name)
    assert rec is not None
    return {k: e.labels for k, e in rec.endpoints.items()}


def test_relabel_is_persisted_and_set_labels_undoes_it(lab: labmod.Lab) -> None:
    previous = lab.relabel([Relabel("pod", "x/a", {"app": "z"}, ("tier",)), Relabel("namespace", "x", {"k": "v"}, ())])
    assert previous == {"x/a": {"app": "a", "tier": "web"}}  # only what changed, as it was
    assert saved_labels(lab.name) == {"x/a": {"app": "z"}, "x/b": {"app": "b"}}
    lab.set_labels(previous)
    assert saved_labels(lab.name) == {"x/a": {"app": "a", "tier": "web"}, "x/b": {"app": "b"}}


def test_two_relabels_of_one_pod_in_one_change_undo_to_the_first_labels(lab: labmod.Lab) -> None:
    previous = lab.relabel([Relabel("pod", "x/b", {"app": "c"}, ()), Relabel("pod", "x/b", {"app": "d"}, ())])
    assert saved_labels(lab.name)["x/b"] == {"app": "d"}
    lab.set_labels(previous)
    assert saved_labels(lab.name)["x/b"] == {"app": "b"}


def test_an_adopted_proxy_is_watched_by_pid_and_its_exit_is_seen(lab: labmod.Lab) -> None:
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lab.adopt_proxy(stand_in.pid)
        proxy = lab.proxy_process
        assert isinstance(proxy, WatchedProcess) and proxy.pid == stand_in.pid and proxy.poll() is None
        events: list[tuple[str, str, int | None]] = []
        supervisor = ProxySupervisor(lab, lambda event, detail, pid: events.append((event, detail, pid)))
        assert supervisor.up
        stand_in.kill()  # not reaped: to a watcher by pid, a zombie is gone
        deadline = time.monotonic() + 20
        while not events:
            assert time.monotonic() < deadline, "the supervisor never saw the adopted proxy exit"
            supervisor.tick()
            time.sleep(0.01)
        # Its exit status belongs to its parent: the watcher says only that it exited.
        assert events[0][0] == "exited" and events[0][2] == stand_in.pid
        assert "the L7 proxy exited;" in events[0][1] and not supervisor.up
    finally:
        stand_in.kill()
        stand_in.wait()


def test_start_time_tells_a_process_from_none() -> None:
    assert processes.start_time(os.getpid()) == processes.start_time(os.getpid()) is not None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert processes.start_time(child.pid) is None  # reaped: no such process
