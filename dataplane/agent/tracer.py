"""`l7lab trace` on a lab its agent serves: the client's side of the agent's trace ops.

Responsibility: name the traced flow before its first packet (a chosen source port in the
client pod), ask the agent to start the trace ("trace-start": it sets the per-flow flags and
answers with the oracle's decision), send the probe from inside the client pod, wait for the
proxy's L7 record when the flow was redirected, and stop the trace in `finally` ("trace-stop":
the agent drains the ring buffers, clears the flags and returns the events and the lab's
names). The timeline is assembled by `dataplane.trace`; the pieces shared with a trace taken
in-process are in `dataplane.tracing`, which must not import the agent (the agent's service
uses those pieces), hence this module.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from .. import timescale, topology
from ..datapath import TraceEvent
from ..errors import SetupError
from ..flowrecord import Flow
from ..flows import PROXY_RECORDS, RecordTail
from ..lab import LabRecord, lab_dir
from ..probes import Observation, run_probe
from ..scenario import Probe, load_scenario
from ..trace import BpfSources, Trace, assemble
from ..tracing import (
    L7_RECORD_DEADLINE,
    SETTLE_MS,
    client_records,
    free_source_port,
    names_from_json,
    new_trace_id,
    probe_request,
    probe_text,
    traced_flows,
)
from .process import request


def trace_running_lab(lab_name: str, probe: Probe) -> Trace:
    """Trace `probe` in lab `lab_name`, which its agent serves (`l7lab up`)."""
    record = LabRecord.load(lab_name)
    if record is None:
        raise SetupError(f"no lab named {lab_name!r} is up")
    endpoint = record.endpoints.get(probe.source)
    if endpoint is None:  # a pod, or a world host (ingress from outside the cluster)
        raise SetupError(f"no pod or world host {probe.source!r} in lab {lab_name}")
    node_ip = load_scenario(record.scenario).node_ip
    sport = free_source_port(endpoint.netns, probe.protocol)
    client = (endpoint.ip, sport)
    trace_id = new_trace_id()
    tail = RecordTail(lab_dir(lab_name), (PROXY_RECORDS,))
    tail.start_at_last(0)
    started = request(lab_name, {"op": "trace-start", "trace_id": trace_id, "probe": probe_request(probe),
                                 "flows": traced_flows(probe, endpoint.ip, sport, node_ip)})
    if not started.get("ok"):
        raise SetupError("; ".join(started.get("errors", ["the agent refused the trace"])))
    if started.get("sport"):
        # A probe to a service: the agent pinned its backend; send from the port that reaches it.
        sport = int(started["sport"])
        client = (endpoint.ip, sport)
        probe = replace(probe, destination=replace(probe.destination, backend=str(started.get("backend") or "")))
    records: list[Flow] = []
    try:
        observed: Observation = asyncio.run(run_probe(probe, endpoint.netns, sport))
        # The proxy writes its record before it answers the client, so it is normally there
        # already; a flow the oracle expects at the proxy gets a deadline for a slow write.
        client_records(tail, client, records)
        deadline = time.monotonic() + timescale.scaled(L7_RECORD_DEADLINE)
        expects_proxy = "REDIRECT" in (started["oracle"].get("egress"), started["oracle"].get("ingress"))
        while expects_proxy and not records and time.monotonic() < deadline:
            time.sleep(SETTLE_MS / 1000)
            client_records(tail, client, records)
    finally:
        # Every event of the request and its reply was written to the ring buffer before the
        # packet that caused it went on (the programs emit in line), and the client has seen
        # the reply: the agent's drain at trace-stop finds them all.
        stopped = request(lab_name, {"op": "trace-stop", "trace_id": trace_id})
    if not stopped.get("ok"):
        raise SetupError("; ".join(stopped.get("errors", ["the agent lost the trace"])))
    events = [TraceEvent.from_json(e) for e in stopped["events"]]
    return assemble(probe=probe_text(probe), client=client, events=events, l7_records=records,
                    routing=topology.proxy_routing(record.node), oracle=stopped["oracle"],
                    names=names_from_json(stopped["names"]), observed=observed, sources=BpfSources(),
                    trace_id=trace_id)
