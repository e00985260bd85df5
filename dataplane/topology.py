"""Topology: the only code in l7lab that talks netlink (pyroute2) or enters network namespaces.

It realizes what the lab asks for, one primitive at a time: namespaces, the veth pair of an
endpoint with its addresses and routes, the node's forwarding and proxy routing, tc attachment
of BPF programs, sockets opened inside a namespace, and the processes that live in one.

Addressing follows the routed model Calico and Cilium use: a pod's eth0 carries its own /32, its
default route points at GATEWAY_IP "on link", and the node answers ARP for that address because
it holds it on `lo` (Linux answers ARP for any local address on any interface). The node routes
each pod's /32 to the node side of its veth. No bridge, no address on the node-side veths, and
nothing in the root namespace: every link lives in a namespace the lab created.

pyroute2 0.9: one `IPRoute(netns=...)` socket per namespace and operation group, always closed in
`finally` (the `_ipr` context manager).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from .abi import MARK_MAGIC_MASK, MARK_MAGIC_TO_PROXY

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
PROXY_ROUTE_TABLE = 2004
PROXY_RULE_PRIORITY = 9
IFNAMSIZ = 15

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread inside network namespace `name`, then come back.

    Only for short synchronous work (opening a socket, writing a sysctl): sockets keep the
    namespace they were created in, and /proc/sys/net files the namespace they were opened in.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def enter_netns(name: str) -> None:
    """Move this thread, for good, into network namespace `name` (the lab agent lives in its
    lab's node namespace, so whatever removes the lab's processes finds it too)."""
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        _setns(target)
    finally:
        os.close(target)


def socket_in(ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A non-blocking socket that lives in namespace `ns`."""
    with in_netns(ns):
        sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    return sock


def sysctl_read(ns: str, key: str) -> str:
    """Read a (per-namespace) sysctl inside `ns`, e.g. 'net.ipv4.ping_group_range'."""
    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(ns):
        fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)


def sysctl(ns: str, key: str, value: str | int) -> None:
    """Write a (per-namespace) sysctl inside `ns`, e.g. 'net.ipv4.ip_forward'."""
    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(ns):
        fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def _ipr(ns: str) -> Iterator[IPRoute]:
    ipr = IPRoute(netns=ns)
    try:
        yield ipr
    finally:
        ipr.close()


