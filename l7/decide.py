"""The L7 verdict for one request, once, for the oracle and the proxy alike.

A connection may meet several L7 rule sets: the source endpoint's egress set and the destination
endpoint's ingress set, each where the L3/L4 lookup of that direction says REDIRECT. `decide`
runs one request of one protocol through all of them:

  * a refusal found before any rule is looked at (the flow is dropped at L3/L4 in some
    direction, or no redirect applies) refuses every request, with that reason;
  * every applicable set must allow; the first that refuses decides, and the refusal names the
    policies of the rules that set tried;
  * a set that is missing (REDIRECT without an L7 set for this peer and port) refuses;
  * each set is judged by the protocol's own `judge` (`l7.http.judge`, `l7.dns.judge`);
  * an allowed request carries the ids of the rules that allowed it, in order, each once, and
    their policies.

`steps` keeps each set's answer, so the oracle can write its trace from the same decision the
proxy acts on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .protocol import SetVerdict, for_transport
from .protocol import protocol as protocol_named
from .ruleset import L7RuleSet

NO_RULE_SET = "no L7 rule set for this peer and port"


@dataclass(frozen=True)
class AppliedSet:
    """One L7 rule set a request must pass, and where it comes from: the `direction`
    ("ingress" | "egress") of `endpoint` ("ns/pod") whose L3/L4 lookup said REDIRECT."""

    direction: str
    endpoint: str
    rules: L7RuleSet | None  # None: REDIRECT without an L7 set: every request refused

    @classmethod
    def of(cls, direction: str, endpoint: str, rules: L7RuleSet | None) -> "AppliedSet":
        """The set of `endpoint`'s `direction` (any case: "INGRESS" | "egress")."""
        return cls(direction.lower(), endpoint, rules)

    @property
    def where(self) -> str:
        """How both sides name the set in verdicts and traces: "L7 egress of ns/pod"."""
        return f"L7 {self.direction} of {self.endpoint}"


@dataclass(frozen=True)
class SetStep:
    """How one applied set answered (`verdict` None: the set is missing)."""

    applied: AppliedSet
    verdict: SetVerdict | None


@dataclass(frozen=True)
class L7Verdict:
    allowed: bool
    why: str
    rule_ids: tuple[int, ...] = ()  # the rules that allowed it
    policies: tuple[str, ...] = ()  # allowed: the policies of rule_ids; denied: the policies it failed
    steps: tuple[SetStep, ...] = ()  # the sets judged, in order, up to the first refusal


def decide(protocol: str, request: Any, sets: Sequence[AppliedSet], policy_of: Callable[[int], str],
           refusal: str = "") -> L7Verdict:
    """The verdict for one `request` of `protocol` ("http", "dns") against the applicable sets.
    `request` is what that protocol's `judge` takes (`l7.http.HttpRequestView`, a DNS name);
    `policy_of(rule id)` names the policy a rule belongs to."""
    if refusal:
        return L7Verdict(False, refusal)
    judge = protocol_named(protocol).judge
    ids: list[int] = []
    whys: list[str] = []
    steps: list[SetStep] = []
    for applied in sets:
        if applied.rules is None:
            steps.append(SetStep(applied, None))
            return L7Verdict(False, f"{applied.where}: {NO_RULE_SET}", (), (), tuple(steps))
        verdict = judge(applied.rules, request)
        steps.append(SetStep(applied, verdict))
        whys.append(f"{applied.where}: {verdict.why}")
        if not verdict.allowed:
            failed = sorted({policy_of(i) for i in verdict.tried})
            return L7Verdict(False, whys[-1], (), tuple(failed), tuple(steps))
        ids.extend(i for i in verdict.rule_ids if i not in ids)
    return L7Verdict(True, "; ".join(whys), tuple(ids), tuple(sorted({policy_of(i) for i in ids})), tuple(steps))


def protocol_for(sets: Sequence[AppliedSet], transport: str) -> str:
    """The L7 protocol a flow's requests are judged as: among the protocols received on
    `transport` ("TCP" | "UDP"), the first whose rules an applicable set holds (DNS rules make a
    TCP flow DNS over TCP); else the protocol at home on that transport (HTTP on TCP, DNS on
    UDP). "" when none is."""
    candidates = for_transport(transport)
    for applied in sets:
        if applied.rules is None:
            continue
        for proto in candidates:
            if applied.rules.rules.get(proto.name):
                return proto.name
    return candidates[0].name if candidates else ""
