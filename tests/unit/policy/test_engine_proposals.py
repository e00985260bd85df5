"""The policy engine's change interface: a proposal is resolved but not in force until it is
committed, a stale proposal is refused, and a snapshot taken before a commit restores the state
(verdicts, policies, labels) exactly. This is what the lab agent's rollback relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.errors import ErrorList, SourceError
from dataplane.policy.engine import Flow, PolicyEngine
from dataplane.scenario import parse_scenario
from dataplane.yamlsource import load_documents
from tests.support.policy import TWO_PODS_ALLOW_B

SCENARIO = "name: proposals\n" + TWO_PODS_ALLOW_B + """\
steps:
  - name: relabel b
    relabel:
      - {pod: x/b, set: {app: c}}
  - name: delete
    delete:
      - {kind: NetworkPolicy, name: allow-b, namespace: x}
  - name: delete what is not there
    delete:
      - {kind: NetworkPolicy, name: nothing, namespace: x}
"""


@pytest.fixture
def engine() -> PolicyEngine:
    (doc,) = load_documents(SCENARIO, "proposals.yaml")
    return PolicyEngine(parse_scenario(doc, Path("proposals.yaml")))


def b_to_a(engine: PolicyEngine) -> str:
    return engine.verdict(Flow("x/b", engine.scenario.pods["x/a"].ip, "TCP", 80)).outcome


def test_a_proposal_changes_nothing_until_committed(engine: PolicyEngine) -> None:
    relabel = engine.scenario.steps[0]
    state_before = engine.map_state()
    proposal = engine.propose(relabel)
    assert b_to_a(engine) == "allowed"  # not in force
    assert engine.pod_labels["x/b"] == {"app": "b"} and engine.map_state() is state_before
    assert proposal.after.pod_labels["x/b"] == {"app": "c"}
    assert proposal.map_state != state_before  # b's identity changed: the maps would change
    engine.commit(proposal)
    assert b_to_a(engine) == "dropped"
    assert engine.map_state() is proposal.map_state


def test_a_stale_proposal_is_refused(engine: PolicyEngine) -> None:
    relabel, delete = engine.scenario.steps[:2]
    first, second = engine.propose(relabel), engine.propose(delete)
    engine.commit(first)
    with pytest.raises(ValueError, match="stale proposal"):
        engine.commit(second)  # it would silently drop the relabel
    assert engine.pod_labels["x/b"] == {"app": "c"} and len(engine.policies) == 1


def test_restore_undoes_a_commit(engine: PolicyEngine) -> None:
    snapshot = engine.snapshot()
    engine.apply_step(engine.scenario.steps[0])
    engine.apply_step(engine.scenario.steps[1])
    assert not engine.policies and b_to_a(engine) == "allowed"  # no policy: nothing isolates a
    engine.restore(snapshot)
    assert list(engine.policies) == [("NetworkPolicy", "x", "allow-b")]
    assert engine.pod_labels["x/b"] == {"app": "b"}
    assert engine.map_state() is snapshot.resolution.state
    engine.apply_step(engine.scenario.steps[0])  # the engine goes on from the restored state
    assert b_to_a(engine) == "dropped"


def test_a_wrong_step_raises_and_leaves_the_engine_as_it_was(engine: PolicyEngine) -> None:
    snapshot = engine.snapshot()
    with pytest.raises((SourceError, ErrorList), match="cannot delete NetworkPolicy x/nothing"):
        engine.propose(engine.scenario.steps[2])
    with pytest.raises((SourceError, ErrorList)):
        engine.apply_step(engine.scenario.steps[2])
    assert engine.snapshot() is snapshot
