"""Renderers of flow records, kept apart from the record itself (`dataplane/flowrecord.py`):

    json_line(record)   the record as one compact JSON line: what flows.jsonl, l7-events.jsonl
                        and `observe --json` carry (docs/observability.md)
    outcome(flow)       the verdict in l7lab's own words: what `run` shows in its kernel column

People read flows as Hubble prints them (`observe`, dataplane/hubble.py). This module imports
nothing but the record, so the proxy process, which writes JSON lines only, loads no more.
"""

from __future__ import annotations

import json

from .flowrecord import Flow, FlowType, Record, Verdict


def json_line(record: Record) -> str:
    return json.dumps(record.to_json(), separators=(",", ":"))


def outcome(flow: Flow) -> str:
    """'DROP POLICY_DENIED at ingress of shop/api' / 'FORWARD at ingress of x/c by NetworkPolicy
    x/allow-y ingress[0]' / 'REDIRECT ... to proxy port 15001' for an L3_L4 record; for an L7
    record its verdict, status and the policies behind it: 'denied 403 (CiliumNetworkPolicy x/y)', with
    for a DNS answer the toFQDNs selectors it taught: 'forwarded 0 learned for matchPattern *.example.com (...)'."""
    if flow.type == FlowType.L7:
        text = flow.verdict.value
        if flow.http is not None:
            text += f" {flow.http.code}"
        elif flow.dns is not None:
            text += f" {flow.dns.rcode}" + (f" learned for {', '.join(flow.dns.learned)}" if flow.dns.learned else "")
        return text + (f" ({', '.join(flow.policy.policies)})" if flow.policy.policies else "")
    text = flow.verdict.value
    if flow.drop_reason not in ("", "NONE"):
        text += f" {flow.drop_reason}"
    ep = flow.deciding_endpoint
    if ep is not None:
        text += f" at {flow.direction.value} of {ep.name}"
    if flow.policy.rules:
        text += f" by {', '.join(flow.policy.rules)}"
    if flow.verdict == Verdict.REDIRECT:
        text += f" to proxy port {flow.proxy_port}"
    return text
