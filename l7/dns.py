"""DNS as the L7 rules see it: FQDN rule types, name validation and normalization, matching,
the decision for one question against one rule set, and the DNS part of a flow record.

Both the policy oracle and the proxy's DNS side judge a question with `judge` below; the FQDN
peers of policies (`toFQDNs`) use `fqdn_matches` too.

Matching (Cilium pkg/fqdn/matchpattern): names compare case-insensitively without a trailing
dot. `matchName` is an exact name. In `matchPattern`, `*` matches any run of characters allowed
in a DNS label (`[-a-zA-Z0-9_]*`), so it never crosses a dot: `*.example.com` matches
`api.example.com` but neither `example.com` nor `a.b.example.com`. A pattern of just `*`
matches every name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import re2

from .protocol import L7Protocol, RuleSetView, SetVerdict
from .regex import OPTIONS, compile_regex

# Characters of a DNS label in Cilium's matchpattern (allowedDNSCharsREGroup).
_DNS_LABEL_CHARS = "[-a-zA-Z0-9_]"
_DNS_NAME_RE = re2.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?)*\.?",
                           options=OPTIONS)
_DNS_PATTERN_RE = re2.compile(r"[-A-Za-z0-9_.*]+", options=OPTIONS)


@dataclass(frozen=True)
class DnsFlow:
    """What a flow record says about one DNS question and the answer it got."""

    query: str  # the name asked, lower case, without the trailing dot ("" if unparseable)
    qtypes: tuple[str, ...]  # question types, e.g. ("A",)
    rcode: int  # the RCODE of the answer sent to the client (0 NOERROR, 5 REFUSED); -1: none sent
    # The upstream answer relayed to the client (empty when the proxy answered itself or none
    # was sent): the addresses of its A/AAAA records, the smallest TTL of its answer records,
    # the CNAME targets (without the trailing dot) and the type of each answer record.
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    rrtypes: tuple[str, ...] = ()
    # The toFQDNs selectors the answer's addresses were learned for before it was released to the
    # client (e.g. "matchPattern *.example.com"); empty when nothing was learned.
    learned: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "qtypes": list(self.qtypes), "rcode": self.rcode, "ips": list(self.ips),
                "ttl": self.ttl, "cnames": list(self.cnames), "rrtypes": list(self.rrtypes),
                "learned": list(self.learned)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DnsFlow":
        return cls(str(data.get("query", "")), tuple(str(t) for t in data.get("qtypes", ())),
                   int(data.get("rcode", -1)), tuple(str(i) for i in data.get("ips") or ()), int(data.get("ttl") or 0),
                   tuple(str(c) for c in data.get("cnames") or ()), tuple(str(t) for t in data.get("rrtypes") or ()),
                   tuple(str(s) for s in data.get("learned") or ()))


# ---------------------------------------------------------------------------- names and patterns


def normalize_dns_name(name: str) -> str:
    """A name as rules compare it: lower case, no trailing dot."""
    return name.lower().rstrip(".")


def validate_dns_name(name: str) -> None:
    if not name or not _DNS_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid DNS name {name!r}")


def validate_dns_pattern(pattern: str) -> None:
    if not pattern or not _DNS_PATTERN_RE.fullmatch(pattern):
        raise ValueError(f"invalid DNS pattern {pattern!r}: allowed are letters, digits, '-', '_', '.' and '*'")
    if "**" in pattern:
        raise ValueError(f"invalid DNS pattern {pattern!r}: '**' is not supported; '*' matches within one DNS label")


def pattern_to_regex(pattern: str) -> str:
    """Cilium matchpattern.ToAnchoredRegexp, minus the anchors (we full-match)."""
    pattern = normalize_dns_name(pattern)
    if pattern == "*":
        return "[-a-zA-Z0-9_.]*"  # a lone "*" matches every name
    return r"\.".join(re2.escape(part).replace(r"\*", _DNS_LABEL_CHARS + "*") for part in pattern.split("."))


def fqdn_matches(name: str, match_name: str = "", match_pattern: str = "") -> bool:
    name = normalize_dns_name(name)
    if match_name:
        return name == normalize_dns_name(match_name)
    return bool(compile_regex(pattern_to_regex(match_pattern)).fullmatch(name))


# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class DnsRule:
    match_name: str = ""
    match_pattern: str = ""

    def matches(self, name: str) -> bool:
        return fqdn_matches(name, self.match_name, self.match_pattern)

    def __str__(self) -> str:
        return f"matchName {self.match_name}" if self.match_name else f"matchPattern {self.match_pattern}"

    def to_json(self) -> dict:
        return {"match_name": self.match_name, "match_pattern": self.match_pattern}

    @classmethod
    def from_json(cls, data: dict) -> "DnsRule":
        return cls(data.get("match_name", ""), data.get("match_pattern", ""))


# ---------------------------------------------------------------------------- the decision


def judge(rule_set: RuleSetView, name: str) -> SetVerdict:
    """One DNS question for `name` against one rule set: allowed by an allow without L7 rules,
    or by the first matchName / matchPattern that matches."""
    rules = rule_set.rules_for(PROTOCOL.name)
    tried_ids = tuple(i for _, i in rules)
    if rule_set.allow_all:
        return SetVerdict(True, "an allow without L7 rules covers this peer and port: every query passes",
                          tuple(rule_set.allow_all_rule_ids), ())
    for rule, rule_id in rules:
        if rule.matches(name):
            return SetVerdict(True, f"matches DNS rule {rule}", (rule_id,), tried_ids)
    tried = "; ".join(str(r) for r, _ in rules) or "none"
    return SetVerdict(False, f"matches no DNS rule (tried: {tried})", (), tried_ids)


PROTOCOL = L7Protocol("dns", "DNS", ("UDP", "TCP"), "refused", DnsRule.from_json, judge, lambda name: f"DNS query {name}")
