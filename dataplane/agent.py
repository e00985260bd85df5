"""The lab agent: the process that keeps a lab started by `l7lab up` observable and changeable.

Only the process that loaded the BPF programs holds their maps and ring buffer. `l7lab up`
therefore forks this agent before anything is built; the agent compiles the datapath, builds
the lab and reports READY (or every error) through a pipe, and the command exits with that
answer. The agent then lives as long as the lab does:

- in the lab's node namespace and in the lab's record, so `down` and `clean` stop it like any
  other process of the lab;
- draining the ring buffer: every kernel flow event becomes a line of `flows.jsonl` in the lab
  directory (`dataplane/flows.py`), which `l7lab observe` merges with the proxy's L7 records;
- rewriting `metrics.json` (packets and bytes by verdict, reason and direction) every second;
- with `up --metrics HOST:PORT`, answering Prometheus scrapes on that loopback address from a
  thread of its own (`dataplane/metrics.py`), from a snapshot the loop takes every second: no
  scrape, however slow, holds the loop;
- supervising the L7 proxy (`dataplane/supervisor.py`): an exit is seen within a tick, recorded
  in `flows.jsonl` and the metrics, shown by `status`, and the proxy restarted with backoff;
- serving `agent.sock`: one JSON request per connection (`change`: apply / delete / relabel,
  all-or-nothing through the policy engine, then the proxy reload and the map diff that `run`
  uses; `status`: the applied policies, the proxy and the metrics).

A change is confirmed to its caller or not applied. The client sends a deadline with it (now +
CHANGE_BUDGET) and waits that long plus ROLLBACK_BUDGET and a margin; the agent refuses a change
that arrives after its deadline, gives the proxy's confirmation no longer than the deadline,
rolls back a change that finished late, and rolls back one whose reply it cannot deliver.

Until READY the agent dies with the command (PR_SET_PDEATHSIG): killing `up` midway never
leaves a builder running while `clean` removes what it made. `run --keep` hands the lab it ran
to an agent the same way (`adopt`): a forked child keeps the loaded programs and maps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import lab as labmod
from . import limits, safety
from . import topology
from .errors import ErrorList, L7LabError, SetupError, SourceError, SourceLocation
from .flowrecord import Flow, ProxyEvent
from .flows import PROXY_RECORDS, Directory, FlowLog, RecordTail, kernel_flows
from .metrics import LabCollector, LabCounters, MetricsServer, MetricsSnapshot
from .scenario import PolicyRef, PolicySource, Relabel, Scenario, Step
from .supervisor import ProxySupervisor

SOCKET_NAME = "agent.sock"
METRICS_NAME = "metrics.json"
BUILD_TIMEOUT = 300.0  # compile + namespaces + servers; the builder's own steps time out sooner
CHANGE_BUDGET = 10.0  # seconds from a change's sending to its last effect (the proxy's confirmation, the maps)
PROXY_CONFIRM_TIMEOUT = 5.0  # of which a running proxy gets this long to confirm new rules (it takes milliseconds)
ROLLBACK_BUDGET = 2.0  # seconds the agent may then take to undo a change that failed or finished late
REPLY_MARGIN = 3.0  # the reply's way back, on a loaded machine
REQUEST_TIMEOUT = CHANGE_BUDGET + ROLLBACK_BUDGET + REPLY_MARGIN  # the CLI's wait for a change's answer
STATUS_TIMEOUT = 5.0  # the CLI's wait for a status answer
RECEIVE_TIMEOUT = 2.0  # the agent's wait for a whole request
# A change carries at most MAX_CHANGE_BYTES of policy text; JSON escaping can make a byte six.
MAX_REQUEST = 6 * limits.MAX_CHANGE_BYTES + 64 * 1024
POLL_MS = 100
_PR_SET_PDEATHSIG = 1


def socket_path(lab: str) -> Path:
    return labmod.lab_dir(lab) / SOCKET_NAME


# --------------------------------------------------------------------------- starting (in `up`)


def start(scenario: Scenario, name: str, metrics: tuple[str, int] | None = None) -> dict[str, Any]:
    """Fork the agent, let it build lab `name` (serving Prometheus metrics on `metrics`, a
    loopback address, if given), and return its READY summary; raise what it hit."""
    labmod.check_absent(name)
    # Bound here, before anything is built: a busy port fails at once, and the socket (inherited
    # by the agent) lives in the root namespace whatever namespace the agent moves to.
    server = MetricsServer(metrics) if metrics is not None else None
    parent = os.getpid()
    try:
        pid, read_fd = _fork(lambda ready_fd: _agent_main(scenario, name, ready_fd, parent, server))
    finally:
        if server is not None:
            server.close()  # this process's copy; the agent keeps its own

    def stop_waiting(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    previous = {sig: signal.signal(sig, stop_waiting) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        line = _read_line(read_fd, BUILD_TIMEOUT)
    except BaseException:  # Ctrl-C, SIGTERM or SIGHUP while building: take back what was made
        _abandon(pid, name)
        raise
    finally:
        os.close(read_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    kind, _, payload = line.partition(b" ")
    if kind == b"READY":
        return json.loads(payload)
    if kind == b"ERROR":  # the agent took down what it had made, and exits
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise L7LabError("\n".join(json.loads(payload)))
    # No answer: the agent died (or hung) while building. What it made is this lab's alone.
    _abandon(pid, name)
    raise SetupError(f"the agent of lab {name!r} stopped before the lab was up; nothing was left behind")


def _abandon(pid: int, name: str) -> None:
    _kill_child(pid)
    labmod.down(name)


def _kill_child(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _fork(child: Callable[[int], int]) -> tuple[int, int]:
    """Fork; the child runs `child(ready_fd)` and exits with its code (never returning here).
    Returns (child pid, read end of the pipe on which the child reports READY or ERROR)."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()  # nothing buffered is written twice
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        try:
            code = child(write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def _quiet(fds: tuple[int, ...]) -> None:
    """Point these standard descriptors at /dev/null (the command's terminal is not ours)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def adopt(lab: labmod.Lab) -> int:
    """Hand a lab this process built (`run --keep`) to an agent: a forked child that keeps the
    loaded programs and maps; returns its pid once it serves. The lab's servers and proxy were
    started by this process; the agent watches the proxy by pid (it is not the proxy's parent)."""
    def serve(ready_fd: int) -> int:
        try:
            os.setsid()
            _quiet((0, 1, 2))
            if lab._proxy is not None:
                lab._proxy = _ForeignProcess(lab._proxy.pid)  # type: ignore[assignment]
            agent = Agent(lab)
            agent.prepare()
        except BaseException as exc:  # noqa: BLE001 - reported to the command
            _send(ready_fd, "ERROR", [f"the lab agent could not start: {exc}"])
            return 1
        _send(ready_fd, "READY", {"agent": os.getpid()})
        os.close(ready_fd)
        return agent.serve()

    pid, read_fd = _fork(serve)
    try:
        line = _read_line(read_fd, 30.0)
    finally:
        os.close(read_fd)
    kind, _, payload = line.partition(b" ")
    if kind != b"READY":
        _kill_child(pid)  # never an agent behind a "kept without an agent"
        raise SetupError("\n".join(json.loads(payload)) if kind == b"ERROR" else
                         f"the agent of lab {lab.name!r} did not start")
    return pid


class _ForeignProcess:
    """The parts of Popen the lab uses, for a process that is not this one's child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = labmod._proc_start_time(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and (self._start is None or labmod._proc_start_time(self.pid) != self._start
                                        or _zombie(self.pid)):
            self.returncode = -1  # gone (its exit status belongs to its real parent, which may not reap it)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {self.pid} still running")
            time.sleep(0.01)
        return self.returncode if self.returncode is not None else -1


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _read_line(fd: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                return b""
            piece = os.read(fd, 65536)
            if not piece:
                return b""
            data += piece
    return data.split(b"\n", 1)[0]


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the command died before the call above took effect
        os._exit(1)


def _agent_main(scenario: Scenario, name: str, ready_fd: int, parent: int,
                metrics: MetricsServer | None = None) -> int:
    os.setsid()
    _die_with_parent(parent)
    _quiet((0, 1))  # stderr stays the command's until READY: compiler and verifier messages
    try:
        from .datapath import Datapath  # noqa: PLC0415 - bcc is imported by the loader only
        from .policy import PolicyEngine  # noqa: PLC0415

        policy = PolicyEngine(scenario)
        datapath = Datapath(audit=scenario.settings.audit)
        lab = labmod.Lab(scenario, name, datapath=datapath, policy=policy)
        lab.up()
    except (SourceError, ErrorList) as exc:
        _send(ready_fd, "ERROR", [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])])
        return 1
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the command
        _send(ready_fd, "ERROR", [str(exc) if isinstance(exc, L7LabError) else f"{type(exc).__name__}: {exc}"])
        return 1
    try:
        agent = Agent(lab, metrics)
        agent.prepare()
    except BaseException as exc:  # noqa: BLE001
        lab.down()  # (kill_pids never kills its caller, though the agent is in the record)
        _send(ready_fd, "ERROR", [str(exc) if isinstance(exc, L7LabError) else f"the lab agent could not start: {exc}"])
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, 0)  # from here on the agent outlives the command
    _send(ready_fd, "READY", {"lab": name, "status": lab.record.status, "endpoints": len(lab.record.endpoints),
                              "node": lab.record.node, "agent": os.getpid(), "metrics": agent.metrics_url})
    os.close(ready_fd)
    return agent.serve()


def _send(fd: int, kind: str, payload: Any) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{kind} {json.dumps(payload)}\n".encode())


# --------------------------------------------------------------------------- the agent


class Agent:
    """Serves one lab until it is taken down (or the agent is told to stop)."""

    def __init__(self, lab: labmod.Lab, metrics: MetricsServer | None = None) -> None:
        self.lab = lab
        self.dir = labmod.lab_dir(lab.name)
        self.state = lab.policy.map_state()
        self.metrics_server = metrics
        self.counters = LabCounters()
        self.snapshot = MetricsSnapshot()  # replaced whole, never changed: the scrape threads read it
        self.proxy_records = RecordTail(self.dir)
        self.directory = Directory.of_lab(lab)
        self.proxy = ProxySupervisor(lab, self._proxy_event)
        self.stopping = False
        self.listener: socket.socket | None = None
        self.flows: FlowLog | None = None

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_server is None:
            return None
        host, port = self.metrics_server.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def prepare(self) -> None:
        rec = self.lab.record
        rec.add(kind="process", pid=os.getpid(), start=labmod._proc_start_time(os.getpid()), netns=rec.node,
                what="l7lab agent", log=str(self.dir / "agent.log"))
        log = os.open(self.dir / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        topology.enter_netns(rec.node)
        path = self.dir / SOCKET_NAME
        safety.remove_owned(path, self.lab.name, labmod.run_dir(), labmod.NETNS_ETC)  # a stale socket
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o600)  # root only: it changes what the kernel enforces
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.flows = FlowLog(self.dir)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.take_snapshot()
        if self.metrics_server is not None:  # its socket was bound in the root namespace by `up`
            self.metrics_server.serve(LabCollector(self.lab.name, lambda: self.snapshot))

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def serve(self) -> int:
        print(f"l7lab agent {os.getpid()} serving lab {self.lab.name}", flush=True)
        assert self.listener is not None
        next_second = 0.0
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.listener, selectors.EVENT_READ, self._accept)
                while not self.stopping:
                    self.drain()
                    self.proxy.tick()
                    for key, _ in sel.select(timeout=0):
                        key.data()
                    if time.monotonic() >= next_second:
                        next_second = time.monotonic() + 1.0
                        self.write_metrics()
                        if not labmod.record_path(self.lab.name).exists():
                            break  # the lab was taken down around us
        finally:
            self.listener.close()
            if self.flows is not None:
                self.flows.close()
            if self.metrics_server is not None:
                self.metrics_server.close()
        return 0

    # -- observation ---------------------------------------------------------------------
    def drain(self, timeout_ms: int = POLL_MS) -> None:
        events = self.lab.datapath.poll_events(timeout_ms=timeout_ms)
        if not events:
            return
        self.counters.flow_events.update(ev.verdict.name for ev in events)
        if self.flows is not None:
            self.flows.write(kernel_flows(events, self.state, self.directory))

    def _proxy_event(self, event: str, detail: str, pid: int | None) -> None:
        """A proxy lifecycle record in flows.jsonl (`observe` shows it among the flows), the agent's
        log, and at once in the metrics."""
        print(f"proxy {event}: {detail}", flush=True)
        if self.flows is not None:
            self.flows.write([ProxyEvent(round(time.time(), 6), event, detail, pid)])
        self.take_snapshot()

    def metrics(self, detail: dict | None = None) -> list[dict[str, Any]]:
        detail = self.lab.datapath.metrics_detail() if detail is None else detail
        return [{"verdict": v.name, "reason": r.name, "direction": d.name.lower(), "packets": p, "bytes": b}
                for (v, r, d), (p, b) in sorted(detail.items())]

    def take_snapshot(self, detail: dict | None = None) -> None:
        """Read what the metrics report, here on the agent's loop, into a new immutable snapshot."""
        for record in self.proxy_records.records(PROXY_RECORDS):  # count what the proxy wrote since
            if isinstance(record, Flow) and record.l7 is not None:
                self.counters.l7_records[(record.l7.protocol or "?", record.verdict.value)] += 1
        detail = self.lab.datapath.metrics_detail() if detail is None else detail
        self.snapshot = MetricsSnapshot.take(self.counters, detail, policies=len(self.lab.policy.policies),
                                             proxy_up=self.proxy.up, proxy_restarts=self.proxy.restarts)

    def write_metrics(self) -> None:
        detail = self.lab.datapath.metrics_detail()
        self.take_snapshot(detail)
        tmp = self.dir / (METRICS_NAME + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"time": time.time(), "metrics": self.metrics(detail)}))
            os.replace(tmp, self.dir / METRICS_NAME)

    # -- requests --------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        undo: Callable[[str], None] | None = None
        with conn:
            conn.setblocking(True)
            try:
                # A stalled client must not stop the ring buffer's draining: the whole request
                # has RECEIVE_TIMEOUT, however slowly it trickles in.
                request = json.loads(_recv_line(conn, time.monotonic() + RECEIVE_TIMEOUT))
                if not isinstance(request, dict):
                    raise ValueError("expected a JSON object")
                reply, undo = self.handle(request)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "errors": [f"bad request to the agent: {exc!r}"]}
            except Exception as exc:  # noqa: BLE001 - the agent outlives any one request
                print(f"request failed: {exc!r}", flush=True)
                reply = {"ok": False, "errors": [f"the agent failed on this request: {exc!r}"]}
            try:
                conn.settimeout(RECEIVE_TIMEOUT)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError as exc:
                if undo is not None:  # the caller is gone: it was never told, so nothing changes
                    undo(f"its reply could not be delivered ({exc.strerror or exc})")
                    self.counters.changes["rolled back"] += 1
                return
        if undo is not None:
            self.counters.changes["applied"] += 1
        self.take_snapshot()

    def handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], Callable[[str], None] | None]:
        """The reply to one request, and for a change applied, how to undo it."""
        op = request.get("op")
        if op == "status":
            return {"ok": True, "pid": os.getpid(), "policies": self.policies(), "metrics": self.metrics(),
                    "metrics_url": self.metrics_url, "proxy": self.proxy.status()}, None
        if op == "change":
            try:
                return self.change(request)
            except (SourceError, ErrorList, ChangeRefused) as exc:
                self.counters.changes["refused"] += 1
                if isinstance(exc, ChangeRefused):
                    print(f"change refused: {exc}", flush=True)
                return {"ok": False, "errors": [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])]}, None
            except L7LabError as exc:
                self.counters.changes["rolled back"] += 1
                return {"ok": False, "errors": [str(exc)]}, None
        return {"ok": False, "errors": [f"unknown request {op!r}: expected 'change' or 'status'"]}, None

    def policies(self) -> list[str]:
        return sorted(p.display for p in self.lab.policy.policies.values())

    def change(self, request: dict[str, Any]) -> tuple[dict[str, Any], Callable[[str], None]]:
        """Apply, delete and relabel as one step: every part is checked before anything changes,
        and everything is done by the request's deadline or undone."""
        from .yamlsource import Budget, load_documents  # noqa: PLC0415

        deadline = _change_deadline(request)
        engine, scenario = self.lab.policy, self.lab.scenario
        errors: list[SourceError] = []
        sources: list[PolicySource] = []
        # The files of one change share one budget of values and bytes, as `l7lab apply` checks
        # them: splitting hostile input over many files buys nothing.
        budget, total = Budget(what="one change"), 0
        for item in request.get("apply", []):
            total += len(item["text"].encode("utf-8", "surrogatepass"))
            if total > limits.MAX_CHANGE_BYTES:
                raise SourceError(SourceLocation(item["path"]), f"the files of one change together exceed the "
                                                                f"limit of {limits.MAX_CHANGE_BYTES} bytes")
            try:
                sources += [PolicySource(doc) for doc in load_documents(item["text"], item["path"], budget)]
            except SourceError as exc:
                errors.append(exc)
        deletes = [PolicyRef(d["kind"], d["name"], d.get("namespace", "")) for d in request.get("delete", [])]
        for ref in deletes:
            if (ref.kind, ref.namespace, ref.name) not in engine.policies:
                what = f"{ref.kind} {ref.namespace + '/' if ref.namespace else ''}{ref.name}"
                errors.append(SourceError(SourceLocation("delete"), f"no policy {what} is applied "
                                                                    f"(applied: {', '.join(self.policies()) or 'none'})"))
        relabels = [Relabel(r["target"], r["name"], dict(r.get("set", {})), tuple(r.get("remove", ())))
                    for r in request.get("relabel", [])]
        for r in relabels:
            known = scenario.pods if r.target == "pod" else scenario.namespaces
            if r.name not in known:
                errors.append(SourceError(SourceLocation("label"), f"no {r.target} {r.name!r} in lab {self.lab.name} "
                                                                   f"(known: {', '.join(sorted(known))})"))
        ErrorList.raise_if_any(errors)
        if time.monotonic() >= deadline:  # checked again: the documents may have been slow to parse
            raise ChangeRefused("the change arrived after its caller's deadline and was not applied")
        self.proxy.tick()  # a proxy that died since the last tick is seen now
        if not self.proxy.ensure_ready(deadline) and self.proxy.state == "starting":
            raise ChangeRefused("the L7 proxy is restarting and was not ready in time; try again")
        before = self.policies()
        # apply_step replaces these whole, so the old objects are a complete snapshot to go back to.
        saved = (engine.policies, engine.pod_labels, engine.namespace_labels, engine.resolution)
        saved_labels = {key: dict(ep.labels) for key, ep in self.lab.record.endpoints.items()}
        old_state = self.state
        engine.apply_step(Step(0, "l7lab change", tuple(sources), tuple(deletes), tuple(relabels)))
        self.drain(timeout_ms=0)  # earlier events are named by the state they were decided under
        state = engine.map_state()
        # A running proxy confirms every change. Without one, a change is refused if it brings L7
        # rules no proxy has confirmed; one that leaves them as they are (or removes them all)
        # goes through, and the restarted proxy loads it.
        proxy_confirms = self.proxy.up or (bool(state.l7) and _l7_rules(state) != _l7_rules(old_state))

        def undo(why: str) -> None:
            engine.policies, engine.pod_labels, engine.namespace_labels, engine.resolution = saved
            with contextlib.suppress(Exception):  # never stop short of the maps for a slow proxy
                self.lab.sync_policy(engine.map_state(), deadline=time.monotonic() + ROLLBACK_BUDGET,
                                     proxy_confirms=False)
            self.state = old_state
            for key, labels in saved_labels.items():
                self.lab.record.endpoints[key].labels = labels
            with contextlib.suppress(OSError):
                self.lab.record.save()
            print(f"change rolled back: {why}", flush=True)

        try:
            stats = self.lab.sync_policy(state, deadline=min(deadline, time.monotonic() + PROXY_CONFIRM_TIMEOUT),
                                         proxy_confirms=proxy_confirms)
        except Exception as exc:  # noqa: BLE001 - the proxy did not confirm, a map refused an entry, ...
            undo(repr(exc))
            raise L7LabError(f"the change could not be enforced and was rolled back: {exc}") from None
        self.state = state
        for r in relabels:
            if r.target == "pod":
                labels = self.lab.record.endpoints[r.name].labels
                labels.update(r.set)
                for key in r.remove:
                    labels.pop(key, None)
        self.lab.record.save()
        if time.monotonic() > deadline:  # the caller is about to give up: it must not be applied unseen
            undo("it finished after its caller's deadline")
            raise L7LabError("the change took longer than its deadline and was rolled back; nothing changed")
        after = self.policies()
        reply = {"ok": True, "policies": after, "added": sorted(set(after) - set(before)),
                 "removed": sorted(set(before) - set(after)),
                 "map_writes": stats.total if stats is not None else 0}
        if not self.proxy.up:
            reply["warnings"] = ["the L7 proxy is not running: flows redirected to it are dropped until it is back"]
        return reply, undo


