"""The lab agent's service: what it does for one lab, apart from being a process.

`LabService` holds a lab that is up (its datapath, policy engine and proxy) and does, on the
agent's loop (`dataplane/agent/process.py` turns it):

- `poll()`: drain the ring buffer (every kernel flow event becomes a line of `flows.jsonl`,
  `dataplane/flows.py`) and let the proxy supervisor (`dataplane/supervisor.py`) see an exit or a
  restart's READY line;
- `every_second()`: rewrite `metrics.json` and take the snapshot Prometheus scrapes read
  (`dataplane/metrics.py`); say whether the lab is still up. Every record the agent writes
  (kernel flows) or reads (the proxy's L7 records) is counted as the Hubble flows it gives
  (`dataplane/hubble.py`) by Hubble's metric handlers (`dataplane/hubblemetrics.py`);
- `handle(request)`: answer one control request: `status`, or a `change` (apply / delete /
  relabel / audit) made all-or-nothing: the engine proposes the new state, the proxy confirms its rules
  and the maps are written, and only then does the engine commit it. The reply comes with how to
  undo the change, which the process part calls if the reply cannot be delivered. `trace-start`
  and `trace-stop` serve `l7lab trace` (`dataplane/agent/tracer.py`): the flows of a trace go into the
  datapath's trace map, the loop keeps the trace events of every active trace as it drains the
  ring buffers, and `trace-stop` hands them back with the oracle's decision and the lab's names.
  A trace nobody stopped within TRACE_LIFETIME is dropped, its map entries with it.
  `policy-dump` serves `l7lab policy get`: the policy map read back from the kernel, beside the
  map state in force and the identities (`dataplane/policymap.py`); `identity-list` serves
  `l7lab identity list`.
- the FQDN learner (`dataplane/fqdn/learner.py`) serves the L7 proxy from threads of its own:
  what DNS answers teach becomes policy before the answer reaches the pod. `lock` keeps its
  policy updates and the requests above from interleaving.

Deadlines: a change carries the monotonic time by which its caller stops waiting (now +
CHANGE_BUDGET when it was sent). A change that arrives after it is refused before anything is
touched; the proxy's confirmation gets no longer than the deadline (at most
PROXY_CONFIRM_TIMEOUT); a change that finished late is rolled back, within ROLLBACK_BUDGET. These
budgets are an ordinary machine's seconds, scaled to this one (dataplane/timescale.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import lab as labmod
from .. import limits, timescale
from ..errors import ErrorList, L7LabError, SourceError, SourceLocation
from ..flowrecord import Flow, ProxyEvent
from ..abi import PROTOCOL_NAMES, Direction
from ..flows import PROXY_RECORDS, Directory, FlowLog, RecordTail, kernel_flows
from ..fqdn.learner import FqdnLearner, LearnerServer, enforcer, write_learned
from ..hubble import hubble_flows, node_name
from ..hubblemetrics import HubbleCounters
from ..metrics import LabCollector, LabCounters, MetricsServer, MetricsSnapshot
from ..policy.notices import policy_notices
from ..scenario import AuditChange, PolicyRef, PolicySource, Relabel, Step, protected_label_change
from ..supervisor import ProxySupervisor

if TYPE_CHECKING:
    from ..mapstate import MapState

METRICS_NAME = "metrics.json"
CHANGE_BUDGET = 10.0  # seconds from a change's sending to its last effect (the proxy's confirmation, the maps)
PROXY_CONFIRM_TIMEOUT = 5.0  # of which a running proxy gets this long to confirm new rules (it takes milliseconds)
ROLLBACK_BUDGET = 2.0  # seconds the agent may then take to undo a change that failed or finished late
POLL_MS = 100
TRACE_LIFETIME = 60.0  # seconds a trace may stay active without its trace-stop
MAX_ACTIVE_TRACES = 8
MAX_TRACE_EVENTS = 20000  # per trace: a probe's flow gives tens; this bounds a runaway one

Undo = Callable[[str], None]  # undoes an applied change; the argument says why


class LabService:
    """Serves one lab that is up: flows, metrics, proxy supervision and policy changes."""

    def __init__(self, lab: labmod.Lab, metrics: MetricsServer | None = None) -> None:
        assert lab.datapath is not None and lab.policy is not None, "the agent serves an enforcing lab"
        self.lab = lab
        self.datapath = lab.datapath
        self.engine = lab.policy
        self.dir = labmod.lab_dir(lab.name)
        self.state = self.engine.map_state()  # the map state in force: it names the kernel's events
        self.metrics_server = metrics
        self.counters = LabCounters(HubbleCounters(self.isolating_policies))
        self.node_name = node_name(lab.name)
        self.snapshot = MetricsSnapshot()  # replaced whole, never changed: the scrape threads read it
        self.proxy_records = RecordTail(self.dir)
        self.directory = Directory.of_lab(lab)
        self.proxy = ProxySupervisor(lab, self._proxy_event)
        self.flows: FlowLog | None = None
        self.traces: dict[int, ActiveTrace] = {}
        self.lock = threading.RLock()
        self.learner = FqdnLearner(self.engine, enforcer(self.engine, self._enforce_learned),
                                   self.datapath.open_connections, lock=self.lock, cache=lab.fqdn_cache)
        self.learner_server: LearnerServer | None = None

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_server is None:
            return None
        host, port = self.metrics_server.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def open(self) -> None:
        """Open the flow records and start serving metrics (in the namespace the agent runs in)."""
        self.flows = FlowLog(self.dir)
        self.learner_server = LearnerServer(self.learner, self.lab.name)
        self.take_snapshot()
        if self.metrics_server is not None:  # its socket was bound in the root namespace by `up`
            self.metrics_server.serve(LabCollector(self.lab.name, lambda: self.snapshot))

    def close(self) -> None:
        if self.learner_server is not None:
            self.learner_server.close()
        for trace_id in list(self.traces):  # tracing state never outlives its trace, nor the agent
            self.end_trace(trace_id)
        if self.flows is not None:
            self.flows.close()
        if self.metrics_server is not None:
            self.metrics_server.close()

    # -- the loop's work -------------------------------------------------------------------
    def poll(self) -> None:
        """One turn of the loop: kernel events (waiting up to POLL_MS for them), then the proxy."""
        self.drain()
        self.proxy.tick()
        self.expire_traces()

    def every_second(self) -> bool:
        """The metrics, rewritten; False once the lab was taken down around the agent."""
        self.write_metrics()
        return labmod.record_path(self.lab.name).exists()

    # -- observation ---------------------------------------------------------------------
    def drain(self, timeout_ms: int = POLL_MS) -> None:
        events = self.datapath.poll_events(timeout_ms=timeout_ms)
        if self.traces:
            self.keep_trace_events(self.datapath.poll_traces(0))  # what that same poll brought
        if not events:
            return
        self.counters.flow_events.update(ev.verdict.name for ev in events)
        records = kernel_flows(events, self.state, self.directory)
        self.count_hubble(records)
        if self.flows is not None:
            self.flows.write(records)

    def count_hubble(self, records: list[Flow]) -> None:
        """Hubble's metrics of these records: each record's Hubble flows, through every handler."""
        for record in records:
            for flow in hubble_flows(record, self.node_name):
                self.counters.hubble.process(flow)

    def isolating_policies(self, namespace: str, pod: str, direction: str) -> list[tuple[str, str, str]]:
        """(kind, namespace, name) of the policies that make pod `namespace/pod` enforce
        `direction` ("INGRESS"/"EGRESS") under the map state in force: the ones a default deny
        there is due to (`MapState.isolating_policies`, which the service map asks too)."""
        d = Direction.INGRESS if direction == "INGRESS" else Direction.EGRESS
        return self.state.isolating_policies(f"{namespace}/{pod}", d)

    def _proxy_event(self, event: str, detail: str, pid: int | None) -> None:
        """A proxy lifecycle record in flows.jsonl (`observe` shows it among the flows), the agent's
        log, and at once in the metrics."""
        print(f"proxy {event}: {detail}", flush=True)
        if self.flows is not None:
            self.flows.write([ProxyEvent(round(time.time(), 6), event, detail, pid)])
        self.take_snapshot()

    def metrics(self, detail: dict | None = None) -> list[dict[str, Any]]:
        detail = self.datapath.metrics_detail() if detail is None else detail
        return [{"verdict": v.name, "reason": r.name, "direction": d.name.lower(), "packets": p, "bytes": b}
                for (v, r, d), (p, b) in sorted(detail.items())]

    def take_snapshot(self, detail: dict | None = None) -> None:
        """Read what the metrics report, here on the agent's loop, into a new immutable snapshot."""
        for record in self.proxy_records.records(PROXY_RECORDS):  # count what the proxy wrote since
            if isinstance(record, Flow) and record.l7 is not None:
                self.counters.l7_records[(record.l7.protocol or "?", record.verdict.value)] += 1
                self.count_hubble([record])
        detail = self.datapath.metrics_detail() if detail is None else detail
        self.snapshot = MetricsSnapshot.take(self.counters, detail, policies=len(self.engine.policies),
                                             proxy_up=self.proxy.up, proxy_restarts=self.proxy.restarts)

    def write_metrics(self) -> None:
        detail = self.datapath.metrics_detail()
        self.take_snapshot(detail)
        tmp = self.dir / (METRICS_NAME + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"time": time.time(), "metrics": self.metrics(detail)}))
            os.replace(tmp, self.dir / METRICS_NAME)

    # -- requests --------------------------------------------------------------------------
    def services(self) -> list[dict[str, Any]]:
        """Every service port with the backends it translates to now (the labels in force)."""
        return [{"service": e.service, "address": f"{e.ip}:{e.port}/{PROTOCOL_NAMES.get(e.protocol, e.protocol)}",
                 "affinity": e.affinity, "backends": [f"{b.pod} {b.ip}:{b.port}" for b in e.backends]}
                for e in self.engine.map_state().services.values()]

    def _enforce_learned(self, old: MapState, state: MapState) -> None:
        """Write a state that what DNS taught changed (the learner holds the lock)."""
        write_learned(self.lab, old, state)
        self.state = state

    def handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], Undo | None]:
        """The reply to one request, and for a change applied, how to undo it."""
        with self.lock:
            return self._handle(request)

    def _handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], Undo | None]:
        op = request.get("op")
        if op == "status":
            return {"ok": True, "pid": os.getpid(), "policies": self.policies(), "metrics": self.metrics(),
                    "metrics_url": self.metrics_url, "proxy": self.proxy.status(), "audit": self.audited(),
                    "services": self.services()}, None
        if op == "change":
            try:
                return self.change(request)
            except (SourceError, ErrorList, ChangeRefused) as exc:
                self.counters.changes["refused"] += 1
                if isinstance(exc, ChangeRefused):
                    print(f"change refused: {exc}", flush=True)
                return {"ok": False, "errors": [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])]}, None
            except L7LabError as exc:
                self.counters.changes["rolled back"] += 1
                return {"ok": False, "errors": [str(exc)]}, None
        if op == "trace-start":
            return self.trace_start(request), None
        if op == "trace-stop":
            return self.trace_stop(request), None
        if op == "policy-dump":
            return self.policy_dump(request), None
        if op == "identity-list":
            from ..policymap import identities_json  # noqa: PLC0415

            return {"ok": True, "identities": identities_json(self.engine.identities, self.state)}, None
        return {"ok": False, "errors": [f"unknown request {op!r}: expected 'change', 'status', 'trace-start', "
                                        "'trace-stop', 'policy-dump' or 'identity-list'"]}, None

    # -- inspection (l7lab policy get, l7lab identity list) -----------------------------------
    def policy_dump(self, request: dict[str, Any]) -> dict[str, Any]:
        """The policy map read back from the kernel beside the map state in force (of the
        endpoint named "namespace/pod", or of all), with the identities that name them; the
        CLI compares the two (`dataplane/policymap.py`)."""
        from ..policymap import dump_reply  # noqa: PLC0415

        name = request.get("endpoint")
        endpoint_id = None
        if name is not None:
            ids = [i for i, ep in self.state.endpoints.items() if ep.name == name]
            if not ids:
                known = ", ".join(sorted(ep.name for ep in self.state.endpoints.values()))
                return {"ok": False, "errors": [f"no endpoint {name!r} in lab {self.lab.name} (endpoints: {known})"]}
            endpoint_id = ids[0]
        try:
            kernel = self.datapath.read_policy()
        except ValueError as exc:  # an entry no layout of ours explains: the dump itself is the finding
            return {"ok": False, "errors": [f"the kernel's policy map holds an entry l7lab cannot read: {exc}"]}
        return dump_reply(kernel, self.state, self.engine.identities, endpoint_id)

    # -- traces (l7lab trace) ----------------------------------------------------------------
    def trace_start(self, request: dict[str, Any]) -> dict[str, Any]:
        """Trace the request's flows under its trace id; the reply carries the oracle's decision
        for the probe under the policy in force now."""
        from ..policy import Flow as OracleFlow  # noqa: PLC0415
        from ..tracing import check_flows, oracle_json, probe_from_request, trace_flow_objects  # noqa: PLC0415

        trace_id = request.get("trace_id")
        if not isinstance(trace_id, int) or not 1 <= trace_id <= 0xFFFFFFFF:
            raise ValueError("'trace_id' must be a number 1..4294967295")
        if trace_id in self.traces:
            return {"ok": False, "errors": [f"trace {trace_id} is already active"]}
        if len(self.traces) >= MAX_ACTIVE_TRACES:
            return {"ok": False, "errors": [f"{MAX_ACTIVE_TRACES} traces are active in lab {self.lab.name}: "
                                            "try again when one has ended"]}
        flows = check_flows(request.get("flows"))
        try:
            probe = probe_from_request(self.lab.scenario, request.get("probe") or {})
        except (SourceError, ErrorList) as exc:
            return {"ok": False, "errors": [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])]}
        pinned = None
        if probe.destination.kind == "service":
            # The backend the oracle judges, reached by a source port the agent picks (the
            # backends follow the labels in force, which only the agent knows): the client
            # sends from it, and the flows traced are the ones to the ClusterIP and the backend.
            pinned = self._pin_service_probe(probe)
            if isinstance(pinned, str):
                return {"ok": False, "errors": [pinned]}
            probe, flows = pinned[0], pinned[2]
        oracle = oracle_json(self.engine.verdict(OracleFlow.from_probe(probe)))
        self.drain(timeout_ms=0)  # earlier events are not this trace's
        try:
            self.datapath.trace_start(trace_id, trace_flow_objects(flows))
        except L7LabError as exc:
            self.datapath.trace_stop(trace_id)
            return {"ok": False, "errors": [str(exc)]}
        self.traces[trace_id] = ActiveTrace(time.monotonic(), oracle)
        reply: dict[str, Any] = {"ok": True, "trace_id": trace_id, "oracle": oracle}
        if pinned is not None:
            reply.update(sport=pinned[1], backend=probe.destination.backend)
        return reply

    def _pin_service_probe(self, probe: Any) -> tuple[Any, int | None, list[dict[str, Any]]] | str:
        """A probe to a service pinned to its backend (`services.pin_probe`): the probe, the
        source port to send from (None: any, with sessionAffinity ClientIP) and the flows to
        trace; or why it cannot be."""
        from ..services import pin_probe, service_backend_address  # noqa: PLC0415
        from ..tracing import check_flows, free_source_port, traced_flows  # noqa: PLC0415

        endpoint = self.lab.record.endpoints[probe.source]
        try:
            pinned, sport = pin_probe(probe, self.engine.map_state(), endpoint.ip)
        except ValueError as exc:
            return str(exc)
        sport = sport or free_source_port(endpoint.netns, pinned.protocol)
        backend = service_backend_address(pinned, self.engine.map_state(), self.lab.scenario)
        return pinned, sport, check_flows(traced_flows(pinned, endpoint.ip, sport, self.lab.scenario.node_ip, backend))

    def trace_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        """End a trace: its events, the oracle's decision and the lab's names."""
        from ..tracing import lab_names, names_json  # noqa: PLC0415

        trace_id = request.get("trace_id")
        if trace_id not in self.traces:
            return {"ok": False, "errors": [f"no active trace {trace_id!r} (a trace ends {TRACE_LIFETIME:g}s "
                                            "after it starts unless stopped before)"]}
        self.drain(timeout_ms=0)
        trace = self.end_trace(trace_id)
        names = lab_names(self.lab.record, self.state, self.engine.identities.describe, self.lab.scenario.node_ip)
        return {"ok": True, "trace_id": trace_id, "events": [e.to_json() for e in trace.events],
                "dropped_events": trace.dropped, "oracle": trace.oracle, "names": names_json(names)}

    def keep_trace_events(self, events: list[Any]) -> None:
        for ev in events:
            trace = self.traces.get(ev.trace_id)
            if trace is None:
                continue
            if len(trace.events) < MAX_TRACE_EVENTS:
                trace.events.append(ev)
            else:
                trace.dropped += 1

    def end_trace(self, trace_id: int) -> ActiveTrace:
        trace = self.traces.pop(trace_id)
        self.datapath.trace_stop(trace_id)
        return trace

    def expire_traces(self) -> None:
        now = time.monotonic()
        for trace_id, trace in list(self.traces.items()):
            if now - trace.started > TRACE_LIFETIME:
                self.end_trace(trace_id)
                print(f"trace {trace_id} dropped: not stopped within {TRACE_LIFETIME:g}s", flush=True)

    def replied(self, undo: Undo | None, lost: OSError | None = None) -> None:
        """The reply to a request was delivered (`lost` None) or could not be: a change whose
        caller was never told is undone, so nothing changes unseen."""
        with self.lock:
            self._replied(undo, lost)

    def _replied(self, undo: Undo | None, lost: OSError | None) -> None:
        if lost is not None:
            if undo is not None:
                undo(f"its reply could not be delivered ({lost.strerror or lost})")
                self.counters.changes["rolled back"] += 1
            return
        if undo is not None:
            self.counters.changes["applied"] += 1
        self.take_snapshot()

    def policies(self) -> list[str]:
        return sorted(p.display for p in self.engine.policies.values())

    def audited(self) -> list[str]:
        """The endpoints ("namespace/pod") in audit mode now."""
        return sorted(key for key, on in self.engine.audit.items() if on)

    def audit_changes(self, items: Any) -> tuple[list[AuditChange], list[SourceError]]:
        """The `audit` part of a change request, checked against the lab: [{"target": "pod" |
        "namespace" | "name" | "all", "name": ..., "on": bool}, ...]. A "name" is a pod when the
        lab has one of that name (`Scenario.pod_key`: NS/POD or a unique short name), else a
        namespace, as `l7lab audit` takes its arguments."""
        scenario, changes, errors = self.lab.scenario, [], []
        if not isinstance(items, list):
            return [], [SourceError(SourceLocation("audit"), "'audit' must be a list of {target, name, on}")]
        for item in items:
            where = SourceLocation("audit")
            target = item.get("target") if isinstance(item, dict) else None
            if target not in ("pod", "namespace", "name", "all"):
                errors.append(SourceError(where, f"target: expected 'pod', 'namespace', 'name' or 'all', got {target!r}"))
                continue
            if not isinstance(item.get("on"), bool):
                errors.append(SourceError(where, f"on: expected true or false, got {item.get('on')!r}"))
                continue
            name = str(item.get("name") or "")
            if target == "name":
                target = "namespace" if scenario.pod_key(name) is None and name in scenario.namespaces else "pod"
            if target == "pod":
                key = scenario.pod_key(name)
                if key is None:
                    errors.append(SourceError(where, f"no pod {name!r} in lab {self.lab.name} "
                                                     f"(pods: {', '.join(sorted(scenario.pods))})"))
                    continue
                name = key
            elif target == "namespace" and name not in scenario.namespaces:
                errors.append(SourceError(where, f"no namespace {name!r} in lab {self.lab.name} "
                                                 f"(namespaces: {', '.join(sorted(scenario.namespaces))})"))
                continue
            changes.append(AuditChange(target, name if target != "all" else "", item["on"]))
        return changes, errors

    def change(self, request: dict[str, Any]) -> tuple[dict[str, Any], Undo]:
        """Apply, delete, relabel and audit switches as one step: every part is checked before anything changes,
        and everything is done by the request's deadline or undone."""
        from ..yamlsource import Budget, load_documents  # noqa: PLC0415

        deadline = _change_deadline(request)
        engine, scenario = self.engine, self.lab.scenario
        errors: list[SourceError] = []
        sources: list[PolicySource] = []
        # The files of one change share one budget of values and bytes, as `l7lab apply` checks
        # them: splitting hostile input over many files buys nothing.
        budget, total = Budget(what="one change"), 0
        for item in request.get("apply", []):
            total += len(item["text"].encode("utf-8", "surrogatepass"))
            if total > limits.MAX_CHANGE_BYTES:
                raise SourceError(SourceLocation(item["path"]), f"the files of one change together exceed the "
                                                                f"limit of {limits.MAX_CHANGE_BYTES} bytes")
            try:
                sources += [PolicySource(doc) for doc in load_documents(item["text"], item["path"], budget)]
            except SourceError as exc:
                errors.append(exc)
        deletes = [PolicyRef(d["kind"], d["name"], d.get("namespace", "")) for d in request.get("delete", [])]
        for ref in deletes:
            if (ref.kind, ref.namespace, ref.name) not in engine.policies:
                what = f"{ref.kind} {ref.namespace + '/' if ref.namespace else ''}{ref.name}"
                errors.append(SourceError(SourceLocation("delete"), f"no policy {what} is applied "
                                                                    f"(applied: {', '.join(self.policies()) or 'none'})"))
        relabels = [Relabel(r["target"], r["name"], dict(r.get("set", {})), tuple(r.get("remove", ())))
                    for r in request.get("relabel", [])]
        for r in relabels:
            known = scenario.pods if r.target == "pod" else scenario.namespaces
            if r.name not in known:
                errors.append(SourceError(SourceLocation("label"), f"no {r.target} {r.name!r} in lab {self.lab.name} "
                                                                   f"(known: {', '.join(sorted(known))})"))
            elif r.target == "namespace" and (problem := protected_label_change(r.name, r.set, r.remove)):
                errors.append(SourceError(SourceLocation("label"), f"namespace {r.name}: {problem}"))
        audits, audit_errors = self.audit_changes(request.get("audit", []))
        errors += audit_errors
        ErrorList.raise_if_any(errors)
        if time.monotonic() >= deadline:  # checked again: the documents may have been slow to parse
            raise ChangeRefused("the change arrived after its caller's deadline and was not applied")
        self.proxy.tick()  # a proxy that died since the last tick is seen now
        if not self.proxy.ensure_ready(deadline) and self.proxy.state == "starting":
            raise ChangeRefused("the L7 proxy is restarting and was not ready in time; try again")
        before = self.policies()
        audit_before = dict(engine.audit)
        in_force = dict(engine.policies)  # an applied policy of a name in force is a new object
        proposal = engine.propose(Step(0, "l7lab change", tuple(sources), tuple(deletes), tuple(relabels),
                                       audit=tuple(audits)))
        self.drain(timeout_ms=0)  # earlier events are named by the state they were decided under
        old_state, state = self.state, proposal.map_state
        # A running proxy confirms every change. Without one, a change is refused if it brings L7
        # rules no proxy has confirmed; one that leaves them as they are (or removes them all)
        # goes through, and the restarted proxy loads it.
        proxy_confirms = self.proxy.up or state.brings_l7_rules(old_state)

        def restore_maps() -> None:
            with contextlib.suppress(Exception):  # never stop short of the maps for a slow proxy
                self.lab.sync_policy(old_state, deadline=time.monotonic() + timescale.scaled(ROLLBACK_BUDGET), proxy_confirms=False)
            self.state = old_state

        try:
            stats = self.lab.sync_policy(state, deadline=min(deadline, time.monotonic() + timescale.scaled(PROXY_CONFIRM_TIMEOUT)),
                                         proxy_confirms=proxy_confirms)
        except Exception as exc:  # noqa: BLE001 - the proxy did not confirm, a map refused an entry, ...
            restore_maps()  # the engine never committed the proposal: it still holds the old state
            print(f"change rolled back: {exc!r}", flush=True)
            raise L7LabError(f"the change could not be enforced and was rolled back: {exc}") from None
        engine.commit(proposal)
        self.state = state
        previous_labels = self.lab.relabel(relabels)

        def undo(why: str) -> None:
            engine.restore(proposal.before)
            restore_maps()
            with contextlib.suppress(OSError):
                self.lab.set_labels(previous_labels)
            print(f"change rolled back: {why}", flush=True)

        if time.monotonic() > deadline:  # the caller is about to give up: it must not be applied unseen
            undo("it finished after its caller's deadline")
            raise L7LabError("the change took longer than its deadline and was rolled back; nothing changed")
        after = self.policies()
        reply = {"ok": True, "policies": after, "added": sorted(set(after) - set(before)),
                 "replaced": sorted(p.display for key, p in engine.policies.items()
                                    if key in in_force and p is not in_force[key]),
                 "removed": sorted(set(before) - set(after)),
                 "map_writes": stats.total if stats is not None else 0,
                 # Endpoints whose audit mode this change switched on / off, and all in audit mode now.
                 "audit_on": sorted(k for k, on in engine.audit.items() if on and not audit_before.get(k)),
                 "audit_off": sorted(k for k, on in engine.audit.items() if not on and audit_before.get(k)),
                 "audit": self.audited()}
        # What the lab enforces differently in the policies this change applied (IPv6 CIDRs).
        notices = policy_notices(p for key, p in engine.policies.items() if in_force.get(key) is not p)
        if notices:
            reply["notices"] = notices
        if not self.proxy.up:
            reply["warnings"] = ["the L7 proxy is not running: flows redirected to it are dropped until it is back"]
        return reply, undo


@dataclass
class ActiveTrace:
    """A trace the agent serves: when it began, the oracle's decision, the events so far."""

    started: float
    oracle: dict[str, Any]
    events: list[Any] = field(default_factory=list)
    dropped: int = 0


class ChangeRefused(L7LabError):
    """A change turned down before anything was touched."""


def _change_deadline(request: dict[str, Any]) -> float:
    """The monotonic time by which a change must be done (the clock is the machine's, shared by
    the CLI and the agent); a change past it is refused before anything is touched."""
    deadline = request.get("deadline")
    now = time.monotonic()
    if deadline is None:
        return now + timescale.scaled(CHANGE_BUDGET)
    if not isinstance(deadline, (int, float)):
        raise TypeError("'deadline' must be a number (CLOCK_MONOTONIC seconds)")
    if deadline <= now:
        raise ChangeRefused(f"the change arrived {now - deadline:.1f}s after its caller's deadline "
                         "(the agent was busy or stopped) and was not applied")
    return min(float(deadline), now + timescale.scaled(CHANGE_BUDGET))
