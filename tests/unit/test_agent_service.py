"""The agent's service on a lab with a stand-in datapath (no kernel): a change goes through the
engine's propose/commit, a change the maps refuse is never committed, and a change whose reply
is lost is undone everywhere it took effect (the engine, the maps, the labels in the record).
The kernel tests (tests/kernel/test_lab_agent.py, test_agent_supervision.py) do the same with
real programs, a real proxy and a real socket."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane import lab as labmod
from dataplane.agent import LabService
from dataplane.policy.engine import Flow, PolicyEngine
from dataplane.scenario import parse_scenario
from dataplane.yamlsource import load_documents
from tests.support.policy import TWO_PODS_ALLOW_B

SCENARIO = "name: service\n" + TWO_PODS_ALLOW_B


class StandInDatapath:
    """What the service and the lab call on a loaded datapath; records every map state synced."""

    def __init__(self) -> None:
        self.synced: list[Any] = []
        self.refuse = False

    def sync(self, state: Any, interfaces: dict[int, int]) -> Any:
        if self.refuse:
            raise OSError("the policy map is full")
        self.synced.append(state)
        return type("SyncStats", (), {"total": 1})()

    def poll_events(self, timeout_ms: int = 0) -> list[Any]:
        return []

    def open_connections(self) -> set[tuple[str, str]]:
        return set()

    def metrics_detail(self) -> dict[Any, Any]:
        return {}


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LabService]:
    monkeypatch.setattr(labmod, "RUN_DIR", os.path.realpath(tmp_path))
    (doc,) = load_documents(SCENARIO, "service.yaml")
    scenario = parse_scenario(doc, Path("service.yaml"))
    lab = labmod.Lab(scenario, "svc-test", datapath=StandInDatapath(), policy=PolicyEngine(scenario))  # type: ignore[arg-type]
    for key, pod in scenario.pods.items():  # what the lab records when it is built, without the kernel
        lab.record.endpoints[key] = labmod.EndpointRecord(key, "pod", f"ns-{pod.name}", pod.ip, "lxc0",
                                                          labels=dict(pod.labels))
    labmod.lab_dir(lab.name).mkdir(parents=True)
    lab.record.save()
    svc = LabService(lab)
    svc.proxy.next_attempt = float("inf")  # no proxy in this lab, and none is to be started
    svc.open()
    yield svc
    svc.close()


def b_to_a(engine: PolicyEngine) -> str:
    return engine.verdict(Flow("x/b", engine.scenario.pods["x/a"].ip, "TCP", 80)).outcome


RELABEL = {"op": "change", "relabel": [{"target": "pod", "name": "x/b", "set": {"app": "c"}}]}


def recorded_labels(name: str) -> dict[str, str]:
    rec = labmod.LabRecord.load(name)
    assert rec is not None
    return rec.endpoints["x/b"].labels


def test_a_change_is_committed_once_the_maps_hold_it(service: LabService) -> None:
    engine, datapath = service.engine, service.datapath
    reply, undo = service.handle({**RELABEL, "deadline": time.monotonic() + 10})
    assert reply["ok"] and undo is not None, reply
    assert b_to_a(engine) == "dropped" and engine.pod_labels["x/b"] == {"app": "c"}
    assert datapath.synced[-1] is engine.map_state() is service.state  # type: ignore[attr-defined]
    assert recorded_labels(service.lab.name) == {"app": "c"}


def test_a_change_the_maps_refuse_is_never_committed(service: LabService) -> None:
    engine, datapath = service.engine, service.datapath
    before = engine.snapshot()
    datapath.refuse = True  # type: ignore[attr-defined]
    reply, undo = service.handle(RELABEL)
    assert not reply["ok"] and undo is None
    assert "could not be enforced and was rolled back: the policy map is full" in reply["errors"][0]
    assert engine.snapshot() is before and b_to_a(engine) == "allowed"
    assert recorded_labels(service.lab.name) == {"app": "b"}
    assert service.counters.changes["rolled back"] == 1


def test_a_change_whose_reply_is_lost_is_undone_everywhere(service: LabService) -> None:
    engine, datapath = service.engine, service.datapath
    before = engine.snapshot()
    reply, undo = service.handle({"op": "change", "delete": [{"kind": "NetworkPolicy", "name": "allow-b",
                                                              "namespace": "x"}], **RELABEL})
    assert reply["ok"] and reply["removed"] == ["NetworkPolicy x/allow-b"], reply
    assert not engine.policies and recorded_labels(service.lab.name) == {"app": "c"}
    service.replied(undo, lost=BrokenPipeError(32, "Broken pipe"))
    assert engine.snapshot() is before and list(engine.policies) == [("NetworkPolicy", "x", "allow-b")]
    assert datapath.synced[-1] is before.resolution.state  # type: ignore[attr-defined]
    assert recorded_labels(service.lab.name) == {"app": "b"}
    assert service.counters.changes["rolled back"] == 1 and service.counters.changes["applied"] == 0


def test_a_change_past_its_deadline_touches_nothing(service: LabService) -> None:
    before, synced = service.engine.snapshot(), len(service.datapath.synced)  # type: ignore[attr-defined]
    reply, undo = service.handle({**RELABEL, "deadline": time.monotonic() - 1})
    assert not reply["ok"] and undo is None and "after its caller's deadline" in reply["errors"][0]
    assert service.engine.snapshot() is before and len(service.datapath.synced) == synced  # type: ignore[attr-defined]


def test_the_metrics_credit_a_default_deny_to_the_policies_isolating_the_pod_now(service: LabService) -> None:
    """The policy-drop counter's lookup is the map state's (`MapState.isolating_policies`, which
    the service map asks too), under the state in force: a deleted policy isolates no more."""
    assert service.isolating_policies("x", "a", "INGRESS") == [("NetworkPolicy", "x", "allow-b")]
    assert service.isolating_policies("x", "a", "EGRESS") == []
    assert service.isolating_policies("x", "b", "INGRESS") == []
    reply, undo = service.handle({"op": "change", "delete": [{"kind": "NetworkPolicy", "name": "allow-b",
                                                              "namespace": "x"}]})
    assert reply["ok"], reply
    service.replied(undo)
    assert service.isolating_policies("x", "a", "INGRESS") == []
