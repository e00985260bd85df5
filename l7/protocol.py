"""What "an L7 protocol" is, and the registry of them.

Every module of the `l7` package that defines `PROTOCOL = L7Protocol(...)` is a protocol; the
registry finds them by walking the package, so a new protocol is registered by its own module
and nothing else. A protocol says under which name its rules are kept in an `L7RuleSet` (and in
the proxy's state file), which transports the proxy receives it on (the first is its home: a
flow without rules of any protocol falls back to the protocol at home on its transport), how its
rules are read back from JSON, and how one request of it is judged against one rule set (`judge`). The
protocol-neutral part -- every applicable set must allow, the first refusal decides, policy
attribution -- is `l7.decide`.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol


class SetVerdict(NamedTuple):
    """One rule set's answer to one request."""

    allowed: bool
    why: str  # e.g. "matches HTTP rule {...}" or "matches no DNS rule (tried: ...)"
    rule_ids: tuple[int, ...]  # the rules that allowed it (empty when refused)
    tried: tuple[int, ...]  # the rules it was checked against: their policies are named on a refusal


class RuleSetView(Protocol):
    """What a protocol's `judge` reads of a rule set (`l7.ruleset.L7RuleSet` is one)."""

    allow_all: bool
    allow_all_rule_ids: list[int]

    def rules_for(self, protocol: str) -> list[tuple[Any, int]]: ...

    def protocols_with_rules(self) -> list[str]: ...


@dataclass(frozen=True)
class L7Protocol:
    name: str  # key of its rules in L7RuleSet.rules and in the state file: "http", "dns"
    title: str  # for people: "HTTP", "DNS"
    # What the proxy receives it on, its home transport first: ("TCP",) for HTTP, ("UDP", "TCP")
    # for DNS (RFC 1035 4.2: a DNS rule's redirect carries queries over both).
    transports: tuple[str, ...]
    refused_as: str  # the oracle's outcome for a refused request: "denied" (403) | "refused" (REFUSED)
    rule_from_json: Callable[[dict], Any]
    judge: Callable[[RuleSetView, Any], SetVerdict]  # (rule set, request as the rules see it)
    describe: Callable[[Any], str]  # a request in a trace: "GET /path", "DNS query example.com"
    refusal_note: str = ""  # what the proxy answers a refused request, for traces


@functools.cache
def protocols() -> dict[str, L7Protocol]:
    """Every protocol of the package, by name (found once, on first use)."""
    found: dict[str, L7Protocol] = {}
    for info in sorted(pkgutil.iter_modules(_package_path()), key=lambda i: i.name):
        module = importlib.import_module(f"{__package__}.{info.name}")
        proto = getattr(module, "PROTOCOL", None)
        if isinstance(proto, L7Protocol):
            found[proto.name] = proto
    return found


def _package_path() -> list[str]:
    return list(importlib.import_module(__package__).__path__)


def protocol(name: str) -> L7Protocol:
    """The protocol called `name`; KeyError naming the known ones otherwise."""
    try:
        return protocols()[name]
    except KeyError:
        raise KeyError(f"unknown L7 protocol {name!r} (known: {', '.join(sorted(protocols()))})") from None


def for_transport(transport: str) -> list[L7Protocol]:
    """The protocols the proxy receives on `transport` ("TCP" | "UDP"): those at home on it
    first (HTTP before DNS on TCP), each group in registry order."""
    found = [p for p in protocols().values() if transport in p.transports]
    return sorted(found, key=lambda p: p.transports.index(transport) != 0)
