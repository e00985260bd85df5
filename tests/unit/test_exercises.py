"""The exercises and `l7lab check` on the oracle (no root): each exercise is not yet solved by its
starter and solved by its solution, the answer key catches the usual wrong answers, `--policy`
swaps the learner's file and keeps the task's own policies, and `run --explain` explains exactly
the probes that missed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.exercise import grade, load_exercise
from dataplane.policy import PolicyEngine
from dataplane.runner import OracleExecutor, run_scenario
from tests.conftest import REPO

L7LAB = [sys.executable, "-m", "dataplane.cli"]
EXERCISES = sorted((REPO / "exercises").glob("*.yaml"))


def l7lab(*args: str) -> subprocess.CompletedProcess[str]:
    # Wide enough that the explanation's columns do not fold the lines a test looks for.
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run([*L7LAB, *args], cwd=REPO, capture_output=True, text=True, env=env)


def dry_grade(exercise: Path, policy: Path | None = None):  # noqa: ANN201 - dataplane.exercise.Grade
    scenario = load_exercise(exercise, policy)
    engine = PolicyEngine(scenario)
    return grade(run_scenario(scenario, OracleExecutor(PolicyEngine(scenario)), explain=True), engine)


def solution(exercise: Path) -> Path:
    return REPO / "exercises" / "solutions" / exercise.name


def test_there_are_five_exercises_each_with_its_solution_and_its_task_in_the_docs() -> None:
    docs = (REPO / "docs" / "exercises.md").read_text()
    assert len(EXERCISES) == 5
    for exercise in EXERCISES:
        assert solution(exercise).is_file(), exercise
        assert f"(`exercises/{exercise.name}`)" in docs, exercise


@pytest.mark.parametrize("exercise", EXERCISES, ids=[p.stem for p in EXERCISES])
def test_the_starter_does_not_solve_it_and_every_miss_has_a_reason(exercise: Path) -> None:
    result = dry_grade(exercise)
    assert not result.solved and result.probes > len(result.misses) > 0
    for miss in result.misses:
        assert miss.result.probe.expect != miss.result.observed.outcome
        assert miss.reason and miss.hint == miss.reason  # no kernel: the hint is the oracle's reason
        assert miss.result.reasoning is not None and miss.result.reasoning.outcome == miss.result.observed.outcome


@pytest.mark.parametrize("exercise", EXERCISES, ids=[p.stem for p in EXERCISES])
def test_the_solution_solves_it(exercise: Path) -> None:
    result = dry_grade(exercise, solution(exercise))
    assert result.solved, [m.to_json() for m in result.misses]
    assert result.probes == sum(len(s.probes) for s in load_exercise(exercise).steps)


def test_the_starter_hints_point_where_the_flow_was_decided() -> None:
    ex = REPO / "exercises"
    drop = dry_grade(ex / "find-the-drop.yaml").misses[0].reason
    assert "egress of retail/reporting" in drop and "NetworkPolicy retail/batch-egress" in drop
    l34 = dry_grade(ex / "payment-post-only.yaml").misses[0].reason
    assert "retail/payments" in l34 and "no L7 rule" in l34
    dns = dry_grade(ex / "dns-partner-only.yaml").misses
    assert any("matchPattern *" in m.reason for m in dns)
    assert any("egress of shop/mediabot" in m.reason for m in dns)
    union = dry_grade(ex / "deny-reporting.yaml").misses[0].reason
    assert "retail-internal" in union


OR_INSTEAD_OF_AND = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: production-ingress, namespace: production}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector: {}
        - podSelector: {matchLabels: {app: webapp, role: frontend}}
"""
OWN_NAMESPACE_ONLY = OR_INSTEAD_OF_AND.replace("        - namespaceSelector: {}\n", "")


@pytest.mark.parametrize("wrong", [OR_INSTEAD_OF_AND, OWN_NAMESPACE_ONLY], ids=["or", "own-namespace"])
def test_the_answer_key_catches_the_selector_pitfalls(tmp_path: Path, wrong: str) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(wrong)
    result = dry_grade(REPO / "exercises" / "production-frontends.yaml", mine)
    assert not result.solved


