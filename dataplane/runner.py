"""The scenario runner: execute a scenario's steps in order and judge every probe.

A runner drives an *executor*, which is what actually answers a probe:

    KernelExecutor   real traffic in a lab that is up (`l7lab run`)
    OracleExecutor   the policy resolver alone, no root, no kernel (`l7lab run --dry-run`)

Policy steps (apply, delete, relabel, audit) go to the executor too; probes of one step run
concurrently, because a `dropped` expectation costs a whole timeout.

A probe from a pod to a DNS name first looks the name up through the cluster DNS as the pod's
resolver would (`dataplane/fqdn/lookup.py`), then connects to the address it got; a name that
does not resolve is `unresolved`. On the kernel the lab's FQDN learner serves the L7 proxy
meanwhile, so what DNS rules let the proxy see becomes policy; the oracle models the same
(`dataplane/fqdn/oracle.py`). An `expire` step waits until the lab has forgotten its names.

With `explain`, every probe that misses its expectation is explained right after its step,
before the next step changes the policy: the oracle's reasoning (the resolver's decision, with
its trace) in `ProbeResult.reasoning` and, on the kernel, the probe sent again with tracing on
for its flow (`ProbeResult.trace`, a `dataplane.trace.Trace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from . import flowrecord
from .flowrender import outcome
from .errors import L7LabError
from .flows import Directory, FlowLog, kernel_flows
from .fqdn.lookup import DNS_PORT, lookup_in_netns
from .fqdn.oracle import FqdnOracle, looks_up
from .probes import Observation, run_probe
from .scenario import HOST_SOURCE, Probe, Scenario, Step, meets
from .services import pin_probe, service_backend_address

if TYPE_CHECKING:
    from .lab import Lab
    from .policy.engine import Decision, PolicyEngine

PROBE_CONCURRENCY = 32
EXPIRY_GRACE_S = 75.0  # past the latest TTL: conntrack forgets a finished flow within it (UDP: 60 s)
EXPIRY_POLL_S = 0.1


class Executor(Protocol):
    mode: str

    def apply_step(self, step: Step) -> None: ...

    async def observe(self, probe: Probe) -> Observation: ...

    def oracle(self, probe: Probe) -> str | None: ...

    def finish_step(self, results: list["ProbeResult"]) -> None: ...

    async def explain(self, result: "ProbeResult") -> None: ...


@dataclass
class ProbeResult:
    step: int
    step_name: str
    probe: Probe
    observed: Observation
    oracle: str | None = None  # the resolver's answer, when it is compared with the kernel's
    kernel: str | None = None  # what the datapath reported for this flow (its first event)
    kernel_verdict: str | None = None  # that event's verdict alone: FORWARDED, AUDIT, DROPPED, ...
    reasoning: Decision | None = None  # explained: the oracle's decision, with its trace
    trace: Any = None  # explained on the kernel: the probe's Trace, sent again with tracing on
    trace_error: str | None = None  # explained on the kernel, when the trace could not be taken

    @property
    def outcome(self) -> str:
        """What was observed: the client's outcome, `audited` for an allowed flow whose first
        kernel event is AUDIT (the client alone cannot tell it from `allowed`)."""
        if self.observed.outcome == "allowed" and self.kernel_verdict == flowrecord.Verdict.AUDIT.value:
            return "audited"
        return self.observed.outcome

    @property
    def disagrees(self) -> bool:
        """The oracle predicted another outcome than the one observed. Without a kernel event
        for the flow (a lab that records none), `audited` and `allowed` cannot be told apart
        and count as one."""
        if self.oracle is None or self.oracle == self.outcome:
            return False
        if self.kernel_verdict is None and {self.oracle, self.outcome} == {"audited", "allowed"}:
            return False
        return True

    @property
    def passed(self) -> bool:
        if self.disagrees:
            return False
        return meets(self.probe.expect, self.outcome)

    @property
    def verdict_text(self) -> str:
        if self.passed:
            return "pass"
        if self.disagrees:
            return "FAIL (kernel and oracle disagree)"
        return "FAIL"

    def to_json(self) -> dict[str, Any]:
        p = self.probe
        return {
            "step": self.step + 1, "step_name": self.step_name,
            "from": p.source, "to": str(p.destination), "destination": p.destination.name,
            "protocol": p.protocol, "request": p.request_text,
            "expected": p.expect, "observed": self.outcome, "oracle": self.oracle,
            "detail": self.observed.detail, "status": self.observed.status, "kernel": self.kernel,
            "elapsed_ms": round(self.observed.elapsed * 1000, 1), "passed": self.passed,
            "source_location": str(p.location),
        } | ({"explain": self.explanation_json()} if self.explained else {})

    @property
    def explained(self) -> bool:
        return self.reasoning is not None or self.trace is not None or self.trace_error is not None

    def explanation_json(self) -> dict[str, Any]:
        """The oracle's decision (its `trace` is the reasoning, line by line) and the kernel's trace."""
        return {"oracle": self.reasoning.to_json() if self.reasoning is not None else None,
                "trace": self.trace.to_json() if self.trace is not None else None,
                **({"trace_error": self.trace_error} if self.trace_error else {})}


@dataclass
class RunReport:
    scenario: str
    lab: str
    mode: str
    results: list[ProbeResult] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return sum(not r.passed for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "lab": self.lab, "mode": self.mode, "passed": self.passed,
                "probes": len(self.results), "failed": self.failed, "steps": self.steps,
                "results": [r.to_json() for r in self.results]}


class KernelExecutor:
    """Probes are real traffic from the source pod's namespace in a lab that is up."""

    mode = "kernel"

    def __init__(self, lab: Lab, policy: PolicyEngine | None = None) -> None:
        self.lab = lab
        self.policy = policy  # a policy engine, when one is wired in; used as the referee
        self.learner: Any = None
        self._learner_server: Any = None
        if policy is not None and lab.enforcing and lab.datapath is not None:
            self._serve_learner(policy)
        # The oracle's model starts from what lookups taught this lab before (an earlier run on it).
        self.fqdn = FqdnOracle(policy, lab.fqdn_cache) if policy is not None else None

    def _serve_learner(self, policy: PolicyEngine) -> None:
        """The lab's FQDN learner, served while the run lasts (an agent takes it over on --keep)."""
        from .fqdn.learner import FqdnLearner, LearnerServer, enforcer, write_learned  # noqa: PLC0415

        lab = self.lab
        assert lab.datapath is not None
        self.learner = FqdnLearner(policy, enforcer(policy, lambda old, state: write_learned(lab, old, state)),
                                   lab.datapath.open_connections, cache=lab.fqdn_cache)
        lab.fqdn_cache = self.learner.cache
        self.learner.tick()  # what expired since an earlier run on this lab goes first
        self.learner.sync()  # what it taught and still holds, in force under this engine too
        self._learner_server = LearnerServer(self.learner, lab.name)

    def close(self) -> None:
        if self._learner_server is not None:
            self._learner_server.close()
            self._learner_server = None

    def apply_step(self, step: Step) -> None:
        if self.policy is None:
            raise NotImplementedError("policy steps need the policy engine")
        if step.kind == "expire":
            self._await_expiry(step.expire)
            return
        lock = self.learner.lock if self.learner is not None else contextlib.nullcontext()
        with lock:
            self.policy.apply_step(step)
            self.lab.sync_policy(self.policy.map_state())

    def _await_expiry(self, names: tuple[str, ...]) -> None:
        """Wait until the learner holds nothing for `names`: their TTL passed and no connection to
        their addresses is open. Bounded by the latest expiry plus the time a closed connection's
        conntrack entry takes to go."""
        if self.fqdn is not None:
            self.fqdn.expire(names)
        if self.learner is None:
            return
        with self.learner.lock:
            latest = max((e.expires_at for e in self.learner.cache.entries.values()
                          if e.name in names), default=time.monotonic())
        deadline = latest + EXPIRY_GRACE_S
        while True:
            with self.learner.lock:
                left = [e for e in self.learner.cache.entries.values() if e.name in names]
            if not left:
                return
            if time.monotonic() > deadline:
                raise L7LabError(f"the lab still holds {', '.join(sorted({e.name for e in left}))} "
                                 f"{EXPIRY_GRACE_S:g}s after their TTL ended: a connection to "
                                 f"{', '.join(sorted({e.address for e in left}))} is still open")
            time.sleep(EXPIRY_POLL_S)  # the learner's own thread removes them (fqdn/learner.py tick)

    async def observe(self, probe: Probe) -> Observation:
        netns, address = self._source(probe)
        lookup = None
        if self.policy is not None and looks_up(probe, self.policy):
            sc = self.lab.scenario
            assert sc.nameserver is not None
            lookup = await lookup_in_netns(netns, probe.destination.dns_name, sc.nameserver,
                                           sc.search_path(sc.pods[probe.source].namespace), probe.timeout)
            if not lookup.resolved:
                return Observation("unresolved", lookup.why,
                                   extra={"lookup": lookup.to_json(), "sport": lookup.last_sport,
                                          "translated": (sc.nameserver, DNS_PORT), "protocol": "UDP"})
            probe = replace(probe, destination=replace(probe.destination, ip=lookup.address))
        observed = await self._observe(probe, netns, address)
        if lookup is not None:
            observed.extra["lookup"] = lookup.to_json()
            observed.extra.setdefault("translated", (lookup.address, probe.destination.port))
        return observed

    async def _observe(self, probe: Probe, netns: str, address: str) -> Observation:
        sport = None
        if probe.destination.kind == "service" and self.policy is not None:
            # The backend the oracle judges, reached by choosing the source port (services.py).
            try:
                probe, sport = pin_probe(probe, self.policy.map_state(), address)
            except ValueError as exc:  # the backend the probe names is none of the service's now
                return Observation("error", str(exc))
        observed = await run_probe(probe, netns, sport)
        translated = service_backend_address(probe, self.policy.map_state(), self.lab.scenario) if self.policy else None
        if translated is not None:
            observed.extra["translated"] = translated  # what the kernel's events name
        return observed

    def _source(self, probe: Probe) -> tuple[str, str]:
        """(namespace, address) a probe leaves from: its pod's or world host's, or the node's own."""
        if probe.source == HOST_SOURCE:
            return self.lab.record.node, self.lab.scenario.node_ip
        ep = self.lab.record.endpoints[probe.source]
        return ep.netns, ep.ip

    def oracle(self, probe: Probe) -> str | None:
        if self.policy is None or not self.lab.enforcing or self.fqdn is None:
            return None
        try:
            return self.fqdn.expectation(probe)
        except ValueError:  # a probe pinned to a pod that is no backend of its service now
            return "error"

    def finish_step(self, results: list[ProbeResult]) -> None:
        """Attach to each probe the first event the datapath emitted for its flow."""
        if self.fqdn is not None:
            self.fqdn.end_step()
        if not self.lab.enforcing:
            return
        events = self.lab.datapath.poll_events()
        flows = kernel_flows(events, self.policy.map_state(), Directory.of_lab(self.lab))
        self._record_flows(flows)
        first: dict[tuple, flowrecord.Flow] = {}
        for flow in flows:
            # A ping is known by its echo id (ICMP has no ports).
            echo_id = flow.l4.icmp.echo_id if flow.l4.icmp is not None else None
            first.setdefault((flow.source.ip, flow.source.port, flow.destination.ip, flow.destination.port,
                              flow.l4.protocol, echo_id), flow)
        for r in results:
            src_ip = self._source(r.probe)[1]
            ping = r.probe.icmp is not None
            # To a service, the kernel's flow is the translated one (the backend's address and port).
            dst_ip, dst_port = r.observed.extra.get("translated", (r.probe.destination.ip, r.probe.destination.port))
            # An unresolved name: the kernel's side is its lookup's last query (to the nameserver).
            protocol = r.observed.extra.get("protocol", r.probe.protocol)
            flow = first.get((src_ip, 0 if ping else r.observed.extra.get("sport"), dst_ip, dst_port, protocol,
                              r.observed.extra.get("echo_id") if ping else None))
            if flow is not None:
                r.kernel = "unresolved" if r.observed.outcome == "unresolved" else outcome(flow)
                r.kernel_verdict = flow.verdict.value

    async def explain(self, result: ProbeResult) -> None:
        """The oracle's reasoning and the kernel's trace of the probe sent again with tracing on
        for its flow only (the policy is still the one this probe's step saw). A trace that
        cannot be taken leaves its reason in `trace_error`; the oracle's side stands alone."""
        if self.policy is None:
            return
        from .errors import L7LabError  # noqa: PLC0415
        from .policy import Flow  # noqa: PLC0415
        from .tracing import trace_in_lab  # noqa: PLC0415 - only when a probe is explained

        try:
            result.reasoning = self.fqdn.judge(result.probe)[0] if self.fqdn is not None else \
                self.policy.verdict(Flow.from_probe(result.probe))
        except ValueError as exc:  # a probe pinned to a pod that is no backend of its service now
            result.trace_error = str(exc)
            return
        if result.reasoning is None:
            result.trace_error = "the name did not resolve: there is no connection to trace"
            return
        if not self.lab.enforcing:
            result.trace_error = "the lab does not enforce policy"
            return
        try:
            result.trace = await trace_in_lab(self.lab, self.policy, result.probe)
        except L7LabError as exc:
            result.trace_error = str(exc)

    def _record_flows(self, flows: list[flowrecord.Flow]) -> None:
        """Into the lab's flows.jsonl, through the same writer as a lab agent, so `observe`
        shows the run's own traffic (after `run --keep`, or from another terminal meanwhile)."""
        from .lab import lab_dir  # noqa: PLC0415

        if not flows:
            return
        try:
            log = FlowLog(lab_dir(self.lab.name))
            try:
                log.write(flows)
            finally:
                log.close()
        except OSError:
            pass  # observation must never fail a run


