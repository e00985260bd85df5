"""Audit mode per endpoint: `audit: true` on a pod or a namespace, and audit steps, are resolved
into EndpointState.audit (the datapath's per-endpoint flag), and the oracle predicts `audited`
for a would-be L3/L4 drop of such an endpoint that passes."""

from __future__ import annotations

from dataplane.policy import Flow, PolicyEngine
from dataplane.scenario import AuditChange, Step
from tests.support.policy import DENY_ALL_INGRESS_X, NETPOL_TOPOLOGY, engine


def with_audit(pod: str = "", namespace: str = "") -> PolicyEngine:
    """The netpol topology with `audit: true` on pod x/<pod> or on namespace <namespace>."""
    topology = NETPOL_TOPOLOGY
    if pod:
        topology = topology.replace(f"{{name: {pod}, namespace: x, labels: {{pod: {pod}}}, ",
                                    f"{{name: {pod}, namespace: x, audit: true, labels: {{pod: {pod}}}, ")
    if namespace:
        topology = topology.replace(f"{{name: {namespace}, labels: {{ns: {namespace}}}}}",
                                    f"{{name: {namespace}, audit: true, labels: {{ns: {namespace}}}}}")
    assert topology != NETPOL_TOPOLOGY
    return engine(DENY_ALL_INGRESS_X, topology=topology)


def judge(eng: PolicyEngine, src: str, dst: str):  # noqa: ANN201 - a Decision
    return eng.verdict(Flow(src, eng.scenario.pods[dst].ip, "TCP", 80))


def audited(eng: PolicyEngine) -> set[str]:
    return {ep.name for ep in eng.map_state().endpoints.values() if ep.audit}


def test_a_pods_audit_reaches_its_endpoint_state_only() -> None:
    eng = with_audit(pod="a")
    assert audited(eng) == {"x/a"}
    d = judge(eng, "y/a", "x/a")
    assert (d.outcome, d.audited, d.expectation) == ("allowed", True, "audited")
    assert any("AUDIT" in line for line in d.trace)
    other = judge(eng, "y/a", "x/b")  # same default deny, not in audit mode
    assert (other.outcome, other.audited, other.expectation) == ("dropped", False, "dropped")


def test_a_namespaces_audit_reaches_every_pod_in_it() -> None:
    eng = with_audit(namespace="x")
    assert audited(eng) == {"x/a", "x/b", "x/c"}
    assert judge(eng, "y/a", "x/c").expectation == "audited"


def test_a_flow_no_policy_drops_is_allowed_not_audited() -> None:
    eng = with_audit(namespace="y")  # y is in audit mode but enforces nothing: nothing to audit
    d = judge(eng, "x/a", "y/b")
    assert (d.outcome, d.audited, d.expectation) == ("allowed", False, "allowed")


def test_settings_audit_puts_every_endpoint_in_audit_mode() -> None:
    eng = engine(DENY_ALL_INGRESS_X, settings="audit: true\n")
    assert audited(eng) == set(eng.scenario.pods)
    assert judge(eng, "y/a", "x/a").expectation == "audited"


def test_audit_steps_switch_endpoints_all_or_nothing() -> None:
    eng = engine(DENY_ALL_INGRESS_X, settings="audit: true\n")
    eng.apply_step(Step(0, "enforce x/a", audit=(AuditChange("pod", "x/a", False),)))
    assert audited(eng) == set(eng.scenario.pods) - {"x/a"}
    assert judge(eng, "y/a", "x/a").expectation == "dropped"
    assert judge(eng, "y/a", "x/b").expectation == "audited"
    eng.apply_step(Step(1, "enforce all", audit=(AuditChange("all", "", False),)))
    assert audited(eng) == set()
    eng.apply_step(Step(2, "audit x, then not x/c", audit=(AuditChange("namespace", "x", True),
                                                            AuditChange("pod", "x/c", False))))
    assert audited(eng) == {"x/a", "x/b"}  # in order: the later change of x/c wins
    before = eng.snapshot()
    proposal = eng.propose(Step(3, "all", audit=(AuditChange("all", "", True),)))
    assert {ep.name for ep in proposal.map_state.endpoints.values() if ep.audit} == set(eng.scenario.pods)
    assert eng.snapshot() is before and audited(eng) == {"x/a", "x/b"}  # proposed, not in force
