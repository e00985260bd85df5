"""DNS: the DNS part of a flow record (Hubble's `flow.DNS`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DnsFlow:
    """What a flow record says about one DNS question and the answer it got."""

    query: str  # the name asked, lower case, without the trailing dot ("" if unparseable)
    qtypes: tuple[str, ...]  # question types, e.g. ("A",)
    rcode: int  # the RCODE of the answer sent to the client (0 NOERROR, 5 REFUSED); -1: none sent

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "qtypes": list(self.qtypes), "rcode": self.rcode}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DnsFlow":
        return cls(str(data.get("query", "")), tuple(str(t) for t in data.get("qtypes", ())),
                   int(data.get("rcode", -1)))
