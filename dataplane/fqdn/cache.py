"""The FQDN cache: which addresses DNS answers gave which names, per endpoint, and until when.

This follows Cilium's DNS cache (pkg/fqdn/cache.go) and its garbage collection
(pkg/fqdn/namemanager, daemon/cmd/fqdn.go):

- Every endpoint has its own cache. An entry is (endpoint, name, address): the answer to a
  lookup made by that endpoint said that `name` has `address`. The name is the name asked and
  every name of the CNAME chain the answer followed to the address, so a selector on the alias
  and a selector on the canonical name both learn it.
- An entry lives until max(TTL, the minimum TTL) after the answer (`--tofqdns-min-ttl`, default
  0: the answer's TTL). A new answer for the same name and address extends it.
- An endpoint keeps at most `max_ips_per_name` addresses per name
  (`--tofqdns-endpoint-max-ip-per-hostname`); past it the entries that expire first go, and of
  one answer's addresses the last ones (a client connects to the first).
- An expired entry whose address the endpoint still has an open connection to stays, marked a
  zombie ("kept: connection open"), and is dropped once the connection is gone (Cilium keeps
  such addresses alive from its conntrack garbage collection).
- The names and addresses of all endpoints' caches together are what `toFQDNs` selectors
  select: like Cilium's selector cache, a selector is node-wide, so an address that one
  endpoint's lookup taught is allowed to every endpoint whose policy has a matching selector.

Times are seconds of one monotonic clock (`now`), given by the caller; `learned_wall` is the
wall-clock time of the answer, for people.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


@dataclass
class CacheEntry:
    endpoint: str  # pod key of the endpoint that asked
    name: str  # a name the address was given for (lower case, no trailing dot)
    address: str
    ttl: int  # the answer's TTL (the smallest of its records)
    learned_at: float  # monotonic time of the answer
    expires_at: float  # monotonic: learned_at + max(ttl, min_ttl)
    query: str  # the name the endpoint asked (the start of the CNAME chain)
    learned_wall: float = 0.0  # wall-clock time of the answer
    zombie: bool = False  # expired, kept while a connection to the address is open

    @property
    def key(self) -> tuple[str, str, str]:
        return self.endpoint, self.name, self.address

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CacheEntry":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class AnswerRecord:
    """One record of an answer section as the cache reads it."""

    name: str  # owner name, lower case, no trailing dot
    type: str  # "A" | "AAAA" | "CNAME"
    ttl: int
    data: str  # the address, or the CNAME target (lower case, no trailing dot)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AnswerRecord":
        return cls(_norm(str(data["name"])), str(data["type"]).upper(), int(data["ttl"]),
                   _norm(str(data["data"])) if str(data["type"]).upper() == "CNAME" else str(data["data"]))


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


def chain_addresses(qname: str, records: Iterable[AnswerRecord]) -> tuple[list[str], list[str], int]:
    """(names of the CNAME chain from `qname`, IPv4 addresses at its end, the smallest TTL of the
    records followed). Records not on the chain are ignored, as a stub resolver ignores them; the
    lab is IPv4 only, so AAAA records teach nothing."""
    records = list(records)
    names = [_norm(qname)]
    ttls: list[int] = []
    for _ in range(16):  # a chain longer than this is a loop or an attack
        step = next((r for r in records if r.type == "CNAME" and r.name == names[-1]), None)
        if step is None or step.data in names:
            break
        ttls.append(step.ttl)
        names.append(step.data)
    chain = set(names)
    addresses: list[str] = []
    for r in records:
        if r.type == "A" and r.name in chain and r.data not in addresses:
            addresses.append(r.data)
            ttls.append(r.ttl)
    return names, addresses, min(ttls, default=0)


@dataclass
class FqdnCache:
    """Every endpoint's cache of learned names and addresses."""

    min_ttl: int = 0
    max_ips_per_name: int = 50
    entries: dict[tuple[str, str, str], CacheEntry] = field(default_factory=dict)

    def learn(self, endpoint: str, qname: str, records: Iterable[AnswerRecord], now: float,
              wall: float = 0.0) -> list[CacheEntry]:
        """Take in one answer to `endpoint`'s lookup of `qname`; the entries it made or renewed."""
        names, addresses, ttl = chain_addresses(qname, records)
        if not addresses:
            return []
        lifetime = max(ttl, self.min_ttl)
        out: list[CacheEntry] = []
        for name in names:
            # Last answer record first: of entries that expire together, the cap drops the ones
            # learned first, so the addresses a client tries first (the answer's first) stay.
            for address in reversed(addresses):
                entry = CacheEntry(endpoint, name, address, ttl, now, now + lifetime, _norm(qname), wall)
                old = self.entries.get(entry.key)
                if old is not None and old.expires_at > entry.expires_at:
                    entry.expires_at = old.expires_at  # an answer never shortens what an earlier one gave
                self.entries[entry.key] = entry
                out.append(entry)
            self._cap(endpoint, name)
        return [e for e in out if self.entries.get(e.key) is e]

    def _cap(self, endpoint: str, name: str) -> None:
        mine = sorted((e for e in self.entries.values() if e.endpoint == endpoint and e.name == name),
                      key=lambda e: (e.expires_at, e.learned_at))
        for entry in mine[:max(0, len(mine) - self.max_ips_per_name)]:
            del self.entries[entry.key]

    def expire(self, now: float, open_addresses: set[tuple[str, str]] | None) -> list[CacheEntry]:
        """Remove what has expired; an expired entry whose (endpoint, address) is in
        `open_addresses` stays as a zombie. `open_addresses` None: the connections are unknown
        (no datapath): every expired entry goes. Returns the entries removed."""
        removed: list[CacheEntry] = []
        for key, entry in list(self.entries.items()):
            if entry.expires_at > now:
                continue
            if open_addresses is not None and (entry.endpoint, entry.address) in open_addresses:
                entry.zombie = True
                continue
            removed.append(self.entries.pop(key))
        return removed

    def forget(self, names: Iterable[str]) -> list[CacheEntry]:
        """Remove every entry of these names at once (the oracle's model of their expiry)."""
        wanted = {_norm(n) for n in names}
        return [self.entries.pop(k) for k, e in list(self.entries.items()) if e.name in wanted]

    def has_name(self, names: Iterable[str]) -> bool:
        wanted = {_norm(n) for n in names}
        return any(e.name in wanted for e in self.entries.values())

    def address_names(self) -> dict[str, tuple[str, ...]]:
        """address -> the names every endpoint's cache gives it (sorted): what selectors select."""
        out: dict[str, set[str]] = {}
        for e in self.entries.values():
            out.setdefault(e.address, set()).add(e.name)
        return {a: tuple(sorted(n)) for a, n in sorted(out.items())}

    def sources(self) -> dict[str, str]:
        """address -> the earliest lookup that taught it, in words ("api.example.com looked up
        by shop/checkout"): what explain says of an address a toFQDNs selector allows."""
        first: dict[str, CacheEntry] = {}
        for e in self.entries.values():
            if e.address not in first or e.learned_at < first[e.address].learned_at:
                first[e.address] = e
        return {a: f"{e.query} looked up by {e.endpoint}" for a, e in sorted(first.items())}

    def rows(self) -> list[CacheEntry]:
        return sorted(self.entries.values(), key=lambda e: (e.endpoint, e.name, e.address))

    def to_json(self) -> dict[str, Any]:
        return {"min_ttl": self.min_ttl, "max_ips_per_name": self.max_ips_per_name,
                "entries": [e.to_json() for e in self.rows()]}

    def copy(self) -> "FqdnCache":
        return FqdnCache(self.min_ttl, self.max_ips_per_name,
                         {k: CacheEntry(**asdict(e)) for k, e in self.entries.items()})
