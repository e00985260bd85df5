"""The policy map as the kernel holds it, set against the state the resolver intended, and the
lab's identities: what `l7lab policy get` and `l7lab identity list` show (cilium bpf policy get,
cilium identity list).

Responsibility, in three parts that meet only through plain JSON:

- in the agent (which holds the datapath): `dump_reply` packs the policy map read back from the
  kernel (`Datapath.read_policy`), the map state in force, and the identities with their labels,
  endpoints and prefixes (`identities_json`) into one reply of the agent's "policy-dump" op;
- anywhere: `compare` sets the kernel's entries against the intended ones, key by key. The
  kernel keeps one rule id per entry (the first of `PolicyEntry.rule_ids`) and only the port's
  prefix bits, so the intended entries are compared in the form the kernel keeps them
  (`datapath.as_kernel_holds`). A difference is an entry only in the kernel, one missing from
  it, or one whose verdict, proxy port or rule id differ: normally there is none;
- on the CLI's side: `PolicyDump.from_reply` rebuilds both maps from the reply and `rows` names
  each entry (endpoint, identity labels, port range, verdict, proxy port, the rules that produced
  it, as `explain` names them) for the tables people read and the JSON machines read.

Nothing here touches the kernel: the tests compare two maps in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .abi import IDENTITY_ANY, PROTO_ANY, PROTOCOL_NAMES, Direction
from .datapath import as_kernel_holds
from .mapstate import EndpointState, MapState, PolicyEntry, PolicyKey, RuleAttribution

if TYPE_CHECKING:
    from .policy.identity import Identity, IdentityTable

# What a row's "check" says: the kernel and the resolver agree, or how they differ.
OK = "ok"
KERNEL_ONLY = "only in kernel"
MISSING = "missing in kernel"
DIFFERS = "differs"


@dataclass(frozen=True)
class Comparison:
    """One policy key: the kernel's entry, the intended entry (all its rule ids), and the
    intended entry as the kernel would keep it; None where a side has no entry."""

    key: PolicyKey
    kernel: PolicyEntry | None
    intended: PolicyEntry | None
    intended_kept: PolicyEntry | None

    @property
    def check(self) -> str:
        if self.intended is None:
            return KERNEL_ONLY
        if self.kernel is None:
            return MISSING
        return OK if self.kernel == self.intended_kept else DIFFERS


def compare(kernel: dict[PolicyKey, PolicyEntry], intended: dict[PolicyKey, PolicyEntry]) -> list[Comparison]:
    """Every key of either map, in key order, with both sides' entries."""
    wanted: dict[PolicyKey, tuple[PolicyEntry, PolicyEntry]] = {}
    for key, entry in intended.items():
        kept_key, kept = as_kernel_holds(key, entry)
        wanted[kept_key] = (entry, kept)
    out = []
    for key in sorted(set(kernel) | set(wanted)):
        full, kept = wanted.get(key, (None, None))
        out.append(Comparison(key, kernel.get(key), full, kept))
    return out


# -- identities ---------------------------------------------------------------------------------
def identity_labels(identity: Identity) -> list[str]:
    """Labels as Cilium prints them (`source:key=value`): pod labels under `k8s:`, reserved and
    CIDR labels as they are stored (`reserved:host`, `cidr:203.0.113.0/24`)."""
    source = "k8s:" if identity.kind == "pod" else ""
    return [f"{source}{k}={v}" if v else f"{source}{k}" for k, v in identity.labels]


def identities_json(table: IdentityTable, state: MapState) -> list[dict[str, Any]]:
    """Every identity of the lab with its labels, the endpoints that carry it and the ipcache
    prefixes that map to it, by number."""
    prefixes: dict[int, list[str]] = {}
    for prefix, number in state.ipcache.items():
        prefixes.setdefault(number, []).append(prefix)
    endpoints: dict[int, list[str]] = {}
    for ep in state.endpoints.values():
        endpoints.setdefault(ep.identity, []).append(ep.name)
    return [{"id": number, "kind": ident.kind, "labels": identity_labels(ident), "description": ident.describe(),
             "endpoints": sorted(endpoints.get(number, ())),
             "prefixes": sorted(prefixes.get(number, ()), key=_prefix_order),
             "dns_names": list(ident.dns_names)}
            for number, ident in sorted(table.identities.items())]


