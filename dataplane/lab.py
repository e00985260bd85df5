"""Lab lifecycle: realize a scenario as namespaces, links and servers, record it, take it down.

Naming: everything a lab creates carries the prefix `l7lab-<lab>.`:

    l7lab-<lab>.node                the node namespace (forwarding, BPF hooks, proxy)
    l7lab-<lab>.pod.<ns>.<pod>      one namespace per pod
    l7lab-<lab>.world.<host>        one namespace per world host

Lab names have no dots, so the prefix of one lab never matches another's. Links live only
inside these namespaces (removing a namespace removes its links), per-endpoint hosts and
resolv.conf files live in /etc/netns/<namespace>/ (where `ip netns exec` finds them: a pod
resolves names through the cluster DNS, as the kubelet sets it up; with TLS world hosts also the
pods' CA bundle, dataplane/labca.py), the cluster DNS's zone is <run dir>/<lab>/zone.json
(dataplane/clusterdns.py), and the record of everything made
is /run/l7lab/<lab>.json, written *before* each resource is created so that `down` after a crash
still knows it. `clean` needs no record at all: it removes whatever carries the prefix.

Every lab name is checked (`dataplane/safety.py`) before it becomes a path or a namespace name,
whether the user typed it or it was read back from the run directory or `ip netns list`, and
every removal goes through `safety.remove_owned`, which refuses anything the lab does not own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import confine, labca, processes, safety, timescale, topology
from .errors import SetupError
from .flows import PROXY_RECORDS
from .logfiles import previous, request_log, rotate_bytes
from .scenario import GATEWAY_IP, Port, Relabel, Scenario

if TYPE_CHECKING:  # the loader imports bcc: only the caller that enforces loads it
    from .datapath import Datapath, SyncStats
    from .mapstate import MapState
    from .policy.engine import PolicyEngine

PREFIX = safety.PREFIX
# The setting as given; `run_dir()` checks it at every use (absolute, normalized, no symlink).
RUN_DIR: str = os.environ.get("L7LAB_RUN_DIR", safety.DEFAULT_RUN_DIR)
NETNS_ETC = Path("/etc/netns")
LAB_NAME_RE = safety.LAB_NAME_RE
SERVER_START_TIMEOUT = 20.0  # seconds on an ordinary machine; waits use timescale.scaled()
PROXY_ACK_TIMEOUT = 5.0  # the proxy confirms new rules in milliseconds; the bound is for a slow machine
DNS_PORT = 53  # an endpoint's port 53 (UDP and TCP) is the cluster DNS, answered from the zone file

lab_prefix = safety.lab_prefix


def run_dir() -> Path:
    """Where records and lab directories live (`L7LAB_RUN_DIR`, default /run/l7lab), checked."""
    return safety.check_run_dir(str(RUN_DIR))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
    return run_dir() / f"{safety.check_lab_name(lab)}.json"


def lab_dir(lab: str) -> Path:
    return run_dir() / safety.check_lab_name(lab)


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
        run_dir().mkdir(parents=True, exist_ok=True)
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
        """The record of lab `lab` (a valid name, or SetupError); None when there is none or it
        cannot be read as one (a link is never followed)."""
        path = record_path(lab)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, encoding="utf-8") as f:
                data = json.loads(f.read(16 << 20))
            data["endpoints"] = {k: EndpointRecord(**v) for k, v in data.get("endpoints", {}).items()}
            rec = cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            _warn(f"ignoring the record {path}: it cannot be read as a lab record ({exc})")
            return None
        if rec.lab != lab or not isinstance(rec.resources, list) or not all(isinstance(r, dict) for r in rec.resources):
            _warn(f"ignoring the record {path}: it is not a record of lab {lab!r}")
            return None
        return rec


def check_environment() -> None:
    if os.geteuid() != 0:
        raise SetupError("l7lab needs root to create network namespaces: run it as root")
    if shutil.which("ip") is None:
        raise SetupError("the 'ip' command (iproute2) is missing; run scripts/setup.sh")


def check_absent(name: str) -> None:
    """A lab of this name must not exist yet, not even as leftovers of a crash."""
    validate_lab_name(name)
    if os.path.lexists(record_path(name)) or topology.list_netns(lab_prefix(name)):
        raise SetupError(f"lab {name!r} is already up (or left over from a crash); "
                         f"run 'l7lab down {name}' or 'l7lab clean {name}' first")


def validate_lab_name(name: str) -> None:
    safety.check_lab_name(name)


class Lab:
    """A scenario realized on this kernel. Use as a context manager, or up()/down()."""

    def __init__(self, scenario: Scenario, name: str | None = None, *, datapath: Datapath | None = None,
                 policy: PolicyEngine | None = None) -> None:
        """`datapath` (a loaded `dataplane.datapath.Datapath`) and `policy` (a policy engine)
        make the lab enforce; without them it only carries traffic. The caller owns the
        datapath (it costs a compile), so one can serve several labs one after another."""
        self.scenario = scenario
        self.name = name or scenario.name
        validate_lab_name(self.name)
        self.record = LabRecord(self.name, scenario.path)
        self.datapath = datapath
        self.policy = policy
        # What DNS answers taught the lab (dataplane/fqdn/cache.py): kept here so that an agent
        # taking the lab over from `run --keep` goes on from it.
        self.fqdn_cache: Any = None
        self._servers: list[subprocess.Popen[bytes]] = []
        self._proxy: subprocess.Popen[bytes] | processes.WatchedProcess | None = None
        self._policy_digest = ""
        self._tls: dict[str, labca.LeafFiles] = {}  # world host -> its certificate and key

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
        # TLS world hosts: the lab's CA and their certificates, in the (recorded) lab directory.
        tls_hosts = labca.tls_hosts(self.scenario.world)
        ca_pem = b""
        if tls_hosts:
            _remove(labca.tls_dir(lab_dir(self.name)), self.name)  # a crashed lab's of this name: never reused
            self._tls = labca.create(self.name, lab_dir(self.name), tls_hosts)
            ca_pem = labca.ca_cert_file(lab_dir(self.name)).read_bytes()
        rec.add(kind="netns", name=rec.node)
        topology.create_netns(rec.node)
        topology.setup_node(rec.node, self.scenario.node_addresses())
        self._write_zone()

        plan: list[tuple[str, str, str, str, tuple[Port, ...], dict[str, str]]] = []
        for key, pod in self.scenario.pods.items():
            plan.append(("pod", key, pod_netns(self.name, key), pod.ip, pod.ports, pod.labels))
        for name, host in self.scenario.world.items():
            plan.append(("world", name, world_netns(self.name, name), host.address, host.ports, {}))
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
            pod = self.scenario.pods[key] if kind == "pod" else None
            (etc / "hosts").write_text(self._hosts_file(key if pod is None else pod.name, ip))
            (etc / "resolv.conf").write_text(self._resolv_conf(pod.namespace if pod is not None else None))
            if ca_pem and kind == "pod":
                labca.write_pod_trust(etc, ca_pem)  # mounted over the pod's /etc/ssl: it trusts the lab's CA
        if self.enforcing:
            self._attach()
        # The node's own server (probes `to: node:PORT`), in the node's namespace.
        node = self.scenario.node
        if node.ports:
            # The node's server runs unprivileged as the pods' do: let it bind the ports it declares.
            topology.sysctl(rec.node, "net.ipv4.ip_unprivileged_port_start", 0)
        self._start_servers(plan + [("node", node.name, rec.node, self.scenario.node_ip, node.ports, {})])
        rec.status = "up"
        rec.save()

    def relabel(self, relabels: tuple[Relabel, ...] | list[Relabel]) -> dict[str, dict[str, str]]:
        """Change the labels the record shows for pods (namespace labels are not recorded) and
        persist the record. Returns the labels the changed pods had, for `set_labels` to restore."""
        previous: dict[str, dict[str, str]] = {}
        for r in relabels:
            if r.target != "pod":
                continue
            ep = self.record.endpoints[r.name]
            previous.setdefault(r.name, dict(ep.labels))
            labels = dict(ep.labels)
            labels.update(r.set)
            for key in r.remove:
                labels.pop(key, None)
            ep.labels = labels
        self.record.save()
        return previous

    def set_labels(self, labels: dict[str, dict[str, str]]) -> None:
        """Give these endpoints exactly these labels (what `relabel` returned, to undo it) and
        persist the record."""
        for key, values in labels.items():
            self.record.endpoints[key].labels = dict(values)
        self.record.save()

    def _interfaces(self, state: MapState) -> dict[int, int]:
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

    def sync_policy(self, state: MapState, *, deadline: float | None = None,
                    proxy_confirms: bool = True) -> SyncStats | None:
        """A policy change: the proxy's rules, then map updates only (no recompile, no
        reattach). Returns the datapath's SyncStats.

        A running proxy must confirm the new rules (by the monotonic `deadline`, else within
        5 s) before the kernel redirects by them; if it does not: SetupError, maps untouched.
        Without a running proxy nothing can confirm them: SetupError, nothing changed. With
        `proxy_confirms=False` (the caller knows the proxy's L7 rules do not change, or is
        rolling back) a missing proxy is no error and a running one gets until `deadline` to
        confirm, then the maps are written anyway. The policy file is written in every case
        that changes something, so a proxy started later loads the policy in force."""
        if self.datapath is None:
            return None
        running = self._proxy is not None and self._proxy.poll() is None
        if not running and proxy_confirms:
            raise SetupError(f"the L7 proxy of lab {self.name} is not running, so nothing can confirm the L7 rules "
                             f"of this change (log: {self.proxy_log_file})")
        self._write_policy_file(state)
        if running:
            assert self._proxy is not None
            self._proxy.send_signal(signal.SIGHUP)
            try:
                self._await_proxy_ack(deadline)
            except SetupError:
                if proxy_confirms:
                    raise
        return self.datapath.sync(state, interfaces=self._interfaces(state))

    # -- the L7 proxy -----------------------------------------------------------------------
    @property
    def policy_file(self) -> Path:
        return lab_dir(self.name) / "policy.json"

    @property
    def proxy_events_file(self) -> Path:
        return lab_dir(self.name) / PROXY_RECORDS

    def _write_policy_file(self, state: MapState) -> None:
        data = json.dumps(state.to_json())
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, self.policy_file)
        self._policy_digest = hashlib.sha256(data.encode()).hexdigest()

    @property
    def proxy_log_file(self) -> Path:
        return lab_dir(self.name) / "proxy.log"

    def _await_proxy_ack(self, deadline: float | None = None, timeout: float = PROXY_ACK_TIMEOUT) -> None:
        """Wait until the proxy acknowledged the policy file just written: by the monotonic
        `deadline` if given, else within `timeout` seconds (scaled to this machine)."""
        ack = Path(str(self.policy_file) + ".loaded")
        if deadline is None:
            deadline = time.monotonic() + timescale.scaled(timeout)
        while True:
            with contextlib.suppress(OSError):
                if ack.read_text() == self._policy_digest:
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        raise SetupError(f"the L7 proxy of lab {self.name} did not confirm the new policy in time "
                         f"(log: {self.proxy_log_file})")

    @property
    def proxy_process(self) -> subprocess.Popen[bytes] | processes.WatchedProcess | None:
        """The L7 proxy's process (a Popen, or a `WatchedProcess` once adopted), or None."""
        return self._proxy

    def adopt_proxy(self, pid: int) -> None:
        """Take the proxy with this pid as this lab's proxy, watched by pid: after a fork (`run
        --keep` hands the lab to an agent) this process is not the parent of the proxy its
        Popen names, so it cannot wait for it; it sees it go by its pid and start time."""
        self._proxy = processes.WatchedProcess(pid)

    def start_proxy(self, wait: bool = True) -> None:
        """Start the L7 proxy in the node namespace (again, after a crash) and, with `wait`, wait
        until it listens. Without `wait` the caller reads the READY line from
        `proxy_process.stdout` (the lab agent restarts a dead proxy that way, without stopping
        its loop)."""
        from .abi import PROXY_PORT  # noqa: PLC0415

        old = self._proxy
        if old is not None and old.poll() is not None:  # a dead proxy leaves the record and the list
            self._servers = [p for p in self._servers if p is not old]
            self.record.resources = [r for r in self.record.resources
                                     if not (r.get("kind") == "process" and r.get("pid") == old.pid)]
        log = self.proxy_log_file
        proc = self._spawn("l7-proxy", self.record.node, "proxy",
                           ["--state", str(self.policy_file), "--port", str(PROXY_PORT),
                            "--events", str(self.proxy_events_file),
                            # DNS answers' addresses are learned there before the proxy releases them
                            "--fqdn-socket", str(lab_dir(self.name) / "fqdn.sock"),
                            "--limits", os.environ.get("L7LAB_PROXY_LIMITS", "")], log)
        self._proxy = proc
        if wait:
            wait_ready([("the L7 proxy", proc, log)])

    def stop_proxy(self, sig: int = signal.SIGKILL) -> None:
        """Stop the proxy (tests use SIGKILL to show that redirected flows then fail closed)."""
        if self._proxy is not None and self._proxy.poll() is None:
            self._proxy.send_signal(sig)
            self._proxy.wait(timeout=timescale.scaled(5))

    @property
    def zone_file(self) -> Path:
        """The cluster DNS's records (dataplane/clusterdns.py), read by every server with port 53."""
        return lab_dir(self.name) / "zone.json"

    def _write_zone(self) -> None:
        """Write the zone file in the lab's directory (recorded before it was made: `down` and
        `clean` remove it with everything in it, as the policy file and the logs). Only root
        reads it: a server loads it before confining."""
        from .clusterdns import zone_from_scenario  # noqa: PLC0415 - dnspython only where needed

        path = self.zone_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone_from_scenario(self.scenario).to_json()))
        os.replace(tmp, path)

    def _hosts_file(self, own_name: str, own_ip: str) -> str:
        """An endpoint's /etc/hosts, as the kubelet writes a pod's: localhost and the endpoint's own
        name, plus the node. No other name: pods find services, pods and world hosts through the
        cluster DNS, as in a cluster."""
        lines = ["# Kubernetes-managed hosts file (l7lab): other names come from the cluster DNS.",
                 "127.0.0.1\tlocalhost", f"{self.scenario.node_ip}\tnode", f"{own_ip}\t{own_name}"]
        return "\n".join(lines) + "\n"

    def _resolv_conf(self, namespace: str | None) -> str:
        """An endpoint's /etc/resolv.conf: for a pod (`namespace` given) the kubelet's for
        dnsPolicy ClusterFirst, naming the cluster DNS pod; for a world host, one that resolves
        nothing (it is outside the cluster)."""
        nameserver = self.scenario.nameserver
        if namespace is None or nameserver is None:
            # No cluster DNS (no pod labelled k8s-app=kube-dns), or a host outside the cluster:
            # nothing listens on the endpoint's own loopback port 53, so a lookup fails at once
            # (connection refused) instead of waiting seconds for a timeout per name tried.
            return "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
        return (f"search {' '.join(self.scenario.search_path(namespace))}\n"
                f"nameserver {nameserver}\n"
                "options ndots:5\n")

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
                                    start_new_session=True, env={**os.environ, **timescale.environ(), "PYTHONUNBUFFERED": "1"})
        self._servers.append(proc)
        self.record.add(kind="process", pid=proc.pid, start=processes.start_time(proc.pid), netns=ns,
                        what=f"{module} {key}", log=str(log))
        return proc

    def _start_servers(self, plan: list[tuple[str, str, str, str, tuple[Port, ...], dict[str, str]]]) -> None:
        """Every endpoint's server, confined (it confines itself once loaded): as a uid of its own
        (confine.endpoint_user), the run directory hidden. Its request log goes to a directory of
        its own, owned by that uid (it rotates the log there), which it opens before the lab's
        directory disappears from its view."""
        started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        for kind, key, ns, _ip, ports, _labels in plan:
            tcp = ",".join(str(p.port) for p in ports if p.protocol == "TCP")
            udp = ",".join(str(p.port) for p in ports if p.protocol == "UDP")
            sctp = ",".join(str(p.port) for p in ports if p.protocol == "SCTP")
            if not tcp and not udp and not sctp:
                continue
            user = confine.endpoint_user(topology.NETNS_DIR / ns)
            endpoint_dir = ns.removeprefix(lab_prefix(self.name))
            log = lab_dir(self.name) / (endpoint_dir + ".log")
            logs = request_log(lab_dir(self.name), endpoint_dir).parent
            logs.mkdir(mode=0o755, exist_ok=True)
            os.chown(logs, user.uid, user.gid, follow_symlinks=False)
            tls: list[str] = []
            if kind == "world" and key in self._tls:
                files = self._tls[key]
                tls = ["--tls", ",".join(str(p.port) for p in ports if p.tls),
                       "--cert", str(files.cert), "--key", str(files.key)]
            dns = ["--zone", str(self.zone_file)] if any(p.port == DNS_PORT for p in ports) else []
            proc = self._spawn(key, ns, "dataplane.podserver",
                               ["--endpoint", key, "--tcp", tcp, "--udp", udp, "--sctp", sctp, *tls,
                                "--log-dir", str(logs),
                                "--uid", str(user.uid), "--gid", str(user.gid), "--hide", str(run_dir()), *dns], log)
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
    """Wait until every process printed READY, within `timeout` seconds of an ordinary machine
    (scaled to this one: an emulated or loaded machine starts a dozen interpreters slowly); a
    failure names the process and its last log line."""
    timeout = timescale.scaled(timeout)
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


