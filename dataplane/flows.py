"""Flow records: the one format in which a lab reports what happened to its traffic.

Two producers write JSON lines into the lab's directory (/run/l7lab/<lab>/):

    flows.jsonl      the kernel's L3/L4 events (one per new-flow verdict and per drop), written
                     by the lab agent from the datapath's ring buffer: `kernel_record()` here
    l7-events.jsonl  the L7 proxy's records (one per HTTP request): `proxy/events.py`

Both carry `time` (unix seconds), `source` and `destination` objects ({ip, port, pod,
identity}) and `verdict`; a kernel record has `type: "flow"`, an L7 record `type: "l7"` (added
when read: the proxy's own lines have no `type`). `observe` merges the two by time. The agent
also writes `type: "proxy"` records into flows.jsonl when the L7 proxy exits or is restarted
(`time`, `event`, `detail`, `pid`). Each file is renamed to NAME.1 past a size cap
(`dataplane/logfiles.py`); `RecordTail` follows both across the rename and can start from
their ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text

from .abi import PROTOCOL_NAMES as PROTOCOLS, TCP_FLAG_NAMES
from .logfiles import FollowedFile, json_lines

KERNEL_FLOWS = "flows.jsonl"
PROXY_RECORDS = "l7-events.jsonl"


def address_names(lab: Any) -> dict[str, str]:
    """Address -> name for a lab's flow records: its pods and world hosts, and "node" (the
    node's own stack, which is also where the L7 proxy's upstream connections come from)."""
    names = {ep.ip: key for key, ep in lab.record.endpoints.items()}
    names[lab.scenario.node_ip] = "node"
    return names


def kernel_record(ev: Any, state: Any, names: dict[str, str], when: float) -> dict[str, Any]:
    """A datapath FlowEvent as a flow record; `names` maps addresses to pod / world host names,
    `state` (the MapState in force) names the endpoint and the policy rule that decided."""
    rule = state.rules.get(ev.rule_id) if ev.rule_id else None
    endpoint = state.endpoints.get(ev.endpoint_id)
    return {
        "type": "flow",
        "time": round(when, 6),
        "verdict": ev.verdict.name,
        "reason": ev.reason.name,
        "direction": ev.direction.name.lower(),
        "endpoint": endpoint.name if endpoint is not None else "",
        "hook": ev.hook.name.lower(),
        "protocol": PROTOCOLS.get(ev.protocol, str(ev.protocol)),
        "source": {"ip": ev.src, "port": ev.sport, "pod": names.get(ev.src, ""), "identity": ev.src_identity},
        "destination": {"ip": ev.dst, "port": ev.dport, "pod": names.get(ev.dst, ""), "identity": ev.dst_identity},
        "policy": f"{rule.policy} {rule.section}[{rule.rule_index}]" if rule is not None else "",
        "proxy_port": ev.proxy_port,
        "tcp_flags": [name for bit, name in TCP_FLAG_NAMES if ev.tcp_flags & bit] if ev.protocol == 6 else [],
        "bytes": ev.length,
    }


def write_kernel_records(out: Any, events: list[Any], state: Any, names: dict[str, str]) -> None:
    """Append `events` to an open flows file as JSON lines (wall-clock time, like the proxy's
    records: kernel timestamps are CLOCK_MONOTONIC)."""
    offset = time.time() - time.monotonic_ns() / 1e9
    for ev in events:
        out.write(json.dumps(kernel_record(ev, state, names, offset + ev.ts_ns / 1e9), separators=(",", ":")) + "\n")


def describe(rec: dict[str, Any]) -> Text:
    """One line for people. Only the verdict is styled; every other part (paths, names, details)
    is the record's own text, never read as markup: an HTTP path like `/a[b]/:x:` prints as sent."""
    if rec.get("type") == "proxy":  # the agent's record of the L7 proxy exiting or coming back
        return Text(f"PROXY {rec.get('event', '')}: {rec.get('detail', '')}")
    src, dst = rec.get("source", {}), rec.get("destination", {})
    left = src.get("pod") or src.get("ip", "")
    right = f"{dst.get('pod') or dst.get('ip', '')}:{dst.get('port', '')}"
    verdict = str(rec.get("verdict", ""))
    if rec.get("type") == "flow":
        colour = {"FORWARD": "green", "REDIRECT": "cyan", "DROP": "red", "AUDIT": "yellow"}.get(verdict, "white")
        rest = ""
        if rec.get("reason") not in (None, "", "NONE"):
            rest += f" {rec['reason']}"
        if rec.get("endpoint"):
            rest += f" at {rec.get('direction', '')} of {rec['endpoint']}"
        if rec.get("policy"):
            rest += f" by {rec['policy']}"
        if verdict == "REDIRECT":
            rest += f" to proxy port {rec.get('proxy_port')}"
        return Text.assemble(f"L3/L4 {left} -> {right} {rec.get('protocol', '')} ", (verdict, colour), rest)
    colour = {"forwarded": "green", "denied": "red"}.get(verdict, "yellow")
    policies = ", ".join(rec.get("policies", []))
    return Text.assemble(f"L7    {left} -> {right} {rec.get('method', '')} {rec.get('path', '')} ", (verdict, colour),
                         f" {rec.get('status', '')}" + (f" ({policies})" if policies else ""))


RECORD_FILES = {KERNEL_FLOWS: "flow", PROXY_RECORDS: "l7"}


@dataclass
class RecordTail:
    """Reads complete new lines from a lab's record files, remembering where it stopped in each
    and following each across its rotation (`NAME.1`); `start_at_last` / `start_at_time` skip
    to the end of the files without reading what comes before."""

    lab_dir: Path
    names: tuple[str, ...] = tuple(RECORD_FILES)
    files: dict[str, FollowedFile] = field(default_factory=dict)

    def _file(self, name: str) -> FollowedFile:
        if name not in self.files:
            self.files[name] = FollowedFile(self.lab_dir / name)
        return self.files[name]

    def start_at_last(self, count: int) -> None:
        """The next read() starts with (at most) the last `count` records of each file."""
        for name in self.names:
            self._file(name).start_at_last(count)

    def start_at_time(self, since: float) -> None:
        """The next read() starts with the first record of each file at or after `since`."""
        for name in self.names:
            self._file(name).start_at_time(since)

    def read(self) -> list[dict[str, Any]]:
        """New records of every file since the last call, in time order."""
        out: list[dict[str, Any]] = []
        for name in self.names:
            kind = RECORD_FILES.get(name, "")
            out += [{"type": kind, **rec} for rec in self.lines(name)]
        out.sort(key=lambda r: r.get("time", 0.0))
        return out

    def lines(self, name: str) -> Iterator[dict[str, Any]]:
        """New complete records of one file (KERNEL_FLOWS or PROXY_RECORDS) since the last call;
        a torn line after a crash is skipped, never a reason to stop observing."""
        return json_lines(self._file(name).read())