def _prefix_order(prefix: str) -> tuple[int, ...]:
    address, _, length = prefix.partition("/")
    return (*(int(part) for part in address.split(".")), int(length or 32))


# -- the agent's reply --------------------------------------------------------------------------
def dump_reply(kernel: dict[PolicyKey, PolicyEntry], state: MapState, identities: IdentityTable,
               endpoint_id: int | None = None) -> dict[str, Any]:
    """The "policy-dump" reply: the kernel's entries and the intended ones (of one endpoint, or
    all), the endpoints, the rules and the identities that name them."""
    def mine(key: PolicyKey) -> bool:
        return endpoint_id is None or key.endpoint_id == endpoint_id

    endpoints = {i: ep for i, ep in state.endpoints.items() if endpoint_id is None or i == endpoint_id}
    # MapState's own JSON encoding (the proxy's state file) carries both maps; its L7 part stays out.
    kernel_side = MapState(policy={k: v for k, v in kernel.items() if mine(k)})
    intended_side = MapState(endpoints=endpoints, policy={k: v for k, v in state.policy.items() if mine(k)},
                             rules=dict(state.rules))
    return {"ok": True, "endpoint_id": endpoint_id, "kernel": kernel_side.to_json()["policy"],
            "intended": intended_side.to_json(), "identities": identities_json(identities, state)}


# -- the CLI's side -----------------------------------------------------------------------------
def port_text(key: PolicyKey) -> str:
    """PORT/PROTO as `cilium bpf policy get` prints it, a port prefix shown as the range it
    covers: "ANY", "ANY/TCP", "8080/TCP", "8080-8095/TCP"."""
    if key.protocol == PROTO_ANY:
        return "ANY"
    proto = PROTOCOL_NAMES.get(key.protocol, str(key.protocol))
    first, last = port_range(key)
    if (first, last) == (0, 65535):
        return f"ANY/{proto}"
    return f"{first}/{proto}" if first == last else f"{first}-{last}/{proto}"


def port_range(key: PolicyKey) -> tuple[int, int]:
    """The ports (ICMP: types) an entry covers: its first port and the last of its block."""
    if key.protocol == PROTO_ANY or key.port_prefix == 0:
        return 0, 65535
    size = 1 << (16 - key.port_prefix)
    first = key.port & ~(size - 1) & 0xFFFF
    return first, first + size - 1


def rule_json(rule: RuleAttribution | None, rule_id: int) -> dict[str, Any]:
    """A rule as `explain` names it ("Kind namespace/name ingress[0]"), and its policy's kind,
    namespace and name apart."""
    if rule is None:
        return {"rule_id": rule_id, "rule": f"rule {rule_id} (unknown to the resolver)"}
    kind, _, ref = rule.policy.partition(" ")
    namespace, _, name = ref.rpartition("/")
    out: dict[str, Any] = {"rule_id": rule_id, "rule": rule.text, "policy": rule.policy}
    if kind and name and " " not in ref:  # a policy of the API; the built-in allow has no kind
        out.update(kind=kind, namespace=namespace, name=name)
    out.update(section=rule.section, rule_index=rule.rule_index)
    return out


