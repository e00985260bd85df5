"""The `trace` verb: send one probe through a running lab with tracing on for its flow only, and
print its life as a numbered timeline (dataplane/agent/tracer.py takes it, dataplane/trace.py builds it)."""

from __future__ import annotations

import argparse

from rich.text import Text

from ..errors import L7LabError
from .common import EXIT_OK, Verbs, emit_json, flow_arguments, lab_arguments, one_lab, say

EXAMPLE = """\
example:
  l7lab trace retail --from retail/frontend-app --to inventory-api:8080 --http 'DELETE /api/inventory/1'
  l7lab trace retail --from retail/frontend-app --to kube-dns:53 --dns example.com --json
"""


def render(trace: object) -> None:
    """The timeline for people: one block per phase, numbered steps, each with its code."""
    from ..trace import PHASE_TITLES, PHASES, Trace  # noqa: PLC0415

    assert isinstance(trace, Trace)
    say(f"trace of {trace.probe} (client port {trace.client[1]})", style="bold")
    for phase in PHASES:
        steps = trace.phase_steps(phase)
        if not steps:
            continue
        say("")
        say(PHASE_TITLES[phase], style="bold underline")
        for step in steps:
            say(f"{step.number:>3}. [{step.layer}] {step.title}")
            say(f"       at {step.where}; code {step.code}", style="dim")
            if step.note:
                say(f"       note: {step.note}", style="bold yellow")
    say("")
    say("summary", style="bold underline")
    for line in trace.summary():
        say(f"  {line}")
    say("")
    say(Text.assemble(("hint: ", "bold"), trace.hint()))


def cmd_trace(args: argparse.Namespace) -> int:
    from ..scenario import HOST_SOURCE, DnsQuery, load_scenario, make_probe  # noqa: PLC0415
    from ..agent.tracer import trace_running_lab  # noqa: PLC0415
    from .check import _parse_http  # noqa: PLC0415 - the request words `explain` takes

    rec = one_lab(args.lab)
    scenario = load_scenario(rec.scenario)
    dns = None
    if args.dns:
        if args.http:
            raise L7LabError("--http and --dns exclude each other: a flow is an HTTP request or a DNS query")
        dns = DnsQuery(args.dns.rstrip(".").lower())
    protocol = args.protocol or ("UDP" if dns else "TCP")
    probe = make_probe(scenario, args.source, args.to, protocol, _parse_http(args.http, args.header), dns=dns,
                       backend=args.backend)
    if probe.source not in rec.endpoints:
        if probe.source == HOST_SOURCE:
            raise L7LabError("l7lab trace sends its probe from a pod or a world host, not from the node; "
                             "l7lab explain --from node gives the oracle's reasoning")
        raise L7LabError(f"no pod or world host {probe.source!r} in lab {rec.lab}")
    trace = trace_running_lab(rec.lab, probe)
    if args.json:
        emit_json(trace.to_json())
    else:
        render(trace)
    return EXIT_OK


def register(verbs: Verbs) -> None:
    """Add trace."""
    p = verbs.add("trace", "send one probe with the datapath's trace points on and print its path, step by step",
                  cmd_trace)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLE
    lab_arguments(p, "the lab (up, served by its agent)")
    flow_arguments(p, "source pod, or a world host (traffic from outside the cluster)",
                   "to a service: the backend pod the probe is to reach (default: the first)",
                   "the HTTP request to send (default GET /)", "a DNS query for NAME (over UDP; --protocol TCP: over TCP)")
