"""Renderers of flow records, kept apart from the record itself (`dataplane/flowrecord.py`):

    json_line(record)   the record as one compact JSON line: what flows.jsonl, l7-events.jsonl
                        and `observe --json` carry (docs/observability.md)
    describe(record)    one line for people, in l7lab's own words (`observe` prints Hubble's: dataplane/hubble.py)
    outcome(flow)       the verdict part of that line: what `run` shows in its kernel column

Text is the record's own: only the verdict is styled, and every other part (paths, names,
policy names, details) is printed verbatim, never read as markup, so an HTTP path like
`/a[b]/:x:` prints as sent. rich is imported only by `describe`, so the proxy process, which
writes JSON lines only, never loads it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .flowrecord import Flow, FlowType, ProxyEvent, Record, Verdict

if TYPE_CHECKING:
    from rich.text import Text

COLOURS = {Verdict.FORWARD: "green", Verdict.REDIRECT: "cyan", Verdict.DROP: "red", Verdict.AUDIT: "yellow",
           Verdict.FORWARDED: "green", Verdict.DENIED: "red", Verdict.ERROR: "yellow"}


def json_line(record: Record) -> str:
    return json.dumps(record.to_json(), separators=(",", ":"))


def outcome(flow: Flow) -> str:
    """'DROP POLICY_DENIED at ingress of shop/api' / 'FORWARD at ingress of x/c by NetworkPolicy
    x/allow-y ingress[0]' / 'REDIRECT ... to proxy port 15001' for an L3_L4 record; for an L7
    record its verdict, status and the policies behind it: 'denied 403 (CiliumNetworkPolicy x/y)'."""
    if flow.type == FlowType.L7:
        text = flow.verdict.value
        if flow.http is not None:
            text += f" {flow.http.code}"
        elif flow.dns is not None:
            text += f" {flow.dns.rcode}"
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


def describe(record: Record) -> "Text":
    """One line for people; only the verdict is styled."""
    from rich.text import Text  # noqa: PLC0415 - see the module docstring

    if isinstance(record, ProxyEvent):  # the agent's note of the L7 proxy exiting or coming back
        return Text(f"PROXY {record.event}: {record.detail}")
    src, dst = record.source, record.destination
    left = src.name or src.ip
    right = f"{dst.name or dst.ip}:{dst.port}"
    verdict = record.verdict.value
    rest = outcome(record)[len(verdict):]
    if record.type == FlowType.L3_L4:
        return Text.assemble(f"L3/L4 {left} -> {right} {record.l4.protocol} ", (verdict, COLOURS[record.verdict]), rest)
    if record.dns is not None:
        what = f"DNS {'/'.join(record.dns.qtypes)} {record.dns.query}"
    else:
        http = record.http
        what = f"{http.method} {http.path}" if http is not None else ""
    return Text.assemble(f"L7    {left} -> {right} {what} ", (verdict, COLOURS[record.verdict]), rest)
