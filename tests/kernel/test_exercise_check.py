"""`l7lab check` on the kernel: an exercise's starter policy is "not yet", and each probe it
misses carries a hint taken from the kernel's trace of that probe (not the oracle's reason); the
shipped solution is "solved" by real traffic."""

from __future__ import annotations

import pytest

from dataplane import lab as labmod
from dataplane.exercise import grade, load_exercise
from dataplane.policy import PolicyEngine
from dataplane.runner import KernelExecutor, run_scenario
from tests.conftest import REPO, unique_lab

EXERCISE = REPO / "exercises" / "payment-post-only.yaml"


def check_on_the_kernel(datapath, policy_file=None):  # noqa: ANN001, ANN201
    scenario = load_exercise(EXERCISE, policy_file)
    engine = PolicyEngine(scenario)
    with labmod.Lab(scenario, unique_lab("bex"), datapath=datapath, policy=engine) as lab:
        report = run_scenario(scenario, KernelExecutor(lab, engine), lab.name, explain=True)
    return report, grade(report, engine)


def test_the_starter_is_not_yet_and_each_miss_has_a_hint_from_the_kernel_trace(datapath) -> None:  # noqa: ANN001
    report, result = check_on_the_kernel(datapath)
    assert not result.solved and result.misses
    for miss in result.misses:
        r = miss.result
        assert r.trace is not None, r.trace_error  # the probe was traced again on the kernel
        assert miss.hint == r.trace.hint() and miss.reason  # the kernel's hint, the oracle's reason beside it
        assert r.trace.outcome == r.observed.outcome  # the trace saw what the probe saw
    # The starter allows every request from frontend-app: a request the task denies goes
    # through the kernel without the proxy, and the hint says where it was let through.
    let_through = next(m for m in result.misses if m.result.probe.request_text.startswith(("GET", "DELETE")))
    assert let_through.result.observed.outcome == "allowed"
    assert let_through.result.trace.kernel["verdict"] in ("FORWARD", "ALLOW"), let_through.result.trace.kernel
    assert let_through.result.trace.proxy is None


def test_the_solution_is_solved_by_real_traffic(datapath) -> None:  # noqa: ANN001
    report, result = check_on_the_kernel(datapath, REPO / "exercises" / "solutions" / "payment-post-only.yaml")
    assert result.solved, [(m.result.probe.request_text, m.hint) for m in result.misses]
    assert report.mode == "kernel" and result.probes >= 5
    assert {r.observed.outcome for r in report.results} >= {"allowed", "denied", "dropped"}