def _owned(path: Path, lab: str) -> bool:
    return safety.check_owned(path, lab, run_dir(), NETNS_ETC)


def _remove(path: Path, lab: str) -> bool:
    return safety.remove_owned(path, lab, run_dir(), NETNS_ETC)


def check_record(rec: LabRecord) -> None:
    """Everything a record lists for removal must be the lab's own (a record file is input too:
    it may have been edited): namespaces with the lab's prefix, directories among its paths.
    UnsafePathError names the first resource that is not, before anything is removed.
    (Recorded processes are checked where they are stopped: see `_recorded_victims`.)"""
    safety.check_lab_name(rec.lab)
    for res in rec.resources:
        kind = res.get("kind")
        if kind == "netns":
            safety.check_netns_name(rec.lab, res.get("name"))
        elif kind == "dir":
            if not isinstance(res.get("path"), str):
                raise safety.UnsafePathError(f"lab {rec.lab!r}: a recorded directory has no path: {res!r}")
            _owned(Path(res["path"]), rec.lab)


def _recorded_victims(rec: LabRecord) -> list[dict[str, Any]]:
    """The recorded processes to stop: only one that is still the process the lab started (same
    start time) and lives in the lab namespace it was recorded in; a record could name any
    process of the machine, and its start time is no secret."""
    recorded = [r for r in rec.resources if r.get("kind") == "process"]
    valid = [r for r in recorded if isinstance(r.get("pid"), int) and not isinstance(r["pid"], bool)
             and r["pid"] > 1 and safety.lab_of_netns(str(r.get("netns", ""))) == rec.lab]
    for r in recorded:
        if r not in valid:
            _warn(f"lab {rec.lab}: not stopping recorded process {r!r}: not a process in one of the lab's namespaces")
    members = {ns: set(topology.pids_in_netns(ns)) for ns in {r["netns"] for r in valid}}
    return [r for r in valid if r.get("start") is not None and processes.start_time(r["pid"]) == r["start"]
            and r["pid"] in members[r["netns"]]]


