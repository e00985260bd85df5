"""The proxy's client of the lab's FQDN learner: an answer's addresses are learned before the
answer is released to the client.

`toFQDNs` works as in Cilium: a pod asks for a name through a DNS rule, and the addresses in the
answer must be allowed for the toFQDNs selectors that match the name *before* the pod can use
them, or its first connection would meet a policy that does not know them yet. So, for every
upstream answer it relays (NOERROR with at least one A or AAAA record), the DNS side of the proxy
(`proxy.dns`) asks the learner -- a Unix stream socket served by the process that owns the lab's
policy (`python -m proxy --fqdn-socket PATH`) -- and releases the answer only once the learner
said the policy is updated, or after LEARN_TIMEOUT_S.

Wire protocol: JSON lines both ways on one persistent connection (opened on first use, opened
again on the next request after any error); every request carries an integer `id` and its reply
echoes it, so several requests may be in flight and replies may come in any order:

    -> {"id": 7, "op": "learn", "endpoint_ip": "10.200.0.3", "src_identity": 256,
        "server": "10.200.0.2:53", "qname": "api.example.com", "qtype": "A", "rcode": 0,
        "records": [{"name": "api.example.com", "type": "CNAME", "ttl": 30, "data": "www.example.com"},
                    {"name": "www.example.com", "type": "A", "ttl": 30, "data": "203.0.113.20"}]}
    <- {"id": 7, "ok": true, "learned": [{"selector": "FQDN matchPattern *.example.com", "ips": ["203.0.113.20"]}]}
    <- {"id": 7, "ok": false, "error": "..."}

Failure is never an error for the client: on a timeout, an error reply, a broken or missing
learner the answer is still released, the policy is simply not updated (the connection that
follows is then dropped by the datapath: fail closed), and `LearnResult.error` says why, for the
flow record. Nothing here blocks the event loop: a slow learner delays only the answers that
wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any, NamedTuple

import dns.message
import dns.rcode
import dns.rdatatype

LEARN_TIMEOUT_S = 2.0  # the longest an answer waits for the learner (python -m proxy --learn-timeout)
MAX_REPLY_LINE = 1 << 20  # a reply line longer than this is a broken learner: the connection is dropped
MAX_ERROR_TEXT = 200  # of a learner's error message, in a flow record
# The records of an answer the learner is told about (its A, AAAA and CNAME records): Cilium keeps
# at most 50 addresses per name (--tofqdns-endpoint-max-ip-per-hostname), a CNAME chain a few more.
LEARN_RECORDS = 64
LEARNED_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME)


class LearnResult(NamedTuple):
    """What the learner made of one answer."""

    ok: bool  # the policy is updated for the answer's addresses (`learned` may still be empty)
    learned: tuple[str, ...]  # the selectors the addresses now feed, e.g. "matchPattern *.example.com"
    error: str  # why the policy was not updated ("" when ok)


class LearnerError(Exception):
    """The connection to the learner broke, or it said something that is not the protocol."""


class FqdnLearner:
    """One persistent connection to the learner's socket, shared by every query of the proxy."""

    def __init__(self, path: str, timeout: float = LEARN_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task | None = None
        self._connecting: asyncio.Lock | None = None
        self._write_lock: asyncio.Lock | None = None

    async def learn(self, fields: dict[str, Any]) -> LearnResult:
        """Send one `learn` request (`fields`: everything but `id` and `op`) and wait for its
        reply, at most `timeout` seconds in all (connecting included)."""
        request_id = next(self._ids)
        line = json.dumps({"id": request_id, "op": "learn", **fields}, separators=(",", ":")).encode() + b"\n"
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            async with asyncio.timeout(self.timeout):
                writer = await self._connection()
                if self._write_lock is None:
                    self._write_lock = asyncio.Lock()
                async with self._write_lock:  # one drain at a time; the write itself is whole
                    writer.write(line)
                    await writer.drain()
                answer = await reply
        except TimeoutError:
            return LearnResult(False, (), f"no reply from the FQDN learner within {self.timeout:g} s")
        except (OSError, LearnerError) as exc:
            return LearnResult(False, (), f"FQDN learner at {self.path} unavailable: {_why(exc)}")
        finally:
            self._pending.pop(request_id, None)
        return _result(answer)

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        self._drop(LearnerError("the proxy is stopping"))

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connection attempt at a time; the others use its result
            if self._writer is None:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY_LINE)
                self._writer = writer
                self._reading = asyncio.get_running_loop().create_task(self._read_replies(reader, writer))
            return self._writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand every reply to the request waiting for its id (a late reply, whose request gave
        up, is dropped); any break ends the connection and fails the requests in flight."""
        error: Exception = LearnerError("the learner closed the connection")
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break  # end of stream (possibly inside a line)
                try:
                    reply = json.loads(line)
                    request_id = reply["id"] if isinstance(reply, dict) else None
                except (ValueError, KeyError):
                    error = LearnerError(f"a reply that is not a JSON object with an id: {line[:80]!r}")
                    break
                waiting = self._pending.get(request_id) if isinstance(request_id, int) else None
                if waiting is not None and not waiting.done():
                    waiting.set_result(reply)
        except (ValueError, asyncio.LimitOverrunError):
            error = LearnerError(f"a reply line longer than {MAX_REPLY_LINE} bytes")
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = exc
        finally:
            if self._writer is writer:
                self._reading = None
                self._drop(error)
            else:
                writer.close()

    def _drop(self, error: Exception) -> None:
        """Close the connection (the next request opens a new one) and fail what waits on it."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        for waiting in self._pending.values():
            if not waiting.done():
                waiting.set_exception(error)


