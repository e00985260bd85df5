"""The protocol-neutral rule containers: what the resolver computes and the proxy looks up.

`L7RuleSet` is the merged rule set of one (remote identity, port) of an endpoint and direction:
the rules of each protocol, kept by protocol name (`rules["http"]`, `rules["dns"]`), each with
the id of the policy rule it came from. `allow_all` is set when some allow for that peer and
port carries no L7 rule (an L4-only allow merged with L7 rules lets every request through).

`L7Policy` is the value of `MapState.l7[(endpoint id, direction, proxy port)]`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import http as _http
from .protocol import protocols

Rules = list[tuple[Any, int]]  # (rule, rule id)


class L7RuleSet:
    """Merged L7 rules for one remote identity and port (see module docstring)."""

    def __init__(self, allow_all: bool = False, http: Rules | None = None, dns: Rules | None = None,
                 allow_all_rule_ids: list[int] | None = None, *, rules: Mapping[str, Rules] | None = None) -> None:
        self.allow_all = allow_all
        self.allow_all_rule_ids: list[int] = list(allow_all_rule_ids or [])
        self.rules: dict[str, Rules] = {name: list(r) for name, r in (rules or {}).items()}
        # The positional http/dns lists are the two protocols every caller knew before the
        # registry; any protocol can be given through `rules`.
        for name, given in (("http", http), ("dns", dns)):
            if given:
                self.rules.setdefault(name, []).extend(given)

    def rules_for(self, protocol: str) -> Rules:
        """The (rule, rule id) list of one protocol (empty if it has none). Reading never changes
        the set: the proxy's snapshot is shared by every request."""
        return self.rules.get(protocol, [])

    def protocols_with_rules(self) -> list[str]:
        return [name for name, rules in self.rules.items() if rules]

    def add(self, protocol: str, rules: Iterable[Any], rule_id: int) -> None:
        """Merge one policy rule's L7 rules of `protocol` (each kept once per rule id)."""
        mine = self.rules.setdefault(protocol, [])
        for rule in rules:
            if (rule, rule_id) not in mine:
                mine.append((rule, rule_id))

    @property
    def http(self) -> Rules:
        return self.rules_for("http")

    @property
    def dns(self) -> Rules:
        return self.rules_for("dns")

    def match_http(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[bool, str, tuple[int, ...]]:
        """(allowed, why, rule ids) of the set's HTTP rules for one request (`l7.http.match`)."""
        allowed, why, ids, _ = _http.match(self, _http.HttpRequestView(method, path, headers))
        return allowed, why, ids

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, L7RuleSet):
            return NotImplemented
        return (self.allow_all, self.allow_all_rule_ids) == (other.allow_all, other.allow_all_rule_ids) and \
            {n: r for n, r in self.rules.items() if r} == {n: r for n, r in other.rules.items() if r}

    def __repr__(self) -> str:
        return f"L7RuleSet(allow_all={self.allow_all}, rules={self.rules}, allow_all_rule_ids={self.allow_all_rule_ids})"

    def to_json(self) -> dict:
        out: dict[str, Any] = {"allow_all": self.allow_all, "allow_all_rule_ids": list(self.allow_all_rule_ids)}
        names = ["http", "dns"] + sorted((set(protocols()) | set(self.rules)) - {"http", "dns"})
        for name in names:
            out[name] = [{"rule": r.to_json(), "rule_id": i} for r, i in self.rules.get(name, ())]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "L7RuleSet":
        rules = {name: [(proto.rule_from_json(e["rule"]), int(e["rule_id"])) for e in data.get(name, ())]
                 for name, proto in protocols().items()}
        return cls(bool(data.get("allow_all", False)), allow_all_rule_ids=[int(i) for i in data.get("allow_all_rule_ids", ())],
                   rules=rules)


class L7Policy:
    """Value of `MapState.l7[(endpoint id, direction, proxy port)]`.

    `rules[(remote identity, port)]`; identity 0 holds the rules that apply to any peer.
    `ranges[(remote identity, first port, last port)]` holds the set shared by every port of a
    range (an L7 rule on `port` + `endPort`); the resolver makes ranges and single ports that
    never overlap for one identity. The proxy looks up the peer's own set (its port, then its
    ranges) and falls back to the any-peer set (identity 0) the same way, as `lookup` does.
    """

    def __init__(self, rules: dict[tuple[int, int], L7RuleSet] | None = None,
                 ranges: dict[tuple[int, int, int], L7RuleSet] | None = None) -> None:
        self.rules: dict[tuple[int, int], L7RuleSet] = rules if rules is not None else {}
        self.ranges: dict[tuple[int, int, int], L7RuleSet] = ranges if ranges is not None else {}

    def __bool__(self) -> bool:
        return bool(self.rules or self.ranges)

    def _own(self, identity: int, port: int) -> L7RuleSet | None:
        got = self.rules.get((identity, port))
        if got is not None:
            return got
        return next((rs for (ident, lo, hi), rs in self.ranges.items() if ident == identity and lo <= port <= hi), None)

    def lookup(self, identity: int, port: int) -> L7RuleSet | None:
        return self._own(identity, port) or self._own(0, port)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, L7Policy) and self.rules == other.rules and self.ranges == other.ranges

    def __repr__(self) -> str:
        return f"L7Policy({self.rules!r}, ranges={self.ranges!r})"

    def to_json(self) -> dict:
        out: dict[str, Any] = {"rules": [{"identity": ident, "port": port, "set": rs.to_json()}
                                         for (ident, port), rs in sorted(self.rules.items())]}
        if self.ranges:
            out["ranges"] = [{"identity": ident, "port": lo, "end_port": hi, "set": rs.to_json()}
                             for (ident, lo, hi), rs in sorted(self.ranges.items())]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "L7Policy":
        return cls({(int(e["identity"]), int(e["port"])): L7RuleSet.from_json(e["set"])
                    for e in data.get("rules", ())},
                   {(int(e["identity"]), int(e["port"]), int(e["end_port"])): L7RuleSet.from_json(e["set"])
                    for e in data.get("ranges", ())})