def down_from_record(rec: LabRecord) -> list[str]:
    """Remove what the record lists, newest first; idempotent. Returns what was removed.
    The record is checked first (`check_record`): a resource the lab does not own stops
    everything, with nothing removed."""
    check_record(rec)
    removed: list[str] = []
    victims = _recorded_victims(rec)
    topology.kill_pids([r["pid"] for r in victims])
    removed += [f"process {r['pid']} ({r.get('what', '')})" for r in victims]
    for res in reversed(rec.resources):
        if res.get("kind") == "netns":
            topology.kill_pids(topology.pids_in_netns(res["name"]))
            if topology.remove_netns(res["name"]):
                removed.append(f"netns {res['name']}")
        elif res.get("kind") == "dir":
            if _remove(Path(res["path"]), rec.lab):
                removed.append(f"dir {res['path']}")
    if _remove(record_path(rec.lab), rec.lab):
        removed.append(f"record {record_path(rec.lab)}")
    return removed


def down(lab: str) -> list[str]:
    """`l7lab down LAB`: remove what the record lists, then anything else with the prefix.
    The name, the record and every path are checked before anything is removed."""
    validate_lab_name(lab)
    rec = LabRecord.load(lab)
    if rec is not None:
        try:
            check_record(rec)
        except safety.UnsafePathError as exc:
            raise safety.UnsafePathError(
                f"the record {record_path(lab)} lists what lab {lab!r} does not own: {exc}; "
                f"'l7lab clean {lab}' removes what carries the lab's prefix without reading the record") from None
    _clean_plan(lab)  # refuses (removing nothing) if a path of the lab is a link, say
    removed = down_from_record(rec) if rec else []
    return removed + clean(lab)