def _result(reply: dict[str, Any]) -> LearnResult:
    if reply.get("ok") is True:
        learned = reply.get("learned", [])
        if not isinstance(learned, list) or not all(
                isinstance(item, dict) and isinstance(item.get("selector"), str) for item in learned):
            return LearnResult(False, (), f"malformed reply from the FQDN learner: {json.dumps(reply)[:120]}")
        return LearnResult(True, tuple(dict.fromkeys(item["selector"] for item in learned)), "")
    error = reply.get("error")
    text = error if isinstance(error, str) and error else f"malformed reply {json.dumps(reply)[:120]}"
    return LearnResult(False, (), f"the FQDN learner refused: {text[:MAX_ERROR_TEXT]}")


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------- requests and notes


def learns(message: dns.message.Message) -> bool:
    """Whether an answer is one the learner is told about: NOERROR with an address in it."""
    return message.rcode() == dns.rcode.NOERROR and any(
        rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rrset in message.answer)


def learn_request(client_ip: str, src_identity: int, server: tuple[str, int], name: str, qtype: str,
                  message: dns.message.Message) -> dict[str, Any]:
    """The fields of a `learn` request for an answer relayed to `client_ip` (of `src_identity`)
    from `server`: its A, AAAA and CNAME records (at most LEARN_RECORDS), names lower case
    without the final dot, a CNAME's data its target."""
    records: list[dict[str, Any]] = []
    for rrset in message.answer:
        if rrset.rdtype not in LEARNED_TYPES:
            continue
        owner = rrset.name.to_text(omit_final_dot=True).lower()
        kind = dns.rdatatype.to_text(rrset.rdtype)
        for rdata in rrset:
            data = rdata.target.to_text(omit_final_dot=True).lower() if rrset.rdtype == dns.rdatatype.CNAME \
                else rdata.address
            records.append({"name": owner, "type": kind, "ttl": rrset.ttl, "data": data})
    return {"endpoint_ip": client_ip, "src_identity": src_identity, "server": f"{server[0]}:{server[1]}",
            "qname": name, "qtype": qtype, "rcode": message.rcode(), "records": records[:LEARN_RECORDS]}


def learned_note(result: LearnResult) -> str:
    """What a flow record's summary adds about learning the answer's addresses."""
    if not result.ok:
        return (f"; policy not updated: {result.error} (the answer is released; connections to its "
                f"addresses stay dropped until learned)")
    if not result.learned:
        return "; no toFQDNs selector matches the name: nothing learned"
    return f"; learned before the answer was released, for {', '.join(result.learned)}"
