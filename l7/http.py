"""HTTP: the HTTP part of a flow record (Hubble's `flow.HTTP`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpFlow:
    """What a flow record says about one HTTP request and the answer it got."""

    method: str  # "" when the request could not be parsed
    url: str  # http://<host><path>
    path: str  # the request target as the rules matched it and as it was forwarded
    protocol: str  # "HTTP/1.1"
    code: int  # the status code sent to the client; 0 when none was sent

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.url, "path": self.path, "protocol": self.protocol,
                "code": self.code}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HttpFlow":
        return cls(str(data.get("method", "")), str(data.get("url", "")), str(data.get("path", "")),
                   str(data.get("protocol", "")), int(data.get("code", 0)))
