"""The lab's FQDN learner: the L7 proxy asks it, before it releases a DNS answer to a pod, to
learn the answer's addresses; it answers once the policy allows them.

The learner lives in the process that owns the lab's policy engine and datapath (the lab agent
after `l7lab up`, the runner during `l7lab run`) and serves a Unix stream socket in the lab's
directory (`fqdn.sock`). The proxy keeps one connection and sends JSON lines:

    {"id": 7, "op": "learn", "endpoint_ip": "10.0.1.5", "src_identity": 257, "server": "10.0.1.2:53",
     "qname": "api.example.com", "qtype": "A", "rcode": 0,
     "records": [{"name": ..., "type": "A" | "AAAA" | "CNAME", "ttl": 30, "data": ...}, ...]}

and gets `{"id": 7, "ok": true, "learned": [{"selector": ..., "ips": [...]}]}` (or `ok: false`
with `error`). Before the reply, the endpoint's FQDN cache (`cache.py`) takes the answer in and,
when what the caches give the `toFQDNs` selectors changed, the engine resolves the new state
and the lab writes it (the proxy's rules, then the maps): the first connection after the answer
finds its address allowed, as Cilium's DNS proxy waits for the ipcache and policy maps before it
releases an answer.

Every second (`tick`) expired entries are removed, unless the endpoint still has an open
connection to the address (read from the datapath's conntrack), and the policy is updated when
that changes what selectors select. `op: "cache"` returns the caches (`l7lab fqdn cache`).

One lock serialises the learner with the owner's other changes (`lock`): a learn request and a
policy change never interleave. The socket is served by a thread of its own, so a learn request
waits only for the work it causes, never for the owner's loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l7.dns import fqdn_matches

from .. import timescale
from ..policy.api import FQDNPeer
from .cache import AnswerRecord, FqdnCache

if TYPE_CHECKING:
    from ..lab import Lab
    from ..mapstate import MapState
    from ..policy.engine import PolicyEngine, Proposal

SOCKET_NAME = "fqdn.sock"
MAX_LINE = 256 * 1024  # a learn request carries at most an answer's records
MAX_RECORDS = 512
TICK_S = 0.5
SYNC_BUDGET_S = 1.5  # of the proxy's LEARN_TIMEOUT (2 s): the rest is the answer's way back (both scaled alike)


class FqdnLearner:
    """The FQDN caches of one lab and their effect on its policy.

    `enforce(proposal)` puts a proposal in force (writes the proxy's rules and the maps, then
    commits it in the engine); `open_connections()` gives the datapath's open flows as
    (source address, destination address), or None without a datapath."""

    def __init__(self, engine: "PolicyEngine", enforce: Callable[["Proposal"], None],
                 open_connections: Callable[[], set[tuple[str, str]] | None],
                 clock: Callable[[], float] = time.monotonic, lock: threading.RLock | None = None,
                 cache: FqdnCache | None = None) -> None:
        settings = engine.scenario.settings
        self.engine = engine
        self.cache = cache if cache is not None else \
            FqdnCache(settings.fqdn_min_ttl, settings.fqdn_max_ips_per_hostname)
        self.enforce = enforce
        self.open_connections = open_connections
        self.clock = clock
        self.lock = lock or threading.RLock()
        self.pod_by_ip = {p.ip: k for k, p in engine.scenario.pods.items()}
        self.errors = 0
        # Set when its owner stops serving it: a request still arriving on a connection accepted
        # before must not write a policy its owner no longer holds.
        self.closed = False

    # ------------------------------------------------------------------ requests

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = {"id": request.get("id")}
        try:
            if self.closed:
                raise RuntimeError("the learner has stopped")
            op = request.get("op")
            if op == "learn":
                reply.update(ok=True, learned=self.learn(request))
            elif op == "cache":
                with self.lock:
                    reply.update(ok=True, cache=self.cache_rows())
            else:
                raise ValueError(f"unknown op {op!r} (expected learn or cache)")
        except Exception as exc:  # noqa: BLE001 - the proxy releases the answer anyway; say why
            self.errors += 1
            reply.update(ok=False, error=str(exc) or repr(exc))
        return reply

    def learn(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        endpoint = self.pod_by_ip.get(str(request.get("endpoint_ip", "")))
        if endpoint is None:
            raise ValueError(f"no pod of the lab has address {request.get('endpoint_ip')!r}")
        raw = request.get("records") or []
        if not isinstance(raw, list) or len(raw) > MAX_RECORDS:
            raise ValueError(f"records: expected a list of at most {MAX_RECORDS} records")
        records = [AnswerRecord.from_json(r) for r in raw if str(r.get("type", "")).upper() in ("A", "AAAA", "CNAME")]
        with self.lock:
            entries = self.cache.learn(endpoint, str(request.get("qname", "")), records, self.clock(), time.time())
            self._sync()
            fed: dict[str, set[str]] = {}
            for selector in self.selectors():
                for e in entries:
                    if fqdn_matches(e.name, selector.match_name, selector.match_pattern):
                        fed.setdefault(selector.describe(), set()).add(e.address)
        return [{"selector": s, "ips": sorted(ips)} for s, ips in sorted(fed.items())]

    def selectors(self) -> list[FQDNPeer]:
        """Every toFQDNs selector of the policies in force (they are node-wide, as in Cilium)."""
        out: list[FQDNPeer] = []
        for policy in self.engine.policies.values():
            for spec in policy.specs:
                for rule in spec.rules:
                    out.extend(p for p in rule.peers if isinstance(p, FQDNPeer) and p not in out)
        return out

    def selectors_of(self, name: str) -> list[str]:
        return [s.describe() for s in self.selectors() if fqdn_matches(name, s.match_name, s.match_pattern)]

    # ------------------------------------------------------------------ time

    def tick(self) -> list[Any]:
        """Remove what has expired (kept while a connection is open); the entries removed."""
        with self.lock:
            if not self.cache.entries:
                return []
            now = self.clock()
            if not any(e.expires_at <= now for e in self.cache.entries.values()):
                return []
            flows = self.open_connections()
            open_pairs = None if flows is None else \
                {(self.pod_by_ip[s], d) for s, d in flows if s in self.pod_by_ip}
            removed = self.cache.expire(now, open_pairs)
            if removed:
                self._sync()
            return removed

    def sync(self) -> None:
        """Put in force what the caches hold (a learner taking over caches an earlier one filled)."""
        with self.lock:
            self._sync()

    def _sync(self) -> None:
        """Put in force what the caches now give the selectors, if that changed anything."""
        names, sources = self.cache.address_names(), self.cache.sources()
        state = self.engine.snapshot()
        if names == state.fqdn_names and sources == state.fqdn_sources:
            return
        self.enforce(self.engine.propose_fqdn(names, sources))

    def cache_rows(self) -> list[dict[str, Any]]:
        now = self.clock()
        rows = []
        for e in self.cache.rows():
            row = e.to_json()
            row["expires_in"] = round(e.expires_at - now, 1)
            row["selectors"] = self.selectors_of(e.name)
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------- the socket


def socket_path(lab: str) -> Path:
    """The learner's socket in the lab's own directory (the lab name is checked first)."""
    from .. import lab as labmod  # noqa: PLC0415

    return labmod.lab_dir(lab) / SOCKET_NAME


def _remove_socket(path: Path, lab: str) -> None:
    """Remove the socket at `path` as everything of a lab is removed: only inside the lab's own
    directory, never through a symbolic link (dataplane/safety.py)."""
    from .. import lab as labmod  # noqa: PLC0415
    from ..safety import remove_owned  # noqa: PLC0415

    remove_owned(path, lab, labmod.run_dir(), labmod.NETNS_ETC)


class LearnerServer:
    """Serves `learner` on a Unix socket in lab `lab`'s directory (`socket_path`) from threads of
    its own, and calls its `tick` every TICK_S; `close()` stops both and removes the socket
    (idempotent)."""

    def __init__(self, learner: FqdnLearner, lab: str) -> None:
        self.learner = learner
        self.lab = lab
        self.path = socket_path(lab)
        _remove_socket(self.path, lab)  # a socket left by a process that crashed
        self.connections: set[socket.socket] = set()
        handler = _handler_for(learner, self.connections)
        self.server = socketserver.ThreadingUnixStreamServer(str(self.path), handler)
        self.server.daemon_threads = True
        os.chmod(self.path, 0o600)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                          name="fqdn-learner", daemon=True),
                         threading.Thread(target=self._ticks, name="fqdn-expiry", daemon=True)]
        for t in self._threads:
            t.start()

    def _ticks(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.learner.tick()
            except Exception as exc:  # noqa: BLE001 - expiry must go on; the next tick tries again
                print(f"fqdn expiry: {exc!r}", flush=True)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        with self.learner.lock:
            self.learner.closed = True
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.connections):  # the proxy's connection ends with the server
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=timescale.scaled(5))
        _remove_socket(self.path, self.lab)

    def __enter__(self) -> "LearnerServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler_for(learner: FqdnLearner, connections: set[socket.socket]) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        def setup(self) -> None:
            super().setup()
            connections.add(self.request)

        def finish(self) -> None:
            connections.discard(self.request)
            with contextlib.suppress(OSError):
                super().finish()

        def handle(self) -> None:
            while True:
                line = self.rfile.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE or not line.endswith(b"\n"):
                    self._send({"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("expected a JSON object")
                except ValueError as exc:
                    self._send({"ok": False, "error": f"not a JSON request: {exc}"})
                    continue
                self._send(learner.handle(request))

        def _send(self, reply: dict[str, Any]) -> None:
            with contextlib.suppress(OSError):
                self.wfile.write(json.dumps(reply).encode() + b"\n")
                self.wfile.flush()

    return Handler


def ask(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to a learner (the CLI's `fqdn cache` when no agent relays it, and tests);
    `timeout` is an ordinary machine's seconds, scaled to this one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timescale.scaled(timeout))
        sock.connect(str(path))
        sock.sendall(json.dumps({"id": 1, **request}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def write_learned(lab: "Lab", old: "MapState", state: "MapState") -> None:
    """Put in force a state that what DNS taught changed: the proxy's rules, then the maps,
    within SYNC_BUDGET_S (scaled to this machine, as the proxy's wait for the learner is). A running
    proxy must confirm only when L7 rules came with it."""
    lab.sync_policy(state, deadline=time.monotonic() + timescale.scaled(SYNC_BUDGET_S), proxy_confirms=state.brings_l7_rules(old))


def enforcer(engine: "PolicyEngine", write: Callable[["MapState", "MapState"], None]) -> Callable[["Proposal"], None]:
    """`enforce` for a learner: write(old state, new state), then commit."""
    def enforce(proposal: "Proposal") -> None:
        write(proposal.before.resolution.state, proposal.map_state)
        engine.commit(proposal)
    return enforce
