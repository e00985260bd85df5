"""L7 records: one JSON object per request, appended as a line to the events file and kept in
memory (bounded) for tests and for whoever embeds the proxy.

Fields: time (unix seconds), method, url, path (normalized, as matched and forwarded), protocol,
status, latency_ms, verdict (forwarded | denied | error), reason, source / destination (ip, pod
name or "", identity; destination also port), rule_ids and policies (that allowed it, or whose
rules it failed).

The file is bounded: past L7LAB_LOG_ROTATE_BYTES (default 64 MiB) it becomes NAME.1 and a new
one begins (`dataplane.logfiles.RotatingLog`), so a busy lab keeps at most two files.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from dataplane.logfiles import RotatingLog


@dataclass
class L7Record:
    method: str
    url: str
    path: str
    protocol: str
    status: int
    latency_ms: float
    verdict: str  # forwarded | denied | error
    reason: str
    source: dict[str, Any]
    destination: dict[str, Any]
    rule_ids: list[int] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """Appends records to a rotated file (one JSON line each, one write per line) and keeps the
    last `keep` in memory. `max_bytes` overrides the size cap (default: L7LAB_LOG_ROTATE_BYTES)."""

    def __init__(self, path: str | None = None, keep: int = 10000, max_bytes: int | None = None) -> None:
        self.records: deque[L7Record] = deque(maxlen=keep)
        self._file: RotatingLog | None = RotatingLog(path, max_bytes) if path else None

    def emit(self, record: L7Record) -> None:
        self.records.append(record)
        if self._file is not None:
            try:
                self._file.write_line(json.dumps(record.to_json(), separators=(",", ":")))
            except OSError:
                pass  # observability must never break enforcement

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