def _entry_json(entry: PolicyEntry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {"verdict": entry.verdict.name.lower(), "proxy_port": entry.proxy_port, "rule_ids": list(entry.rule_ids)}


@dataclass
class PolicyDump:
    """Both maps of a "policy-dump" reply, and the names that go with them."""

    kernel: dict[PolicyKey, PolicyEntry]
    intended: MapState
    identities: dict[int, dict[str, Any]]
    endpoint_id: int | None = None

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> PolicyDump:
        kernel = MapState.from_json({"format": MapState.STATE_FORMAT, "policy": reply["kernel"]}).policy
        return cls(kernel, MapState.from_json(reply["intended"]),
                   {int(i["id"]): i for i in reply.get("identities", ())}, reply.get("endpoint_id"))

    def identity_labels(self, number: int) -> list[str]:
        if number == IDENTITY_ANY:
            return ["reserved:any"]
        info = self.identities.get(number)
        return list(info["labels"]) if info is not None else [f"unknown identity {number}"]

    def identity_text(self, number: int) -> str:
        """The identity as flows and traces name it: "256 (k8s:app=frontend-app, ...)"."""
        if number == IDENTITY_ANY:
            return "0 (any)"
        info = self.identities.get(number)
        return info["description"] if info is not None else str(number)

    def row(self, c: Comparison) -> dict[str, Any]:
        """One entry, named: the kernel's values (the intended ones where the kernel has none),
        the rules that produced it, and the check; both sides' values where they differ."""
        shown = c.kernel if c.kernel is not None else c.intended
        assert shown is not None
        # The rules: all those the resolver attributes the entry to, when the kernel's one rule
        # id is theirs; otherwise the kernel's, which is what it reports in its events.
        agree = c.intended is not None and (c.kernel is None or c.kernel.rule_ids == c.intended.rule_ids[:1])
        rule_ids = c.intended.rule_ids if agree and c.intended is not None else shown.rule_ids
        ep = self.intended.endpoints.get(c.key.endpoint_id)
        first, last = port_range(c.key)
        row: dict[str, Any] = {
            "endpoint_id": c.key.endpoint_id, "endpoint": ep.name if ep is not None else None,
            "direction": c.key.direction.name.lower(), "identity": c.key.identity,
            "identity_labels": self.identity_labels(c.key.identity),
            "protocol": PROTOCOL_NAMES.get(c.key.protocol, "ANY" if c.key.protocol == PROTO_ANY else str(c.key.protocol)),
            "port": c.key.port, "port_prefix": c.key.port_prefix, "port_range": [first, last],
            "ports": port_text(c.key), "verdict": shown.verdict.name.lower(), "proxy_port": shown.proxy_port,
            "rules": [rule_json(self.intended.rules.get(i), i) for i in rule_ids], "check": c.check}
        if c.check != OK:
            row["kernel"] = _entry_json(c.kernel)
            row["intended"] = _entry_json(c.intended_kept)
        return row

    def endpoints(self) -> list[dict[str, Any]]:
        """Per endpoint (by id; the resolver's endpoints, and any other id the kernel's map has
        entries for), its entries as rows, in the order `cilium bpf policy get` lists them:
        ingress first, then by identity, protocol and port."""
        comparisons = compare(self.kernel, self.intended.policy)
        by_endpoint: dict[int, list[Comparison]] = {i: [] for i in self.intended.endpoints}
        for c in comparisons:
            by_endpoint.setdefault(c.key.endpoint_id, []).append(c)
        out = []
        for endpoint_id, mine in sorted(by_endpoint.items()):
            ep: EndpointState | None = self.intended.endpoints.get(endpoint_id)
            rows = [self.row(c) for c in sorted(mine, key=_row_order)]
            out.append({"endpoint_id": endpoint_id, "endpoint": ep.name if ep is not None else None,
                        "identity": ep.identity if ep is not None else None,
                        "ingress_enforced": ep.ingress_enforced if ep is not None else None,
                        "egress_enforced": ep.egress_enforced if ep is not None else None,
                        "kernel_entries": sum(1 for c in mine if c.kernel is not None),
                        "intended_entries": sum(1 for c in mine if c.intended is not None),
                        "differences": sum(1 for c in mine if c.check != OK), "entries": rows})
        return out


def _row_order(c: Comparison) -> tuple[int, int, int, int, int]:
    return (int(c.key.direction != Direction.INGRESS), c.key.identity, c.key.protocol, c.key.port, c.key.port_prefix)


def difference_text(row: dict[str, Any]) -> str:
    """What the check column says of a row: "ok", or how the kernel's entry and the intended
    one differ."""
    if row["check"] in (OK, KERNEL_ONLY, MISSING):
        return row["check"]
    kernel, intended = row["kernel"], row["intended"]
    parts = [f"{field.replace('_', ' ')}: kernel {_value(kernel[field])}, intended {_value(intended[field])}"
             for field in ("verdict", "proxy_port", "rule_ids") if kernel[field] != intended[field]]
    return "differs (" + "; ".join(parts) + ")"


def _value(v: object) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "none"
    return str(v)