def _listed_lab(name: str, where: str) -> str | None:
    """A lab name read back from the machine (a file name, a namespace): None, with a warning,
    when it is not one l7lab could have made."""
    if safety.is_lab_name(name):
        return name
    _warn(f"ignoring {where}: {name!r} is not a valid lab name ({safety.LAB_NAME_RULE})")
    return None


def running_labs() -> list[str]:
    """Labs with a record or with namespaces still carrying their prefix (valid names only)."""
    names: set[str | None] = set()
    rd = run_dir()
    if rd.is_dir():
        names |= {_listed_lab(p.name[:-5], f"record {p}") for p in rd.iterdir() if p.name.endswith(".json")}
    for ns in topology.list_netns(PREFIX):
        lab = safety.lab_of_netns(ns)
        if lab is None:
            _warn(f"ignoring network namespace {ns!r}: not named l7lab-<lab>.<name> with a valid lab name")
        names.add(lab)
    return sorted(n for n in names if n)


def known_labs() -> list[str]:
    """Every lab anything is left of: running labs, and lab directories and /etc/netns entries
    without a record or a namespace (what `clean --all` removes)."""
    names: set[str | None] = set(running_labs())
    rd = run_dir()
    if rd.is_dir():
        names |= {_listed_lab(p.name, f"directory {p}") for p in rd.iterdir()
                  if p.is_dir() and not p.is_symlink()}
        names |= {_listed_lab(p.name[:-4], f"file {p}") for p in rd.iterdir() if p.name.endswith(".tmp")}
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.iterdir():
            if d.name.startswith(PREFIX):
                lab = safety.lab_of_netns(d.name)
                if lab is None:
                    _warn(f"ignoring {d}: not named l7lab-<lab>.<name> with a valid lab name")
                names.add(lab)
    return sorted(n for n in names if n)


