"""Kubernetes label selectors as Hubble's `--label` flags take them, over Cilium's labels.

`parse_selector("k8s:app in (a,b),!debug")` reads a selector the way k8s.io/apimachinery's
labels.Parse does, after Hubble's translation of Cilium source prefixes
(pkg/hubble/filters/labelparser.go): a key may name a source (`k8s:app`, `reserved:world`),
and a key without one matches a label of any source. `flow_labels` reads an endpoint's labels
as a Hubble flow lists them (`["k8s:app=x", "reserved:world"]`), as Cilium's
ParseLabelArrayFromArray does; `Requirement.matches` checks one requirement against them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Requirement:
    """One requirement of a Kubernetes label selector, with Cilium's source prefix (`k8s:app`):
    `source` is "any" when the key names none."""

    source: str
    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: list[tuple[str, str, str]]) -> bool:
        """Against (source, key, value) labels, as k8s.io/apimachinery's Requirement.Matches does
        over Cilium's LabelArray (whose "any" source matches every source)."""
        found = [v for s, k, v in labels if k == self.key and (self.source == "any" or s == self.source)]
        if self.op == "exists":
            return bool(found)
        if self.op == "!":
            return not found
        if self.op in ("=", "in"):
            return bool(found) and found[0] in self.values
        if self.op in ("!=", "notin"):
            return not found or found[0] not in self.values
        if not found or not re.fullmatch(r"-?\d+", found[0]):
            return False
        return int(found[0]) > int(self.values[0]) if self.op == "gt" else int(found[0]) < int(self.values[0])


_KEY = r"(?:[A-Za-z0-9_.-]+:)?[A-Za-z0-9](?:[A-Za-z0-9_./-]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"\s*(?:(?P<not>!)\s*(?P<nkey>{_KEY})"
    rf"|(?P<key>{_KEY})(?:\s*(?P<op>==|=|!=|>|<)\s*(?P<value>{_VALUE})"
    rf"|\s+(?P<setop>in|notin)\s*\(\s*(?P<set>{_VALUE}(?:\s*,\s*{_VALUE})*)\s*\))?)\s*")


def _split_key(key: str) -> tuple[str, str]:
    source, sep, name = key.partition(":")
    return (source, name) if sep else ("any", key)


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """A label selector as `--label` takes it: requirements separated by commas, each `key`,
    `!key`, `key=value` (or `==`), `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key>1`,
    `key<1`; a key may carry a source (`k8s:app=x`, `reserved:world`). Raises ValueError."""
    requirements: list[Requirement] = []
    if not text.strip():
        return ()  # the empty selector selects everything, as Kubernetes' does
    position = 0
    while True:
        match = _REQUIREMENT.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"cannot read a label requirement at {text[position:]!r}")
        if match["not"]:
            requirements.append(Requirement(*_split_key(match["nkey"]), "!"))
        elif match["op"]:
            op = {"==": "=", ">": "gt", "<": "lt"}.get(match["op"], match["op"])
            if op in ("gt", "lt") and not re.fullmatch(r"-?\d+", match["value"]):
                raise ValueError(f"{match['key']}{match['op']}{match['value']}: expected a whole number")
            requirements.append(Requirement(*_split_key(match["key"]), op, (match["value"],)))
        elif match["setop"]:
            values = tuple(v.strip() for v in match["set"].split(","))
            requirements.append(Requirement(*_split_key(match["key"]), match["setop"], values))
        else:
            requirements.append(Requirement(*_split_key(match["key"]), "exists"))
        position = match.end()
        if position == len(text):
            return tuple(requirements)
        if text[position] != ",":
            raise ValueError(f"expected ',' between requirements at {text[position:]!r}")
        position += 1


def flow_labels(endpoint: dict[str, Any]) -> list[tuple[str, str, str]]:
    """An endpoint's labels (["k8s:app=x", "reserved:world"]) as (source, key, value), the way
    Cilium's ParseLabelArrayFromArray reads them (no source: "unspec")."""
    out = []
    for label in endpoint.get("labels") or ():
        source, sep, rest = str(label).partition(":")
        if not sep:
            source, rest = "unspec", str(label)
        key, _, value = rest.partition("=")
        out.append((source, key, value))
    return out
