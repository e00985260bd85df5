"""Exercises: a scenario whose probes are the answer key and whose policies the learner writes.

An exercise is an ordinary scenario file (exercises/*.yaml). Its `policies:` names the policy
file the learner edits (`file:` entries; a starter that does not solve it yet is shipped);
policies written inline in the exercise are part of the task and stay whatever the learner
writes. `load_exercise(path, policy_file)` swaps the `file:` policies for another file (what
`l7lab check --policy` does), and `grade(report, engine)` turns a run of it into a verdict:
solved, or not yet with, for each probe that missed, a hint (from the kernel's trace of the
probe when there is one) and the oracle's reason in one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import limits
from .errors import SourceError, SourceLocation
from .scenario import PolicySource, Scenario, load_scenario
from .yamlsource import Budget, load_file

if TYPE_CHECKING:
    from .policy.engine import Decision, PolicyEngine
    from .runner import ProbeResult, RunReport


def load_exercise(path: str | Path, policy_file: str | Path | None = None) -> Scenario:
    """The exercise at `path`; with `policy_file`, the policies it loads from its own policy
    files are replaced by that file's (its inline policies stay: they belong to the task)."""
    scenario = load_scenario(path)
    if policy_file is None:
        return scenario
    docs = load_file(policy_file, Budget(what="the policy file of an exercise"))
    if len(docs) > limits.MAX_POLICIES:
        raise SourceError(SourceLocation(str(policy_file)),
                          f"{len(docs)} policies, more than the limit of {limits.MAX_POLICIES} for one scenario")
    inline = tuple(p for p in scenario.policies if p.document.source == scenario.path)
    return replace(scenario, policies=inline + tuple(PolicySource(d) for d in docs))


@dataclass
class Miss:
    """A probe of the answer key that the learner's policies do not meet yet."""

    result: ProbeResult
    hint: str  # from the kernel's trace of the probe; the oracle's reason when there is no trace
    reason: str  # the oracle's reason, one sentence

    def to_json(self) -> dict[str, Any]:
        return {**self.result.to_json(), "hint": self.hint, "reason": self.reason}


@dataclass
class Grade:
    exercise: str
    mode: str
    probes: int
    misses: list[Miss]

    @property
    def solved(self) -> bool:
        return not self.misses

    def to_json(self) -> dict[str, Any]:
        return {"exercise": self.exercise, "mode": self.mode, "solved": self.solved, "probes": self.probes,
                "missed": len(self.misses), "misses": [m.to_json() for m in self.misses]}


def grade(report: RunReport, engine: PolicyEngine) -> Grade:
    """Solved when every probe met its expectation. `report` must come from an explained run
    (`run_scenario(..., explain=True)`) so that each missed probe carries its reasoning."""
    misses = []
    for r in report.results:
        if r.passed:
            continue
        reason = oracle_reason(r.reasoning, r.probe.expect, engine) if r.reasoning is not None else ""
        if r.trace is not None:
            hint = r.trace.hint()
        elif r.trace_error:
            hint = f"{reason} (no kernel trace: {r.trace_error})"
        else:
            hint = reason
        misses.append(Miss(r, hint, reason))
    return Grade(report.scenario, report.mode, len(report.results), misses)


# ------------------------------------------------------------------------------------------
# The oracle's reason in one sentence, for a learner: what decided the flow, and where.

_DROPS = ("NONE (default deny)", "DENY")


def _rules(engine: PolicyEngine, rule_ids: list[int] | tuple[int, ...]) -> str:
    names = []
    for rule_id in rule_ids:
        ref = engine.resolution.rule_refs.get(rule_id)
        if ref is None:
            continue
        name = ref.policy.display + (f" {ref.rule.path}" if ref.rule is not None else "")
        if name not in names:
            names.append(name)
    return ", ".join(names)


def _endpoint(engine: PolicyEngine, decision: Decision, direction: str) -> str | None:
    """The pod whose `direction` lookup judged the flow: the source for egress, the destination
    for ingress."""
    sc, flow = engine.scenario, decision.flow
    if direction == "egress":
        return sc.pod_key(flow.source)
    return next((k for k, p in sc.pods.items() if p.ip == flow.destination_ip), None)


def _isolating(engine: PolicyEngine, pod: str, direction: str) -> str:
    from .abi import Direction  # noqa: PLC0415

    selecting = engine.resolution.selected_by.get((engine.endpoint_id(pod), Direction[direction.upper()]), [])
    return ", ".join(sorted({p.display for p, _ in selecting}))


def oracle_reason(decision: Decision, expected: str, engine: PolicyEngine) -> str:
    """Why the oracle gives `decision.outcome` where `expected` was asked for, in one sentence
    that names the lookup and the policies behind it."""
    d, outcome = decision, decision.outcome
    if outcome == "dropped":
        direction = "ingress" if d.ingress in _DROPS else "egress" if d.egress in _DROPS else None
        if direction is None:  # dropped by the DNS proxy: not a DNS query
            return "dropped by the DNS proxy: the port's traffic is redirected to it and it is not a DNS query"
        pod = _endpoint(engine, d, direction) or "the endpoint"
        if getattr(d, direction) == "DENY":
            return (f"dropped at the {direction} of {pod} by an explicit deny ({_rules(engine, d.rule_ids)}), "
                    "which wins over every allow")
        return (f"dropped at the {direction} of {pod}: {_isolating(engine, pod, direction) or 'a policy'} "
                f"isolates it in that direction and no rule allows this peer and port (default deny)")
    if outcome in ("denied", "refused") and d.l7 is not None:
        answer = "403 Access denied" if outcome == "denied" else "REFUSED"
        return f"the L7 proxy answers {answer}: {d.l7.why}"
    if outcome == "refused":
        return "the policy lets it through, but nothing listens on that port"
    # allowed
    if d.l7 is not None and expected in ("denied", "refused"):
        return f"the L7 rules let it through: {d.l7.why}"
    allowed_by = _rules(engine, d.rule_ids)
    if expected in ("denied", "refused"):
        return (f"allowed at L3/L4 by {allowed_by or 'no policy (nothing isolates either side)'} with no L7 rule: "
                "the request never reaches the L7 proxy, so no HTTP or DNS rule can refuse it")
    if d.audited:
        return "would have been dropped, but the endpoint is in audit mode: the drop is only reported"
    if allowed_by:
        return f"allowed by {allowed_by}"
    open_sides = [s for s in ("egress", "ingress") if getattr(d, s) in ("not enforced", "n/a")]
    return f"allowed: no policy isolates the {' or the '.join(open_sides) or 'flow'} side, so nothing drops it"


__all__ = ["Grade", "Miss", "grade", "load_exercise", "oracle_reason"]
