"""The oracle's model of what lookups teach, across the steps of a scenario.

A probe to a DNS name from a pod is a lookup (`lookup.model_lookup`: the search path's queries
judged by the policy, answered from the cluster DNS's zone, learned when the DNS proxy relayed
them) followed by the connection to the address it gave, judged with what the model's FQDN cache
holds then. A probe to an address is judged with the cache alone: an address no lookup taught
is no toFQDNs selector's.

Probes of one step run at once, so each is judged with the cache as the step began plus its own
lookup; what the step's lookups taught counts from the next step on (`end_step`). An `expire`
step forgets the names it lists (`expire`), as the lab does once their TTL has passed with no
connection open. Time does not pass otherwise in the model: a scenario whose probes rely on an
earlier step's lookup gives those names TTLs longer than the run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .cache import FqdnCache
from .lookup import Lookup, model_lookup

if TYPE_CHECKING:
    from ..policy.engine import Decision, PolicyEngine
    from ..scenario import Probe, Step


def looks_up(probe: "Probe", engine: "PolicyEngine") -> bool:
    """Whether the probe's client resolves its destination through the cluster DNS: a pod's
    probe to a world host's or a service's DNS name, in a lab with a cluster DNS."""
    sc = engine.scenario
    return bool(probe.destination.dns_name) and probe.source in sc.pods and sc.nameserver is not None \
        and probe.destination.kind in ("world", "service")


class FqdnOracle:
    def __init__(self, engine: "PolicyEngine", cache: FqdnCache | None = None) -> None:
        """`cache`: what lookups taught the lab before (its copy is the model's start)."""
        from ..clusterdns import zone_from_scenario  # noqa: PLC0415

        self.engine = engine
        settings = engine.scenario.settings
        self.cache = cache.copy() if cache is not None else \
            FqdnCache(settings.fqdn_min_ttl, settings.fqdn_max_ips_per_hostname)
        self.zone = zone_from_scenario(engine.scenario) if engine.scenario.nameserver else None
        self._step: list[FqdnCache] = []
        self._resolved: tuple[object, object, "PolicyEngine"] | None = None

    def judge(self, probe: "Probe") -> tuple["Decision | None", Lookup | None, "Probe"]:
        """(the decision on the connection, or None when the name did not resolve; the lookup,
        for a name probe; the probe as sent, to the address the lookup gave)."""
        from ..policy.engine import Flow  # noqa: PLC0415

        cache, lookup = self.cache, None
        if looks_up(probe, self.engine) and self.zone is not None:
            cache = self.cache.copy()
            lookup = model_lookup(self.engine, self.zone, cache, probe.source, probe.destination.dns_name, 0.0)
            self._step.append(cache)
            if not lookup.resolved:
                return None, lookup, probe
            probe = replace(probe, destination=replace(probe.destination, ip=lookup.address))
        return self._engine_for(cache).verdict(Flow.from_probe(probe)), lookup, probe

    def _engine_for(self, cache: FqdnCache) -> "PolicyEngine":
        """The engine as if DNS had taught what `cache` holds; resolved once per such state and
        policy state (probes of a step mostly share one)."""
        names, sources = cache.address_names(), cache.sources()
        state, learned = self.engine.snapshot(), (names, sources)
        if self._resolved is None or self._resolved[0] is not state or self._resolved[1] != learned:
            # The state in force is held here, so it cannot be mistaken for a later one.
            self._resolved = (state, learned, self.engine.with_fqdn_names(names, sources))
        return self._resolved[2]

    def expectation(self, probe: "Probe") -> str:
        decision, _, _ = self.judge(probe)
        return "unresolved" if decision is None else decision.expectation

    def end_step(self) -> None:
        for cache in self._step:
            for key, entry in cache.entries.items():
                old = self.cache.entries.get(key)
                if old is None or entry.expires_at > old.expires_at:
                    self.cache.entries[key] = entry
        self._step = []

    def expire(self, names: tuple[str, ...]) -> None:
        self.cache.forget(names)


def expected_walk(engine: "PolicyEngine") -> list[tuple["Step", "Probe", "Decision", Lookup | None]]:
    """Walk every step of the engine's scenario (dry run): (step, probe, oracle decision, the
    probe's lookup or None). A probe to a DNS name is looked up first, in this model; one whose
    name does not resolve gets the outcome `unresolved`, the lookup in its trace."""
    from ..policy.engine import Decision, Flow  # noqa: PLC0415

    fqdn = FqdnOracle(engine)
    out = []
    for step in engine.scenario.steps:
        if step.kind == "expire":
            fqdn.expire(step.expire)
            continue
        engine.apply_step(step)
        for probe in step.probes:
            decision, lookup, _ = fqdn.judge(probe)
            if decision is None:
                assert lookup is not None
                decision = Decision("unresolved", Flow.from_probe(probe), [lookup.summary(), lookup.why])
            out.append((step, probe, decision, lookup))
        fqdn.end_step()
    return out


def expected_outcomes(engine: "PolicyEngine") -> list[tuple["Step", "Probe", "Decision"]]:
    """`expected_walk` without the lookups: (step, probe, oracle decision)."""
    return [(step, probe, decision) for step, probe, decision, _ in expected_walk(engine)]


def lookup_races(engine: "PolicyEngine") -> list[str]:
    """Probes of one step that race a lookup: a probe to a world host by its lab name or address
    while another probe of the same step looks up, through the DNS proxy, a name that gives that
    address and that a toFQDNs selector matches. The probes of a step run at once, so on the
    kernel the lookup may or may not have taught the address when the connection starts; the
    oracle judges it with what earlier steps taught. `engine` is walked through the scenario."""
    from l7.dns import fqdn_matches  # noqa: PLC0415

    from ..policy.api import FQDNPeer  # noqa: PLC0415

    sc = engine.scenario
    out: list[str] = []
    walk = expected_walk(engine)
    for step in sc.steps:
        probes = [(j, p, lookup) for j, (s, p, _, lookup) in
                  enumerate((w for w in walk if w[0] is step))]
        selectors = [p for policy in engine.policies.values() for spec in policy.specs for rule in spec.rules
                     for p in rule.peers if isinstance(p, FQDNPeer)]
        taught: dict[str, tuple[int, str]] = {}  # address -> (probe index, name looked up)
        for j, probe, lookup in probes:
            if lookup is None or not lookup.learned:
                continue
            names = set(lookup.learned)
            if not any(fqdn_matches(n, s.match_name, s.match_pattern) for n in names for s in selectors):
                continue
            for host in sc.world.values():
                if names & {n.lower() for n in (*host.dns_names, *host.aliases)}:
                    taught.setdefault(host.address, (j, lookup.name.rstrip(".")))
        for j, probe, _ in probes:
            dest = probe.destination
            if dest.kind == "world" and not dest.dns_name and dest.ip in taught:
                k, name = taught[dest.ip]
                out.append(f"steps[{step.index}] ({step.name}): probes[{j}] connects to {dest.ip} (world host "
                           f"{dest.name}) by address while probes[{k}] looks up {name}, which teaches toFQDNs that "
                           f"address; the probes of a step run at once, so whether the lookup comes first is a race "
                           f"on the kernel: put them in separate steps")
    return out
