"""The FQDN learner: an answer the proxy reports becomes policy before the reply (the engine's
verdict changes), expiry takes it back unless a connection is open, and the socket speaks the
proxy's protocol."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dataplane import lab as labmod
from dataplane.errors import SetupError
from dataplane.fqdn.learner import FqdnLearner, LearnerServer, ask, enforcer, socket_path
from dataplane.policy import Flow, PolicyEngine
from dataplane.safety import UnsafePathError
from dataplane.scenario import load_scenario
from tests.support.fqdn import FQDN_LAB
from tests.support.scenario_files import write_scenario

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(tmp_path: Path) -> PolicyEngine:
    return PolicyEngine(load_scenario(write_scenario(tmp_path, FQDN_LAB)))


def learn_request(name: str, address: str, ttl: int = 5, endpoint_ip: str = "") -> dict[str, Any]:
    return {"id": 3, "op": "learn", "endpoint_ip": endpoint_ip, "src_identity": 0, "server": "10.0.0.2:53",
            "qname": name, "qtype": "A", "rcode": 0,
            "records": [{"name": name, "type": "A", "ttl": ttl, "data": address}]}


def verdict(engine: PolicyEngine, address: str) -> str:
    return engine.verdict(Flow("shop/checkout", address, "TCP", 80)).outcome


def make_learner(engine: PolicyEngine, clock: Clock, open_flows: set[tuple[str, str]]) -> tuple[FqdnLearner, list]:
    written: list = []
    learner = FqdnLearner(engine, enforcer(engine, lambda old, new: written.append(new)), lambda: open_flows,
                          clock=clock)
    return learner, written


def test_an_answer_becomes_policy_before_the_reply_and_expires_with_its_ttl(engine: PolicyEngine) -> None:
    clock, open_flows = Clock(), set()
    learner, written = make_learner(engine, clock, open_flows)
    checkout_ip = engine.scenario.pods["shop/checkout"].ip
    assert verdict(engine, "203.0.113.20") == "dropped"  # no lookup yet: toFQDNs selects nothing
    reply = learner.handle(learn_request("api.example.com", "203.0.113.20", endpoint_ip=checkout_ip))
    assert reply == {"id": 3, "ok": True,
                     "learned": [{"selector": "FQDN matchPattern *.example.com", "ips": ["203.0.113.20"]}]}
    assert len(written) == 1 and verdict(engine, "203.0.113.20") == "allowed"
    decision = engine.verdict(Flow("shop/checkout", "203.0.113.20", "TCP", 80))
    assert any("learned from the DNS answer to api.example.com looked up by shop/checkout" in line
               for line in decision.trace)
    # A name no selector matches is cached but allows nothing.
    learner.handle(learn_request("www.example.org", "198.51.100.30", endpoint_ip=checkout_ip))
    assert verdict(engine, "198.51.100.30") == "dropped"

    clock.now += 4.9
    assert learner.tick() == [] and verdict(engine, "203.0.113.20") == "allowed"
    clock.now += 0.2
    open_flows.add((checkout_ip, "203.0.113.20"))  # a connection still open keeps it
    learner.tick()
    assert verdict(engine, "203.0.113.20") == "allowed"
    assert [r["zombie"] for r in learner.cache_rows() if r["name"] == "api.example.com"] == [True]
    open_flows.clear()
    removed = learner.tick()
    assert [e.name for e in removed] == ["api.example.com"]
    assert verdict(engine, "203.0.113.20") == "dropped"


def test_requests_the_learner_cannot_take_are_answered_not_raised(engine: PolicyEngine) -> None:
    learner, written = make_learner(engine, Clock(), set())
    assert learner.handle(learn_request("api.example.com", "203.0.113.20", endpoint_ip="10.9.9.9")) == {
        "id": 3, "ok": False, "error": "no pod of the lab has address '10.9.9.9'"}
    bad = learner.handle({"id": 4, "op": "learn", "endpoint_ip": engine.scenario.pods["shop/checkout"].ip,
                          "records": [{"name": "x"}] * 600})
    assert bad["ok"] is False and "at most 512 records" in bad["error"]
    assert learner.handle({"id": 5, "op": "forget"})["error"] == "unknown op 'forget' (expected learn or cache)"
    assert written == []


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The labs' directory, here: a lab's socket lives in its own directory under it."""
    monkeypatch.setattr(labmod, "RUN_DIR", os.path.realpath(tmp_path / "run"))
    labmod.lab_dir("learn").mkdir(parents=True)
    return labmod.run_dir()


def test_the_socket_serves_learn_and_cache(engine: PolicyEngine, run_dir: Path) -> None:
    learner, _ = make_learner(engine, Clock(), set())
    path = socket_path("learn")
    assert path == run_dir / "learn" / "fqdn.sock"
    path.write_text("")  # what a crash may leave: the next learner takes the place
    with LearnerServer(learner, "learn"):
        ip = engine.scenario.pods["shop/checkout"].ip
        assert ask(path, learn_request("api.example.com", "203.0.113.20", 30, ip))["ok"] is True
        rows = ask(path, {"op": "cache"})["cache"]
        assert [(r["endpoint"], r["name"], r["address"], r["ttl"], r["selectors"]) for r in rows] == [
            ("shop/checkout", "api.example.com", "203.0.113.20", 30, ["FQDN matchPattern *.example.com"])]
    assert not path.exists()


def test_a_link_in_the_sockets_place_is_refused_and_its_target_kept(engine: PolicyEngine, run_dir: Path,
                                                                      tmp_path: Path) -> None:
    learner, _ = make_learner(engine, Clock(), set())
    target = tmp_path / "precious"
    target.write_text("keep")
    socket_path("learn").symlink_to(target)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        LearnerServer(learner, "learn")
    assert target.read_text() == "keep"
    with pytest.raises(SetupError, match="invalid lab name"):
        socket_path("../etc")  # the lab name is checked before any path is made of it