class ChangeRefused(L7LabError):
    """A change turned down before anything was touched."""


def _l7_rules(state: Any) -> str:
    """The L7 part of a map state, comparable between states."""
    return json.dumps(state.to_json()["l7"], sort_keys=True)


def _change_deadline(request: dict[str, Any]) -> float:
    """The monotonic time by which a change must be done (the clock is the machine's, shared by
    the CLI and the agent); a change past it is refused before anything is touched."""
    deadline = request.get("deadline")
    now = time.monotonic()
    if deadline is None:
        return now + CHANGE_BUDGET
    if not isinstance(deadline, (int, float)):
        raise TypeError("'deadline' must be a number (CLOCK_MONOTONIC seconds)")
    if deadline <= now:
        raise ChangeRefused(f"the change arrived {now - deadline:.1f}s after its caller's deadline "
                         "(the agent was busy or stopped) and was not applied")
    return min(float(deadline), now + CHANGE_BUDGET)


def _recv_line(conn: socket.socket, deadline: float) -> bytes:
    """One line, read by the monotonic `deadline` (socket.timeout past it)."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        conn.settimeout(left)
        piece = conn.recv(65536)
        if not piece:
            break
        data += piece
        if len(data) > MAX_REQUEST:
            raise ValueError(f"request larger than {MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0]


# --------------------------------------------------------------------------- the CLI's side


def request(lab: str, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Send one request to the agent of `lab` and return its reply. A change carries its
    deadline (now + CHANGE_BUDGET); the wait for its reply is the agent's whole budget for it
    (REQUEST_TIMEOUT), so a change is never applied after this side gave up on it."""
    path = socket_path(lab)
    if not labmod.record_path(lab).exists():
        raise SetupError(f"lab {lab!r} is not up")
    if not path.exists():
        raise SetupError(f"lab {lab!r} has no agent (it was not built by 'l7lab up' or 'l7lab run --keep'): "
                         f"it takes no changes")
    change = payload.get("op") == "change"
    if timeout is None:
        timeout = REQUEST_TIMEOUT if change else STATUS_TIMEOUT
    started = time.monotonic()
    if change:
        payload = {**payload, "deadline": started + CHANGE_BUDGET}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            line = _recv_line(sock, started + timeout)
        except (ConnectionRefusedError, FileNotFoundError):
            raise SetupError(f"the agent of lab {lab!r} is not running (it may have been killed); "
                             f"the lab still enforces its last policy; 'l7lab down {lab}' removes it") from None
        except OSError as exc:
            outcome = (" the change was not applied (the agent refuses, or rolls back, a change whose caller "
                       "gave up)" if change else "")
            raise SetupError(f"the agent of lab {lab!r} did not answer within {timeout:g}s: {exc};{outcome}") from None
    if not line:
        raise SetupError(f"the agent of lab {lab!r} closed the connection without answering")
    return json.loads(line)
