"""Lab lifecycle: realize a scenario as namespaces, links and servers, record it, take it down.

Naming (DESIGN.md section 3): everything a lab creates carries the prefix `l7lab-<lab>.`:

    l7lab-<lab>.node                the node namespace (forwarding, BPF hooks, proxy)
    l7lab-<lab>.pod.<ns>.<pod>      one namespace per pod
    l7lab-<lab>.world.<host>        one namespace per world host

Lab names have no dots, so the prefix of one lab never matches another's. Links live only
inside these namespaces (removing a namespace removes its links), per-endpoint hosts files live
in /etc/netns/<namespace>/ (where `ip netns exec` finds them), and the record of everything made
is /run/l7lab/<lab>.json, written *before* each resource is created so that `down` after a crash
still knows it. `clean` needs no record at all: it removes whatever carries the prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import confine, topology
from .errors import SetupError
from .logfiles import previous, request_log, rotate_bytes
from .scenario import GATEWAY_IP, Port, Scenario

PREFIX = "l7lab-"
RUN_DIR = Path(os.environ.get("L7LAB_RUN_DIR", "/run/l7lab"))
NETNS_ETC = Path("/etc/netns")
LAB_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
SERVER_START_TIMEOUT = 20.0


def lab_prefix(lab: str) -> str:
    return f"{PREFIX}{lab}."


def node_netns(lab: str) -> str:
    return f"{lab_prefix(lab)}node"


def pod_netns(lab: str, pod_key: str) -> str:
    namespace, name = pod_key.split("/")
    return f"{lab_prefix(lab)}pod.{namespace}.{name}"


def world_netns(lab: str, host: str) -> str:
    return f"{lab_prefix(lab)}world.{host}"


def host_ifname(kind: str, key: str) -> str:
    """Node-side interface name: 'lxc' (pods) or 'wld' (world) + 8 hex digits, 11 chars."""
    return ("lxc" if kind == "pod" else "wld") + hashlib.sha1(key.encode()).hexdigest()[:8]


def record_path(lab: str) -> Path:
    return RUN_DIR / f"{lab}.json"


def lab_dir(lab: str) -> Path:
    return RUN_DIR / lab


@dataclass
class EndpointRecord:
    key: str  # pod key or world host name
    kind: str  # 'pod' | 'world'
    netns: str
    ip: str
    ifname: str
    ifindex: int = 0
    ports: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class LabRecord:
    """What `status`, `exec` and `down` know about a running lab."""

    lab: str
    scenario: str
    status: str = "creating"
    created: float = field(default_factory=time.time)
    owner_pid: int = field(default_factory=os.getpid)
    node: str = ""
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    resources: list[dict[str, Any]] = field(default_factory=list)

    def save(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        path = record_path(self.lab)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    def add(self, **resource: Any) -> None:
        """Record a resource (before creating it) and persist the record."""
        self.resources.append(resource)
        self.save()

    @classmethod
    def load(cls, lab: str) -> "LabRecord | None":
        try:
            data = json.loads(record_path(lab).read_text())
        except (OSError, ValueError):
            return None
        data["endpoints"] = {k: EndpointRecord(**v) for k, v in data.get("endpoints", {}).items()}
        return cls(**data)


def _proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def check_environment() -> None:
    if os.geteuid() != 0:
        raise SetupError("l7lab needs root to create network namespaces (run with sudo)")
    if shutil.which("ip") is None:
        raise SetupError("the 'ip' command (iproute2) is missing; run scripts/setup.sh")


def check_absent(name: str) -> None:
    """A lab of this name must not exist yet, not even as leftovers of a crash."""
    if record_path(name).exists() or topology.list_netns(lab_prefix(name)):
        raise SetupError(f"lab {name!r} is already up (or left over from a crash); "
                         f"run 'l7lab down {name}' or 'l7lab clean {name}' first")


def validate_lab_name(name: str) -> None:
    if not LAB_NAME_RE.match(name):
        raise SetupError(f"invalid lab name {name!r}: expected 1-20 characters a-z, 0-9 and '-', "
                         "starting and ending with a letter or digit")


class Lab:
    """A scenario realized on this kernel. Use as a context manager, or up()/down()."""

    def __init__(self, scenario: Scenario, name: str | None = None, *, datapath: Any = None,
                 policy: Any = None) -> None:
        """`datapath` (a loaded `dataplane.datapath.Datapath`) and `policy` (a policy engine)
        make the lab enforce; without them it only carries traffic. The caller owns the
        datapath (it costs a compile), so one can serve several labs one after another."""
        self.scenario = scenario
        self.name = name or scenario.name
        validate_lab_name(self.name)
        self.record = LabRecord(self.name, scenario.path)
        self.datapath = datapath
        self.policy = policy
        self._servers: list[subprocess.Popen[bytes]] = []
        self._proxy: subprocess.Popen[bytes] | None = None
        self._policy_digest = ""

    @property
    def enforcing(self) -> bool:
        return self.datapath is not None and self.policy is not None

    # -- bring up ---------------------------------------------------------------------------
    def up(self) -> LabRecord:
        check_environment()
        check_absent(self.name)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self.record

    def _build(self) -> None:
        rec = self.record
        rec.node = node_netns(self.name)
        rec.add(kind="dir", path=str(lab_dir(self.name)))
        lab_dir(self.name).mkdir(parents=True, exist_ok=True)
        rec.add(kind="netns", name=rec.node)
        topology.create_netns(rec.node)
        topology.setup_node(rec.node, self.scenario.node_addresses())

        plan: list[tuple[str, str, str, str, tuple[Port, ...], dict[str, str]]] = []
        for key, pod in self.scenario.pods.items():
            plan.append(("pod", key, pod_netns(self.name, key), pod.ip, pod.ports, pod.labels))
        for name, host in self.scenario.world.items():
            plan.append(("world", name, world_netns(self.name, name), host.address, host.ports, {}))
        hosts = self._hosts_file()
        for kind, key, ns, ip, ports, labels in plan:
            ifname = host_ifname(kind, key)
            ep = EndpointRecord(key, kind, ns, ip, ifname, ports=[asdict(p) for p in ports], labels=dict(labels))
            rec.endpoints[key] = ep
            rec.add(kind="netns", name=ns)
            topology.create_netns(ns)
            link = topology.add_endpoint(rec.node, ns, ifname, ip, GATEWAY_IP, self.scenario.node_ip)
            # A closed port answers every probe with an ICMP error, not only the first few a second.
            topology.sysctl(ns, "net.ipv4.icmp_ratelimit", 0)
            # Pods run unprivileged (dataplane/confine.py): let them bind any port and ping, as the
            # safe sysctls of a Kubernetes pod allow.
            topology.sysctl(ns, "net.ipv4.ip_unprivileged_port_start", 0)
            topology.sysctl(ns, "net.ipv4.ping_group_range", "0 2147483647")
            ep.ifindex = link.host_ifindex
            etc = NETNS_ETC / ns
            rec.add(kind="dir", path=str(etc))
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            # Nothing listens on the pod's loopback port 53: a lookup that misses the hosts file
            # fails at once instead of waiting for a timeout.
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        if self.enforcing:
            self._attach()
        self._start_servers(plan)
        rec.status = "up"
        rec.save()

    def _interfaces(self, state: Any) -> dict[int, int]:
        """Node-side ifindex -> endpoint id (0 for world links), for the datapath's anti-spoofing."""
        ids = {ep.name: ep_id for ep_id, ep in state.endpoints.items()}
        return {e.ifindex: ids.get(k, 0) for k, e in self.record.endpoints.items()}

    def _attach(self) -> None:
        """Proxy and maps first, then attach: no packet ever meets an empty policy map, and no
        redirect ever finds the proxy without its rules."""
        state = self.policy.map_state()
        self._write_policy_file(state)
        self.start_proxy()
        self.datapath.sync(state, interfaces=self._interfaces(state))
        for ep in self.record.endpoints.values():
            topology.attach_tc(self.record.node, ep.ifname, ingress_fd=self.datapath.program_fd("from_container"),
                               egress_fd=self.datapath.program_fd("to_container"), name=f"l7lab-{self.name}")

    def sync_policy(self, state: Any) -> Any:
        """A policy change: the proxy's rules, then map updates only (no recompile, no
        reattach). Returns the datapath's SyncStats."""
        if self.datapath is None:
            return None
        if self._proxy is not None and self._proxy.poll() is None:
            self._write_policy_file(state)
            self._proxy.send_signal(signal.SIGHUP)
            self._await_proxy_ack()
        return self.datapath.sync(state, interfaces=self._interfaces(state))

    # -- the L7 proxy -----------------------------------------------------------------------
    @property
    def policy_file(self) -> Path:
        return lab_dir(self.name) / "policy.json"

    @property
    def proxy_events_file(self) -> Path:
        return lab_dir(self.name) / "l7-events.jsonl"

    def _write_policy_file(self, state: Any) -> None:
        data = json.dumps(state.to_json())
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, self.policy_file)
        self._policy_digest = hashlib.sha256(data.encode()).hexdigest()

    def _await_proxy_ack(self, timeout: float = 5.0) -> None:
        ack = Path(str(self.policy_file) + ".loaded")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if ack.read_text() == self._policy_digest:
                    return
            time.sleep(0.002)
        raise SetupError(f"the L7 proxy of lab {self.name} did not load the new policy within {timeout:.0f}s "
                         f"(log: {lab_dir(self.name) / 'proxy.log'})")

    def start_proxy(self) -> None:
        """Start the L7 proxy in the node namespace (again, after a crash) and wait until it listens."""
        from .mapstate import PROXY_PORT  # noqa: PLC0415

        log = lab_dir(self.name) / "proxy.log"
        self._proxy = self._spawn("l7-proxy", self.record.node, "proxy",
                                  ["--state", str(self.policy_file), "--port", str(PROXY_PORT),
                                   "--events", str(self.proxy_events_file)], log)
        wait_ready([("the L7 proxy", self._proxy, log)])

    def stop_proxy(self, sig: int = signal.SIGKILL) -> None:
        """Stop the proxy (tests use SIGKILL to show that redirected flows then fail closed)."""
        if self._proxy is not None and self._proxy.poll() is None:
            self._proxy.send_signal(sig)
            self._proxy.wait(timeout=5)

    def _hosts_file(self) -> str:
        lines = ["127.0.0.1\tlocalhost", f"{self.scenario.node_ip}\tnode"]
        lines += [f"{ip}\t{' '.join(names)}" for ip, names in self.scenario.hosts_entries()]
        return "\n".join(lines) + "\n"

    def _spawn(self, key: str, ns: str, module: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start `python -m module` inside namespace `ns` (its /etc/netns files applied), recorded.
        Its stderr log past the logs' size cap is moved to NAME.1 first (the processes keep it
        bounded while they run: `logfiles.bound_stderr`)."""
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", module, "--lab", self.name, *args]
        with contextlib.suppress(OSError):
            if log.stat().st_size > rotate_bytes():
                os.replace(log, previous(log))
        with open(log, "ab") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._servers.append(proc)
        self.record.add(kind="process", pid=proc.pid, start=_proc_start_time(proc.pid), netns=ns,
                        what=f"{module} {key}", log=str(log))
        return proc

    def _start_servers(self, plan: list[tuple[str, str, str, str, tuple[Port, ...], dict[str, str]]]) -> None:
        """Every endpoint's server, confined (it confines itself once loaded): as a uid of its own
        (confine.endpoint_user), the run directory hidden. Its request log goes to a directory of
        its own, owned by that uid (it rotates the log there), which it opens before the lab's
        directory disappears from its view."""
        started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        for _kind, key, ns, _ip, ports, _labels in plan:
            tcp = ",".join(str(p.port) for p in ports if p.protocol == "TCP")
            udp = ",".join(str(p.port) for p in ports if p.protocol == "UDP")
            if not tcp and not udp:
                continue
            user = confine.endpoint_user(topology.NETNS_DIR / ns)
            endpoint_dir = ns.removeprefix(lab_prefix(self.name))
            log = lab_dir(self.name) / (endpoint_dir + ".log")
            logs = request_log(lab_dir(self.name), endpoint_dir).parent
            logs.mkdir(mode=0o755, exist_ok=True)
            os.chown(logs, user.uid, user.gid, follow_symlinks=False)
            proc = self._spawn(key, ns, "dataplane.podserver",
                               ["--endpoint", key, "--tcp", tcp, "--udp", udp, "--log-dir", str(logs),
                                "--uid", str(user.uid), "--gid", str(user.gid), "--hide", str(RUN_DIR)], log)
            started.append((key, proc, log))
        wait_ready(started)


    # -- take down --------------------------------------------------------------------------
    def down(self) -> None:
        down_from_record(self.record)
        if self.datapath is not None:
            # Leave the (caller-owned) datapath empty for the next lab that uses it.
            from .mapstate import MapState  # noqa: PLC0415

            self.datapath.sync(MapState(), interfaces={})
        for proc in self._servers:
            with contextlib.suppress(ChildProcessError, OSError):
                proc.wait(timeout=0)
        self._servers.clear()

    def __enter__(self) -> "Lab":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def wait_ready(started: list[tuple[str, subprocess.Popen[bytes], Path]], timeout: float = SERVER_START_TIMEOUT) -> None:
    """Wait until every process printed READY; a failure names the process and its last log line."""
    sel = selectors.DefaultSelector()
    try:
        for key, proc, log in started:
            assert proc.stdout is not None
            sel.register(proc.stdout, selectors.EVENT_READ, (key, log))
        pending = {key for key, _, _ in started}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SetupError(f"did not start within {timeout:.0f}s: {', '.join(sorted(pending))}")
            for sk, _ in sel.select(timeout=left):
                key, log = sk.data
                line = sk.fileobj.readline()  # type: ignore[union-attr]
                sel.unregister(sk.fileobj)
                if not line.startswith(b"READY"):
                    detail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                    raise SetupError(f"{key} failed to start: {' '.join(detail) or 'exited'} (log: {log})")
                pending.discard(key)
    finally:
        sel.close()
        for _, proc, _ in started:
            if proc.stdout:
                proc.stdout.close()


def down_from_record(rec: LabRecord) -> list[str]:
    """Remove what the record lists, newest first; idempotent. Returns what was removed."""
    removed: list[str] = []
    processes = [r for r in rec.resources if r["kind"] == "process"]
    # Only kill a recorded pid if it is still the process we started (same start time).
    victims = [r["pid"] for r in processes if r.get("start") is not None and _proc_start_time(r["pid"]) == r["start"]]
    topology.kill_pids(victims)
    removed += [f"process {r['pid']} ({r.get('what', '')})" for r in processes if r["pid"] in victims]
    for res in reversed(rec.resources):
        if res["kind"] == "netns":
            topology.kill_pids(topology.pids_in_netns(res["name"]))
            if topology.remove_netns(res["name"]):
                removed.append(f"netns {res['name']}")
        elif res["kind"] == "dir":
            if Path(res["path"]).exists():
                shutil.rmtree(res["path"], ignore_errors=True)
                removed.append(f"dir {res['path']}")
    with contextlib.suppress(FileNotFoundError):
        record_path(rec.lab).unlink()
        removed.append(f"record {record_path(rec.lab)}")
    return removed


def down(lab: str) -> list[str]:
    """`l7lab down LAB`: remove what the record lists, then anything else with the prefix."""
    rec = LabRecord.load(lab)
    removed = down_from_record(rec) if rec else []
    return removed + clean(lab)


def running_labs() -> list[str]:
    """Labs with a record or with namespaces still carrying their prefix."""
    names = {p.stem for p in RUN_DIR.glob("*.json")} if RUN_DIR.is_dir() else set()
    for ns in topology.list_netns(PREFIX):
        names.add(ns[len(PREFIX):].split(".", 1)[0])
    return sorted(names)


def clean(lab: str | None = None) -> list[str]:
    """Remove whatever carries the prefix of `lab` (all labs when None), record or not."""
    prefix = lab_prefix(lab) if lab else PREFIX
    removed: list[str] = []
    for ns in topology.list_netns(prefix):
        pids = topology.pids_in_netns(ns)
        topology.kill_pids(pids)
        removed += [f"process {p}" for p in pids]
        if topology.remove_netns(ns):
            removed.append(f"netns {ns}")
    if NETNS_ETC.is_dir():
        for d in sorted(NETNS_ETC.iterdir()):
            if d.name.startswith(prefix):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"dir {d}")
    if RUN_DIR.is_dir():
        labs = [lab] if lab else [p.stem for p in RUN_DIR.glob("*.json")] + [p.name for p in RUN_DIR.iterdir() if p.is_dir()]
        for name in sorted(set(labs)):
            for path in (record_path(name), record_path(name).with_suffix(".tmp")):
                if path.exists():
                    path.unlink()
                    removed.append(f"record {path}")
            if lab_dir(name).is_dir():
                shutil.rmtree(lab_dir(name), ignore_errors=True)
                removed.append(f"dir {lab_dir(name)}")
    return removed