# --- namespaces --------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str = "") -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def create_netns(name: str) -> None:
    """Create a namespace with loopback up; an existing one is an error (labs never share)."""
    if netns_exists(name):
        raise FileExistsError(errno.EEXIST, f"network namespace {name} already exists")
    netns.create(name)
    with _ipr(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    # Lab namespaces speak IPv4 only: no router solicitations or DAD noise on the veths.
    sysctl(name, "net.ipv6.conf.all.disable_ipv6", 1)
    sysctl(name, "net.ipv6.conf.default.disable_ipv6", 1)


def remove_netns(name: str) -> bool:
    """Remove a namespace (its links go with it). Idempotent: False when it was not there."""
    if not netns_exists(name):
        return False
    try:
        netns.remove(name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return False
    return True


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def pids_in_netns(name: str) -> list[int]:
    """Processes whose network namespace is `name` (what `ip netns pids` reports)."""
    inode = _netns_inode(name)
    if inode is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_pids(pids: list[int], grace: float = 1.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left. Never the caller
    (a lab's agent lives in the lab's node namespace and may be the one taking it down)."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in alive:
        # Reap our own children so they do not linger as zombies; others are reaped by init.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- node and endpoints ------------------------------------------------------------------------


def setup_node(ns: str, addresses: list[str]) -> None:
    """Make `ns` the lab node: addresses on lo, forwarding on, and the proxy's routing.

    The to-proxy fwmark rule and the `local` route in table 2004 are what deliver packets that
    the tc program assigned to the proxy socket, exactly as Cilium does.
    """
    with _ipr(ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for addr in addresses:
            ipr.addr("add", index=lo, address=addr, prefixlen=32)
        ipr.rule("add", fwmark=MARK_MAGIC_TO_PROXY, fwmask=MARK_MAGIC_MASK, table=PROXY_ROUTE_TABLE,
                 priority=PROXY_RULE_PRIORITY)
        ipr.route("add", dst="0.0.0.0/0", type="local", table=PROXY_ROUTE_TABLE, oif=lo, scope="host")
    sysctl(ns, "net.ipv4.ip_forward", 1)
    # Asymmetric paths through the proxy must not be dropped by reverse-path filtering.
    sysctl(ns, "net.ipv4.conf.all.rp_filter", 0)
    sysctl(ns, "net.ipv4.conf.default.rp_filter", 0)


@dataclass(frozen=True)
class RoutingRule:
    """An IPv4 policy routing rule of the node, as the kernel lists it."""

    priority: int
    fwmark: int
    fwmask: int
    table: int

    def to_json(self) -> dict[str, int]:
        return {"priority": self.priority, "fwmark": self.fwmark, "fwmask": self.fwmask, "table": self.table}


@dataclass(frozen=True)
class TableRoute:
    """A route of the proxy's table, as the kernel lists it."""

    table: int
    type: str  # "local", "unicast", ...
    dst: str  # "0.0.0.0/0"
    dev: str

    def to_json(self) -> dict[str, object]:
        return {"table": self.table, "type": self.type, "dst": self.dst, "dev": self.dev}


@dataclass(frozen=True)
class ProxyRouting:
    """What the node's routing does with a to-proxy packet: its fwmark rules and the routes of
    the proxy's table (read back by `proxy_routing`, shown by `l7lab trace`)."""

    rules: tuple[RoutingRule, ...]
    routes: tuple[TableRoute, ...]
    table: int = PROXY_ROUTE_TABLE

    def to_proxy_rule(self) -> RoutingRule | None:
        """The rule that sends the to-proxy mark to the proxy's table, if there is one."""
        return next((r for r in self.rules if r.table == self.table and r.fwmask
                     and (MARK_MAGIC_TO_PROXY & r.fwmask) == r.fwmark), None)

    def local_route(self) -> TableRoute | None:
        """The proxy table's `local 0.0.0.0/0` route, if there is one."""
        return next((r for r in self.routes if r.table == self.table and r.type == "local"
                     and r.dst == "0.0.0.0/0"), None)

    def to_json(self) -> dict[str, object]:
        return {"table": self.table, "rules": [r.to_json() for r in self.rules],
                "routes": [r.to_json() for r in self.routes]}


_ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
                7: "unreachable", 8: "prohibit"}


def proxy_routing(ns: str) -> ProxyRouting:
    """Read (never change) the node's fwmark rules and the routes of the proxy's table."""
    with _ipr(ns) as ipr:
        rules = tuple(RoutingRule(int(m.get("FRA_PRIORITY") or 0), int(m.get("FRA_FWMARK") or 0),
                                  int(m.get("FRA_FWMASK") or 0), int(m.get("FRA_TABLE") or m["table"]))
                      for m in ipr.get_rules(family=socket.AF_INET) if m.get("FRA_FWMARK") is not None)
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
        routes = tuple(TableRoute(int(m.get("RTA_TABLE") or m["table"]), _ROUTE_TYPES.get(m["type"], str(m["type"])),
                                  f"{m.get('RTA_DST') or '0.0.0.0'}/{m['dst_len']}",
                                  str(names.get(m.get("RTA_OIF"), m.get("RTA_OIF") or "")))
                       for m in ipr.get_routes(family=socket.AF_INET, table=PROXY_ROUTE_TABLE))
    return ProxyRouting(rules, routes)


@dataclass(frozen=True)
class EndpointLink:
    """The result of wiring one endpoint: its node-side interface and its index."""

    host_ifname: str
    host_ifindex: int


def add_endpoint(node_ns: str, endpoint_ns: str, host_ifname: str, ip: str, gateway: str,
                 node_ip: str) -> EndpointLink:
    """Join `endpoint_ns` to the node with a veth pair and route its /32 both ways."""
    if len(host_ifname) > IFNAMSIZ:
        raise ValueError(f"interface name {host_ifname!r} is longer than {IFNAMSIZ} characters")
    with _ipr(node_ns) as node:
        node.link("add", ifname=host_ifname, kind="veth",
                  peer={"ifname": "eth0", "net_ns_fd": str(NETNS_DIR / endpoint_ns)})
        index = node.link_lookup(ifname=host_ifname)[0]
        node.link("set", index=index, state="up")
    # rp_filter is per interface too (max of all and the interface); keep it off everywhere.
    sysctl(node_ns, f"net.ipv4.conf.{host_ifname}.rp_filter", 0)
    with _ipr(endpoint_ns) as ep:
        eth0 = ep.link_lookup(ifname="eth0")[0]
        ep.addr("add", index=eth0, address=ip, prefixlen=32)
        ep.link("set", index=eth0, state="up")
        ep.route("add", dst=f"{gateway}/32", oif=eth0, scope="link")
        ep.route("add", dst="0.0.0.0/0", gateway=gateway, oif=eth0)
    with _ipr(node_ns) as node:
        node.route("add", dst=f"{ip}/32", oif=index, prefsrc=node_ip)
    return EndpointLink(host_ifname, index)


# --- BPF attachment ----------------------------------------------------------------------------


def attach_tc(ns: str, ifname: str, *, ingress_fd: int | None, egress_fd: int | None,
              name: str = "l7lab") -> None:
    """Attach programs (clsact, direct action) to an interface of `ns`, replacing any earlier."""
    with _ipr(ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        with contextlib.suppress(NetlinkError):
            ipr.tc("add", "clsact", index)
        for fd, parent in ((ingress_fd, "ffff:fff2"), (egress_fd, "ffff:fff3")):
            if fd is None:
                continue
            ipr.tc("add-filter", "bpf", index, ":1", fd=fd, name=name, parent=parent,
                   classid=1, direct_action=True)


def detach_tc(ns: str, ifname: str) -> None:
    """Remove the clsact qdisc (and with it every filter); idempotent."""
    if not netns_exists(ns):
        return
    with _ipr(ns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", found[0])


def add_veth_pair(ns: str, ifname: str, peer: str) -> int:
    """A veth pair with both ends inside `ns`, both up (the setup self-check attaches to it);
    returns the index of `ifname`."""
    for name in (ifname, peer):
        if not 0 < len(name) <= IFNAMSIZ:
            raise ValueError(f"interface name {name!r}: expected 1..{IFNAMSIZ} characters")
    with _ipr(ns) as ipr:
        ipr.link("add", ifname=ifname, kind="veth", peer=peer)
        for name in (ifname, peer):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        return int(ipr.link_lookup(ifname=ifname)[0])


def tc_bpf_filters(ns: str, ifname: str) -> dict[str, list[str]]:
    """The names of the BPF filters on the clsact hooks of an interface of `ns`, read back from
    the kernel: {"ingress": [...], "egress": [...]}."""
    out: dict[str, list[str]] = {"ingress": [], "egress": []}
    with _ipr(ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for hook, parent in (("ingress", 0xFFFFFFF2), ("egress", 0xFFFFFFF3)):
            for msg in ipr.get_filters(index=index, parent=parent):
                # A filter is listed twice: its chain head (no options) and the filter proper.
                if msg.get_attr("TCA_KIND") == "bpf" and msg.get_attr("TCA_OPTIONS") is not None:
                    out[hook].append(str(msg.get_nested("TCA_OPTIONS", "TCA_BPF_NAME")))
    return out
