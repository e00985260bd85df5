"""A lab's records read back as Hubble events, filtered and windowed as `hubble observe` does.

`l7lab observe` and `l7lab monitor` read the lab's record files (`dataplane/flows.py`'s
`RecordTail`), turn each record into the Hubble flows it stands for (`dataplane/hubble.py`'s
`hubble_flows`), and keep those that pass Hubble's filters (`dataplane/hubblefilter.py`), the
time window (`--since` / `--until`) and the count (`--last N`, the last N that pass). This module
does that reading; the verbs only print.

The agent's notes about the L7 proxy (a `ProxyEvent`: exited, restart failed, restarted) are
Hubble agent events here (`{"agent_event": {"type": "AGENT_EVENT_UNKNOWN", "unknown": {"type":
"proxy exited", "notification": ...}}}`, the shape Hubble gives a notification it has no type
for). Like `hubble observe`, which prints flows and leaves agent events to `hubble observe
agent-events`, the Hubble outputs show them only when `--type agent` asks for them.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .flowrecord import Flow, ProxyEvent, Record
from .flows import RecordTail
from .hubble import hubble_flows, node_name, rfc3339
from .hubblefilter import AGENT_EVENT_TYPE, Filters, HubbleFlow

AGENT_EVENT_UNKNOWN = "AGENT_EVENT_UNKNOWN"


def agent_event(event: ProxyEvent, node: str) -> HubbleFlow:
    """A ProxyEvent as a Hubble agent event, with the time and node name beside it as Hubble's
    GetAgentEventsResponse carries them."""
    detail = event.detail
    if event.pid is not None and f"pid {event.pid}" not in detail:
        detail += f" (pid {event.pid})"
    return {"agent_event": {"type": AGENT_EVENT_UNKNOWN,
                            "unknown": {"type": f"proxy {event.event}", "notification": detail}},
            "node_name": node, "time": rfc3339(event.time)}


def hubble_events(record: Record, node: str) -> list[HubbleFlow]:
    """The Hubble flows of a record, or the agent event of a ProxyEvent."""
    return hubble_flows(record, node) if isinstance(record, Flow) else [agent_event(record, node)]


def event_time(event: HubbleFlow) -> float:
    """Unix time of a Hubble flow or agent event (its RFC 3339 `time`)."""
    text = str(event.get("time") or "")
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def asks_for_agent_events(filters: Filters) -> bool:
    """Whether a whitelist filter names `--type agent` (the Hubble outputs show agent events only then)."""
    return any(t.type == AGENT_EVENT_TYPE for f in filters.whitelist for t in f.event_type)


@dataclass
class Window:
    """Which events to show: the filters, the time window, and whether agent events may be shown."""

    filters: Filters = field(default_factory=Filters)
    since: float | None = None
    until: float | None = None
    agent_events: bool = True

    def admits(self, event: HubbleFlow) -> bool:
        if "agent_event" in event and not self.agent_events:
            return False
        if self.since is not None or self.until is not None:
            when = event_time(event)
            if (self.since is not None and when < self.since) or (self.until is not None and when > self.until):
                return False
        return self.filters.matches(event)


@dataclass
class Observer:
    """Reads a lab's records as Hubble events: `history()` what the files hold now (the window
    and `--last`), then `follow()` what arrives next. `by_record` makes the unit a record (for
    `--json`, which prints l7lab's own records): a record is shown when any of its events is."""

    lab_dir: Path
    lab: str
    window: Window
    last: int | None = None
    by_record: bool = False
    tail: RecordTail = field(init=False)

    def __post_init__(self) -> None:
        self.tail = RecordTail(self.lab_dir)
        self.node = node_name(self.lab)

    def _shown(self, records: list[Record]) -> Iterator[tuple[Record, list[HubbleFlow]]]:
        for record in records:
            events = [e for e in hubble_events(record, self.node) if self.window.admits(e)]
            if events:
                yield record, events

    def start_at_end(self) -> None:
        """Skip what the files hold: follow() gives only what is written from now on."""
        self.tail.start_at_last(0)

    def history(self) -> list[tuple[Record, list[HubbleFlow]]]:
        """What the files hold that the window admits; with `last`, only the last N events (or
        records). Without filters, `--last N` reads just the end of each file, N records back,
        unless those show fewer than N (agent events, which the Hubble outputs leave out): then
        that file is read whole, as every file is with filters, to find the last N shown."""
        if self.last is not None and not self.window.filters and self.window.since is None:
            records: list[Record] = []
            for name in self.tail.names:
                one = RecordTail(self.lab_dir, (name,))
                one.start_at_last(self.last)
                got = one.read()
                if self._count(list(self._shown(got))) < self.last:
                    one = RecordTail(self.lab_dir, (name,))
                    got = one.read()
                self.tail.files[name] = one.files[name]  # follow() goes on from there
                records += got
            records.sort(key=lambda r: r.time)
            shown = list(self._shown(records))
        else:
            if self.window.since is not None:
                self.tail.start_at_time(self.window.since)
            shown = list(self._shown(self.tail.read()))
        if self.last is None:
            return shown
        if self.by_record:
            return shown[-self.last:] if self.last else []
        kept: deque[tuple[Record, HubbleFlow]] = deque(((r, e) for r, events in shown for e in events),
                                                       maxlen=self.last)
        out: list[tuple[Record, list[HubbleFlow]]] = []
        for record, event in kept:
            if out and out[-1][0] is record:
                out[-1][1].append(event)
            else:
                out.append((record, [event]))
        return out

    def _count(self, shown: list[tuple[Record, list[HubbleFlow]]]) -> int:
        return len(shown) if self.by_record else sum(len(events) for _, events in shown)

    def follow(self, deadline: float | None = None, every: float = 0.2) -> Iterator[tuple[Record, list[HubbleFlow]]]:
        """New records as they are written, until `deadline` (time.monotonic()) or forever."""
        while True:
            yield from self._shown(self.tail.read())
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(every if deadline is None else max(0.0, min(every, deadline - time.monotonic())))