def _clean_plan(lab: str) -> tuple[list[str], list[Path]]:
    """The namespaces and paths `clean(lab)` removes, every one checked to be the lab's own;
    UnsafePathError (nothing removed yet) if one is not."""
    validate_lab_name(lab)
    prefix = lab_prefix(lab)
    namespaces = []
    for ns in topology.list_netns(prefix):
        if safety.lab_of_netns(ns) == lab:
            namespaces.append(ns)
        else:
            _warn(f"ignoring network namespace {ns!r}: not a name l7lab makes")
    paths = []
    if NETNS_ETC.is_dir():
        for d in sorted(NETNS_ETC.iterdir()):
            if d.name.startswith(prefix):
                if safety.lab_of_netns(d.name) == lab:
                    paths.append(d)
                else:
                    _warn(f"ignoring {d}: not a name l7lab makes")
    paths += [record_path(lab), record_path(lab).with_suffix(".tmp"), lab_dir(lab)]
    paths = [p for p in paths if _owned(p, lab)]  # raises for a link; drops what is not there
    return namespaces, paths


def has_leftovers(lab: str) -> bool:
    """Whether anything of lab `lab` is on this machine (what `clean LAB` would remove)."""
    try:
        namespaces, paths = _clean_plan(lab)
    except safety.UnsafePathError:
        return True
    return bool(namespaces or paths)


def clean(lab: str | None = None) -> list[str]:
    """Remove whatever carries the prefix of `lab`, record or not (every lab anything is left
    of when None: `clean --all`). Returns what was removed."""
    if lab is None:
        return [item for name in known_labs() for item in clean(name)]
    namespaces, paths = _clean_plan(lab)
    removed: list[str] = []
    for ns in namespaces:
        pids = topology.pids_in_netns(ns)
        topology.kill_pids(pids)
        removed += [f"process {p}" for p in pids]
        if topology.remove_netns(ns):
            removed.append(f"netns {ns}")
    records = (record_path(lab), record_path(lab).with_suffix(".tmp"))
    for path in paths:
        if _remove(path, lab):
            removed.append(f"{'record' if path in records else 'dir'} {path}")
    return removed
