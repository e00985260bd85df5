"""DNS as the L7 rules see it: FQDN rule types, name validation and normalization, matching,
the decision for one question against one rule set, and the DNS part of a flow record.

Both the policy oracle and the proxy's DNS side judge a question with `judge` below; the FQDN
peers of policies (`toFQDNs`) use `fqdn_matches` too.

Matching follows Cilium's own matcher, cilium/cilium:
- pkg/fqdn/matchpattern/matchpattern.go (`Sanitize`, `ToAnchoredRegexp`, `isDNSWildcard`,
  `escapeRegexpCharacters`, `allowedDNSCharsREGroup` = `[-a-zA-Z0-9_]`, `dnsWildcardREGroup`),
  and its tests matchpattern_test.go;
- pkg/policy/api/fqdn.go (`FQDNSelector.ToRegex`: toFQDNs; CRD validation patterns);
- pkg/fqdn/dnsproxy/proxy.go (`GeneratePattern`, `CheckAllowed`: rules.dns in the DNS proxy).

Names and patterns are compared in Cilium's form: lower case with the final dot (a name
without one gets it, the root is "."). `matchName` is an exact name. In `matchPattern`:
- `*` (a run of stars counts as one) matches any run, possibly empty, of `[-a-zA-Z0-9_]`: it
  never crosses a dot. `*.example.com` matches `api.example.com`, not `example.com` nor
  `a.b.example.com`; as in Cilium it also matches `.example.com` (an empty first label, which
  no DNS message can carry).
- A prefix of two or more stars and a dot (`**.`) matches one or more whole labels:
  `**.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`. Stars
  anywhere else are a plain `*` (`a**b` is `a*b`, `foo.**.com` is `foo.*.com`), as Cilium
  reads them; Cilium's validation accepts them.
- A pattern of stars only, with or without one final dot (`*`, `*.`, `**`, `**.`), matches
  every name. Precisely: in `toFQDNs` (`ToAnchoredRegexp`) every name of non-empty labels of
  `[-a-zA-Z0-9_]`, and the root; in `rules.dns` (the DNS proxy short-cuts to its match-all
  regex) every name at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import re2

from .protocol import L7Protocol, RuleSetView, SetVerdict
from .regex import OPTIONS, compile_regex

# Characters of a DNS label in Cilium's matchpattern (allowedDNSCharsREGroup).
_DNS_LABEL_CHARS = "[-a-zA-Z0-9_]"
# dnsWildcardREGroup: what a leading "**." becomes, one or more whole labels, each with its dot.
_DNS_LABELS_RE = "(" + _DNS_LABEL_CHARS + "+" + "([.]" + _DNS_LABEL_CHARS + "+){0,})[.]"
# What a match-all pattern becomes in ToAnchoredRegexp (toFQDNs): names of non-empty labels, or the root.
_MATCH_ALL_NAMES_RE = "(^(" + _DNS_LABEL_CHARS + "+[.])+$)|(^[.]$)"
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
    """A name as rules report it: lower case, no trailing dot."""
    return name.lower().rstrip(".")


def fqdn_form(name: str) -> str:
    """A name as Cilium matches it (dns.FQDN, then lower case): with one final dot added when it
    has none; "" is the root "."."""
    name = name.lower()
    return name if name.endswith(".") else name + "."


def validate_dns_name(name: str) -> None:
    if not name or not _DNS_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid DNS name {name!r}")


def validate_dns_pattern(pattern: str) -> None:
    """matchpattern.Validate: at most 255 characters, only letters, digits, '-', '_', '.', '*'.
    Every such pattern compiles, `**` included (see the module docstring for what it means)."""
    if not pattern or not _DNS_PATTERN_RE.fullmatch(pattern):
        raise ValueError(f"invalid DNS pattern {pattern!r}: allowed are letters, digits, '-', '_', '.' and '*' "
                         "('*' matches within one label, a leading '**.' one or more labels)")
    if len(pattern.strip()) > 255:
        raise ValueError(f"invalid DNS pattern {pattern!r}: at most 255 characters")


def is_match_all_pattern(pattern: str) -> bool:
    """isDNSWildcard: stars only, with or without one final dot ("*", "*.", "**", "***."),
    after ToAnchoredRegexp's trimming of spaces."""
    pattern = pattern.strip()
    if pattern.endswith("."):
        pattern = pattern[:-1]
    return bool(pattern) and pattern.strip("*") == ""


def pattern_to_regex(pattern: str) -> str:
    """matchpattern.ToAnchoredRegexp(matchpattern.Sanitize(pattern)), anchors included: the RE2
    regex a `matchPattern` becomes, to match against `fqdn_form` names."""
    pattern = pattern.strip().lower()
    if is_match_all_pattern(pattern):
        return _MATCH_ALL_NAMES_RE
    if not pattern.endswith("."):
        pattern += "."  # Sanitize (dns.FQDN)
    out: list[str] = []
    i = len(pattern) - len(pattern.lstrip("*"))
    if i >= 2 and pattern[i:i + 1] == ".":
        out.append(_DNS_LABELS_RE)  # the "**." prefix: one or more whole labels
        i += 1
    else:
        i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == ".":
            out.append("[.]")
        elif c == "*":
            while i + 1 < len(pattern) and pattern[i + 1] == "*":
                i += 1  # a run of stars is one star
            out.append(_DNS_LABEL_CHARS + "*")
        else:
            # A validated pattern has only [-a-z0-9_] here, which Cilium copies as is; escaping
            # keeps an unvalidated one literal too.
            out.append(c if c.isalnum() and c.isascii() or c in "-_" else re2.escape(c))
        i += 1
    return "^" + "".join(out) + "$"


def fqdn_matches(name: str, match_name: str = "", match_pattern: str = "", *, dns_proxy: bool = False) -> bool:
    """Whether `name` is selected by a matchName or matchPattern: as a `toFQDNs` selector
    (FQDNSelector.ToRegex), or with `dns_proxy` as a `rules.dns` rule in the DNS proxy
    (GeneratePattern / CheckAllowed), where a match-all pattern admits every name."""
    if match_name:
        return fqdn_form(name) == fqdn_form(match_name)
    if dns_proxy and is_match_all_pattern(match_pattern):
        return True
    return compile_regex(pattern_to_regex(match_pattern)).fullmatch(fqdn_form(name)) is not None


# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class DnsRule:
    match_name: str = ""
    match_pattern: str = ""

    def matches(self, name: str) -> bool:
        # A rules.dns entry: judged as Cilium's DNS proxy judges it.
        return fqdn_matches(name, self.match_name, self.match_pattern, dns_proxy=True)

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