class OracleExecutor:
    """Probes are answered by the resolver alone: what the kernel would do, without a kernel."""

    mode = "dry-run"

    def __init__(self, policy: PolicyEngine) -> None:
        self.policy = policy
        self.fqdn = FqdnOracle(policy)

    def apply_step(self, step: Step) -> None:
        if step.kind == "expire":
            self.fqdn.expire(step.expire)
            return
        self.policy.apply_step(step)

    async def observe(self, probe: Probe) -> Observation:
        try:
            decision, lookup, _ = self.fqdn.judge(probe)
        except ValueError as exc:  # a probe pinned to a pod that is no backend of its service now
            return Observation("error", str(exc))
        if decision is None:
            assert lookup is not None
            return Observation("unresolved", lookup.why)
        return Observation(decision.expectation, "; ".join(decision.trace[-1:]))

    def oracle(self, probe: Probe) -> str | None:
        return None

    def finish_step(self, results: list[ProbeResult]) -> None:
        self.fqdn.end_step()

    def close(self) -> None:
        return None

    async def explain(self, result: ProbeResult) -> None:
        with contextlib.suppress(ValueError):  # observed as an error already: nothing to explain
            result.reasoning = self.fqdn.judge(result.probe)[0]


async def _run_steps(scenario: Scenario, executor: Executor, report: RunReport, on_step: Any,
                     explain: bool) -> None:
    limit = asyncio.Semaphore(PROBE_CONCURRENCY)

    async def one(step: Step, probe: Probe) -> ProbeResult:
        async with limit:
            observed = await executor.observe(probe)
        return ProbeResult(step.index, step.name, probe, observed, executor.oracle(probe))

    for step in scenario.steps:
        if step.kind == "probes":
            results = list(await asyncio.gather(*(one(step, p) for p in step.probes)))
            executor.finish_step(results)
            if explain:
                for r in results:
                    if not r.passed:
                        await executor.explain(r)
            report.results.extend(results)
            report.steps.append({"step": step.index + 1, "name": step.name, "kind": "probes",
                                 "probes": len(results), "failed": sum(not r.passed for r in results)})
        else:
            executor.apply_step(step)
            report.steps.append({"step": step.index + 1, "name": step.name, "kind": step.kind})
        if on_step is not None:
            on_step(step, report)


def run_scenario(scenario: Scenario, executor: Executor, lab_name: str | None = None,
                 on_step: Any = None, explain: bool = False) -> RunReport:
    """Run every step; with `explain`, every probe that misses its expectation is explained
    (`ProbeResult.reasoning`) before the next step."""
    report = RunReport(scenario.path, lab_name or scenario.name, executor.mode)
    try:
        asyncio.run(_run_steps(scenario, executor, report, on_step, explain))
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()
    return report
