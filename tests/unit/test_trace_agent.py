"""The agent's trace ops on a lab with a stand-in datapath (no kernel): trace-start checks its
flows before any reaches the datapath, the loop keeps the events of active traces only,
trace-stop returns them with the oracle's decision and the lab's names and removes the flows,
and a trace nobody stops (or the agent closing) never leaves flows behind. The kernel test
(tests/kernel/test_trace_cli.py) does it with real programs through `l7lab trace`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane import lab as labmod
from dataplane.abi import Hook, TracePoint
from dataplane.agent import LabService
from dataplane.agent import service as service_module
from dataplane.datapath import TraceEvent
from dataplane.errors import SetupError
from dataplane.policy.engine import PolicyEngine
from dataplane.scenario import parse_scenario
from dataplane.yamlsource import load_documents
from tests.support.policy import TWO_PODS_ALLOW_B

SCENARIO = "name: tracing\n" + TWO_PODS_ALLOW_B


class StandInDatapath:
    """The loader's calls the service makes, with trace flows kept in a dict as the map would."""

    def __init__(self) -> None:
        self.flows: dict[int, list[Any]] = {}
        self.pending: list[TraceEvent] = []
        self.full = False

    def sync(self, state: Any, interfaces: dict[int, int]) -> Any:
        return type("SyncStats", (), {"total": 1})()

    def poll_events(self, timeout_ms: int = 0) -> list[Any]:
        return []

    def open_connections(self) -> set[tuple[str, str]]:
        return set()

    def poll_traces(self, timeout_ms: int = 0) -> list[TraceEvent]:
        out, self.pending = self.pending, []
        return out

    def trace_start(self, trace_id: int, flows: list[Any]) -> None:
        if self.full:
            raise SetupError("the trace map is full")
        self.flows[trace_id] = list(flows)

    def trace_stop(self, trace_id: int) -> None:
        self.flows.pop(trace_id, None)

    def metrics_detail(self) -> dict[Any, Any]:
        return {}


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LabService]:
    monkeypatch.setattr(labmod, "RUN_DIR", os.path.realpath(tmp_path))
    (doc,) = load_documents(SCENARIO, "tracing.yaml")
    scenario = parse_scenario(doc, Path("tracing.yaml"))
    lab = labmod.Lab(scenario, "trace-test", datapath=StandInDatapath(), policy=PolicyEngine(scenario))  # type: ignore[arg-type]
    for index, (key, pod) in enumerate(scenario.pods.items(), 1):
        lab.record.endpoints[key] = labmod.EndpointRecord(key, "pod", f"ns-{pod.name}", pod.ip, f"lxc{index}",
                                                          ifindex=10 + index, labels=dict(pod.labels))
    labmod.lab_dir(lab.name).mkdir(parents=True)
    lab.record.save()
    svc = LabService(lab)
    svc.proxy.next_attempt = float("inf")
    svc.open()
    yield svc
    svc.close()


def start_request(service: LabService, trace_id: int = 41, **override: Any) -> dict[str, Any]:
    pods = service.lab.scenario.pods
    b, a = pods["x/b"], pods["x/a"]
    request = {"op": "trace-start", "trace_id": trace_id,
               "probe": {"source": "x/b", "to": "a:80", "protocol": "TCP", "http": None, "dns": None},
               "flows": [{"src": b.ip, "dst": a.ip, "sport": 40000, "dport": 80, "protocol": 6},
                         {"src": service.lab.scenario.node_ip, "dst": a.ip, "sport": 0, "dport": 80, "protocol": 6}]}
    request.update(override)
    return request


def event(trace_id: int, point: TracePoint = TracePoint.HOOK) -> TraceEvent:
    return TraceEvent(1, trace_id, 9, point, 75, Hook.FROM_CONTAINER, 6, 2, 11, "10.0.0.2", "10.0.0.1", 40000, 80,
                      (0, 60, 0, 0, 0))


def test_a_trace_keeps_its_own_events_and_returns_them_with_the_oracle(service: LabService) -> None:
    datapath: StandInDatapath = service.datapath  # type: ignore[assignment]
    reply, undo = service.handle(start_request(service))
    assert reply["ok"] and undo is None
    assert reply["oracle"]["outcome"] == "allowed"  # TWO_PODS_ALLOW_B: b may reach a on 80
    assert [(f.src, f.sport) for f in datapath.flows[41]] == [(service.lab.scenario.pods["x/b"].ip, 40000),
                                                              (service.lab.scenario.node_ip, 0)]
    datapath.pending = [event(41), event(99), event(41, TracePoint.RESULT)]
    service.poll()
    reply, _ = service.handle({"op": "trace-stop", "trace_id": 41})
    assert reply["ok"]
    assert [e["point"] for e in reply["events"]] == ["HOOK", "RESULT"]  # not trace 99's
    assert reply["oracle"]["outcome"] == "allowed"
    assert reply["names"]["interfaces"]["11"][1] in service.lab.scenario.pods
    assert datapath.flows == {}
    again, _ = service.handle({"op": "trace-stop", "trace_id": 41})
    assert not again["ok"] and "no active trace 41" in again["errors"][0]


@pytest.mark.parametrize(("override", "message"), [
    ({"trace_id": 0}, "trace_id"), ({"trace_id": "7"}, "trace_id"),
    ({"flows": []}, "flows"), ({"flows": [{"src": "10.0.0.1"}]}, "dst"),
    ({"flows": [{"src": "10.0.0.1", "dst": "bad", "sport": 1, "dport": 80, "protocol": 6}]}, "bad"),
    ({"flows": [{"src": "10.0.0.1", "dst": "10.0.0.2", "sport": 70000, "dport": 80, "protocol": 6}]}, "sport"),
    ({"flows": [{"src": "10.0.0.1", "dst": "10.0.0.2", "sport": 1, "dport": 80, "protocol": 99}]}, "protocol")])
def test_a_bad_trace_request_reaches_nothing(service: LabService, override: dict, message: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError), match=message):
        service.handle(start_request(service, **override))
    assert service.datapath.flows == {} and service.traces == {}  # type: ignore[attr-defined]


def test_an_unknown_pod_is_refused_by_name(service: LabService) -> None:
    reply, _ = service.handle(start_request(service, probe={"source": "x/nobody", "to": "a:80"}))
    assert not reply["ok"] and "x/nobody" in reply["errors"][0]
    assert service.datapath.flows == {}  # type: ignore[attr-defined]


def test_a_full_trace_map_is_refused_with_nothing_left(service: LabService) -> None:
    service.datapath.full = True  # type: ignore[attr-defined]
    reply, _ = service.handle(start_request(service))
    assert not reply["ok"] and "full" in reply["errors"][0]
    assert service.traces == {}


def test_a_trace_nobody_stops_is_dropped_with_its_flows(service: LabService, monkeypatch: pytest.MonkeyPatch) -> None:
    service.handle(start_request(service))
    now = service.traces[41].started
    monkeypatch.setattr(service_module.time, "monotonic", lambda: now + service_module.TRACE_LIFETIME + 1)
    service.poll()
    assert service.traces == {} and service.datapath.flows == {}  # type: ignore[attr-defined]


def test_closing_the_agent_stops_every_trace(service: LabService) -> None:
    service.handle(start_request(service, trace_id=5))
    service.handle(start_request(service, trace_id=6))
    assert set(service.datapath.flows) == {5, 6}  # type: ignore[attr-defined]
    service.close()
    assert service.datapath.flows == {} and service.traces == {}  # type: ignore[attr-defined]
