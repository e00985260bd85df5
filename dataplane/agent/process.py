"""The lab agent as a process: forked by `up` (or `run --keep`), reporting through a pipe,
daemonized into the lab's node namespace, serving the control socket.

`start` forks the agent before anything is built; the agent compiles the datapath, builds the
lab with the policy engine the command already validated, and reports READY (or every error) as
one line on a pipe; the command exits with that answer. Until READY the agent dies with the
command (PR_SET_PDEATHSIG): killing `up` midway never leaves a builder running while `clean`
removes what it made. `adopt` hands a lab this process built (`run --keep`) to a forked child the
same way: the child inherits the loaded programs and maps.

The agent then records itself in the lab's record (so `down` and `clean` stop it like any other
process of the lab), writes its output to `agent.log`, enters the node namespace and serves
`agent.sock`: one JSON request per connection, one JSON line back, read within RECEIVE_TIMEOUT
however slowly it trickles in. What a request does is the service's (`service.py`); this loop
turns it: kernel events and the proxy, the socket, and once a second the metrics.

`request` is the client side, used by the CLI: a change carries its deadline (now +
CHANGE_BUDGET) and the client waits for its answer as long as the agent may take to apply it,
roll it back and reply (REQUEST_TIMEOUT), so a change is never applied after its caller gave up.
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
from typing import TYPE_CHECKING, Any

from .. import lab as labmod
from .. import limits, processes, safety, timescale, topology
from ..errors import ErrorList, L7LabError, SetupError, SourceError
from ..metrics import MetricsServer
from .service import CHANGE_BUDGET, ROLLBACK_BUDGET, LabService

if TYPE_CHECKING:
    from ..policy.engine import PolicyEngine

SOCKET_NAME = "agent.sock"
BUILD_TIMEOUT = 300.0  # compile + namespaces + servers; the builder's own steps time out sooner
ADOPT_TIMEOUT = 30.0  # for a forked agent to take over a lab that is up
REPLY_MARGIN = 3.0  # the reply's way back, on a loaded machine
REQUEST_TIMEOUT = CHANGE_BUDGET + ROLLBACK_BUDGET + REPLY_MARGIN  # the CLI's wait for a change's answer
STATUS_TIMEOUT = 5.0  # the CLI's wait for a status answer
INSPECT_TIMEOUT = 30.0  # the CLI's wait for a policy dump: reading a full policy map back takes seconds
RECEIVE_TIMEOUT = 2.0  # the agent's wait for a whole request
# A change carries at most MAX_CHANGE_BYTES of policy text; JSON escaping can make a byte six.
MAX_REQUEST = 6 * limits.MAX_CHANGE_BYTES + 64 * 1024
# A policy dump carries two maps of up to POLICY_MAP_SIZE entries each (some 150 bytes an entry).
MAX_DUMP_REPLY = 256 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


def socket_path(lab: str) -> Path:
    return labmod.lab_dir(lab) / SOCKET_NAME


# --------------------------------------------------------------------------- starting (in `up`)


def start(engine: PolicyEngine, name: str, metrics: tuple[str, int] | None = None) -> dict[str, Any]:
    """Fork the agent, let it build lab `name` from the engine's scenario, enforcing with this
    engine (the one the command validated the policies with), serving Prometheus metrics on
    `metrics` (a loopback address) if given; return its READY summary; raise what it hit."""
    labmod.check_absent(name)
    # Bound here, before anything is built: a busy port fails at once, and the socket (inherited
    # by the agent) lives in the root namespace whatever namespace the agent moves to.
    server = MetricsServer(metrics) if metrics is not None else None
    parent = os.getpid()
    try:
        pid, read_fd = _fork(lambda ready_fd: _agent_main(engine, name, ready_fd, parent, server))
    finally:
        if server is not None:
            server.close()  # this process's copy; the agent keeps its own

    def stop_waiting(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    previous = {sig: signal.signal(sig, stop_waiting) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        line = _read_line(read_fd, timescale.scaled(BUILD_TIMEOUT))
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
    timescale.factor()  # known before the fork: the agent, and what it starts, inherit it
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
            proxy = lab.proxy_process
            if proxy is not None:
                lab.adopt_proxy(proxy.pid)
            agent = AgentProcess(LabService(lab))
            agent.prepare()
        except BaseException as exc:  # noqa: BLE001 - reported to the command
            _send(ready_fd, "ERROR", [f"the lab agent could not start: {exc}"])
            return 1
        _send(ready_fd, "READY", {"agent": os.getpid()})
        os.close(ready_fd)
        return agent.serve()

    pid, read_fd = _fork(serve)
    try:
        line = _read_line(read_fd, timescale.scaled(ADOPT_TIMEOUT))
    finally:
        os.close(read_fd)
    kind, _, payload = line.partition(b" ")
    if kind != b"READY":
        _kill_child(pid)  # never an agent behind a "kept without an agent"
        raise SetupError("\n".join(json.loads(payload)) if kind == b"ERROR" else
                         f"the agent of lab {lab.name!r} did not start")
    return pid


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


def _agent_main(engine: PolicyEngine, name: str, ready_fd: int, parent: int,
                metrics: MetricsServer | None = None) -> int:
    os.setsid()
    _die_with_parent(parent)
    _quiet((0, 1))  # stderr stays the command's until READY: compiler and verifier messages
    scenario = engine.scenario
    try:
        from ..datapath import Datapath  # noqa: PLC0415 - bcc is imported by the loader only

        # Audit mode is per endpoint (the endpoints map's audit flag, from the resolver), so that
        # it can be switched at runtime; settings.audit only sets every endpoint's flag at start.
        datapath = Datapath()
        lab = labmod.Lab(scenario, name, datapath=datapath, policy=engine)
        lab.up()
    except (SourceError, ErrorList) as exc:
        _send(ready_fd, "ERROR", [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])])
        return 1
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the command
        _send(ready_fd, "ERROR", [str(exc) if isinstance(exc, L7LabError) else f"{type(exc).__name__}: {exc}"])
        return 1
    try:
        service = LabService(lab, metrics)
        agent = AgentProcess(service)
        agent.prepare()
    except BaseException as exc:  # noqa: BLE001
        lab.down()  # (kill_pids never kills its caller, though the agent is in the record)
        _send(ready_fd, "ERROR", [str(exc) if isinstance(exc, L7LabError) else f"the lab agent could not start: {exc}"])
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, 0)  # from here on the agent outlives the command
    _send(ready_fd, "READY", {"lab": name, "status": lab.record.status, "endpoints": len(lab.record.endpoints),
                              "node": lab.record.node, "agent": os.getpid(), "metrics": service.metrics_url})
    os.close(ready_fd)
    return agent.serve()


def _send(fd: int, kind: str, payload: Any) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{kind} {json.dumps(payload)}\n".encode())


# --------------------------------------------------------------------------- the agent's loop


class AgentProcess:
    """The agent's process around its service: the record entry, the log, the node namespace,
    the control socket and the loop. Runs until the lab is taken down or a signal stops it."""

    def __init__(self, service: LabService) -> None:
        self.service = service
        self.lab = service.lab
        self.dir = labmod.lab_dir(self.lab.name)
        self.stopping = False
        self.listener: socket.socket | None = None

    def prepare(self) -> None:
        rec = self.lab.record
        rec.add(kind="process", pid=os.getpid(), start=processes.start_time(os.getpid()), netns=rec.node,
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
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.service.open()

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def serve(self) -> int:
        print(f"l7lab agent {os.getpid()} serving lab {self.lab.name}", flush=True)
        assert self.listener is not None
        next_second = 0.0
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.listener, selectors.EVENT_READ)
                while not self.stopping:
                    self.service.poll()
                    if sel.select(timeout=0):
                        self._accept()
                    if time.monotonic() >= next_second:
                        next_second = time.monotonic() + 1.0
                        if not self.service.every_second():
                            break  # the lab was taken down around us
        finally:
            self.listener.close()
            self.service.close()
        return 0

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        undo = None
        with conn:
            conn.setblocking(True)
            try:
                # A stalled client must not stop the ring buffer's draining: the whole request
                # has RECEIVE_TIMEOUT, however slowly it trickles in.
                request = json.loads(_recv_line(conn, time.monotonic() + timescale.scaled(RECEIVE_TIMEOUT)))
                if not isinstance(request, dict):
                    raise ValueError("expected a JSON object")
                reply, undo = self.service.handle(request)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "errors": [f"bad request to the agent: {exc!r}"]}
            except Exception as exc:  # noqa: BLE001 - the agent outlives any one request
                print(f"request failed: {exc!r}", flush=True)
                reply = {"ok": False, "errors": [f"the agent failed on this request: {exc!r}"]}
            try:
                conn.settimeout(timescale.scaled(RECEIVE_TIMEOUT))
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError as exc:
                self.service.replied(undo, lost=exc)  # the caller is gone: it was never told
                return
        self.service.replied(undo)


def _recv_line(conn: socket.socket, deadline: float, limit: int = MAX_REQUEST) -> bytes:
    """One line of at most `limit` bytes, read by the monotonic `deadline` (socket.timeout past it)."""
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
        if len(data) > limit:
            raise ValueError(f"message larger than {limit} bytes")
    return data.split(b"\n", 1)[0]


# --------------------------------------------------------------------------- the CLI's side


def request(lab: str, payload: dict[str, Any], timeout: float | None = None,
            reply_limit: int = MAX_REQUEST) -> dict[str, Any]:
    """Send one request to the agent of `lab` and return its reply (of at most `reply_limit`
    bytes). A change carries its deadline (now + CHANGE_BUDGET); the wait for its reply is the
    agent's whole budget for it (REQUEST_TIMEOUT), so a change is never applied after this side
    gave up on it."""
    path = socket_path(lab)
    if not labmod.record_path(lab).exists():
        raise SetupError(f"lab {lab!r} is not up")
    if not path.exists():
        raise SetupError(f"lab {lab!r} has no agent (it was not built by 'l7lab up' or 'l7lab run --keep'): "
                         f"it takes no changes")
    change = payload.get("op") == "change"
    # Every bound here is an ordinary machine's seconds, scaled to this one (dataplane/timescale.py).
    timeout = timescale.scaled(timeout if timeout is not None else REQUEST_TIMEOUT if change else STATUS_TIMEOUT)
    started = time.monotonic()
    if change:
        payload = {**payload, "deadline": started + timescale.scaled(CHANGE_BUDGET)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            line = _recv_line(sock, started + timeout, reply_limit)
        except (ConnectionRefusedError, FileNotFoundError):
            raise SetupError(f"the agent of lab {lab!r} is not running (it may have been killed); "
                             f"the lab still enforces its last policy; 'l7lab down {lab}' removes it") from None
        except ValueError as exc:  # a reply past reply_limit
            raise SetupError(f"the agent of lab {lab!r} answered too much: {exc}") from None
        except OSError as exc:
            outcome = (" the change was not applied (the agent refuses, or rolls back, a change whose caller "
                       "gave up)" if change else "")
            raise SetupError(f"the agent of lab {lab!r} did not answer within {timeout:g}s: {exc};{outcome}") from None
    if not line:
        raise SetupError(f"the agent of lab {lab!r} closed the connection without answering")
    return json.loads(line)