def test_policy_replaces_the_learners_file_and_keeps_the_inline_policies() -> None:
    exercise = REPO / "exercises" / "deny-reporting.yaml"
    names = [p.data["metadata"]["name"] for p in load_exercise(exercise, solution(exercise)).policies]
    assert names == ["retail-internal", "inventory-no-reporting"]
    sources = {p.document.source for p in load_exercise(exercise, solution(exercise)).policies}
    assert str(solution(exercise)) in sources and not any("exercises/policies" in s for s in sources)


def test_check_cli_exit_codes_and_json() -> None:
    exercise = str(REPO / "exercises" / "payment-post-only.yaml")
    solved = l7lab("check", "--dry-run", exercise, "--policy", str(solution(Path(exercise))))
    assert solved.returncode == 0, solved.stderr
    assert "solved" in solved.stdout and "not yet" not in solved.stdout
    out = l7lab("check", "--dry-run", "--json", exercise)
    assert out.returncode == 3, out.stderr
    doc = json.loads(out.stdout)
    assert doc["solved"] is False and doc["missed"] == len(doc["misses"]) == 3
    for miss in doc["misses"]:
        assert miss["expected"] == "denied" and miss["observed"] == "allowed"
        assert miss["hint"] and miss["explain"]["oracle"]["outcome"] == "allowed"
    text = l7lab("check", "--dry-run", exercise)
    assert text.returncode == 3 and "not yet: 3 of 7" in text.stdout and text.stdout.count("hint: ") == 3


def test_check_names_a_bad_policy_file_and_applies_nothing(tmp_path: Path) -> None:
    exercise = str(REPO / "exercises" / "payment-post-only.yaml")
    missing = l7lab("check", "--dry-run", exercise, "--policy", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "nope.yaml" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: retail}\n"
                   "spec:\n  endpointSelector: {matchLabels: {app: payment-gateway}}\n  ingress:\n"
                   "    - toPorts: [{ports: [{port: \"80\", protocol: XTP}]}]\n")
    out = l7lab("check", "--dry-run", exercise, "--policy", str(bad))
    assert out.returncode == 1 and f"{bad}:7:" in out.stderr and "protocol" in out.stderr
    assert out.stdout == ""
    name = l7lab("check", "--dry-run", exercise, "--name", "../x")
    assert name.returncode == 1 and "../x" in name.stderr


def test_run_explain_dry_run_explains_only_the_probes_that_missed(tmp_path: Path) -> None:
    src = (REPO / "scenarios" / "retail.yaml").read_text()
    wrong = "{method: DELETE, path: /api/inventory/item123}, expect: denied"
    assert wrong in src
    bad = tmp_path / "retail.yaml"
    bad.write_text(src.replace(wrong, wrong.replace("denied", "allowed")))
    (tmp_path / "policies").symlink_to(REPO / "scenarios" / "policies")
    out = l7lab("run", "--dry-run", "--explain", "--json", str(bad))
    assert out.returncode == 3, out.stderr
    results = json.loads(out.stdout)["results"]
    missed = [r for r in results if not r["passed"]]
    assert len(missed) == 1 and all("explain" not in r for r in results if r["passed"])
    oracle = missed[0]["explain"]["oracle"]
    assert oracle["outcome"] == "denied" and missed[0]["explain"]["trace"] is None
    assert any("matches no HTTP rule" in line for line in oracle["trace"])
    text = l7lab("run", "--dry-run", "--explain", str(bad))
    assert text.returncode == 3
    assert "expected allowed, observed denied" in text.stdout and "oracle (the policy's reasoning)" in text.stdout
    assert "DELETE /api/inventory/item123 matches no HTTP rule" in text.stdout
    assert text.stdout.count("verdict: ") == 1  # the passing probes are not explained
    plain = l7lab("run", "--dry-run", str(bad))
    assert "verdict: " not in plain.stdout  # without --explain, the table alone
