"""Setup self-check: asks the running kernel, one capability at a time, for what the lab needs.

Run by scripts/setup.sh (`python -m dataplane.selfcheck`, which can also be run alone; `--json`
for machines). Every capability the datapath (dataplane/bpf/) and its tests rely on is asked for
for real, never inferred from the version number:

- map kinds: one map of each kind is created (the kernel accepts or refuses it);
- helpers and program features: ONE BCC compile holds a small tc program per capability, each
  loaded on its own so the verifier accepts or refuses it alone (a compile costs far more than a
  load, so there is never one compile per capability);
- tc attachment: the basic program is attached at ingress and egress on the clsact qdisc of a
  veth inside a throwaway network namespace made for it and always removed (never the root
  namespace, never the machine's interfaces);
- BPF_PROG_TEST_RUN: the basic program runs once on a test packet with skb->mark set.

It prints one line per capability (ok / missing, the Linux version that brought it and what the
lab cannot do without it) and exits non-zero if anything is missing. The minimum versions are
those of BCC's docs/kernel-versions.md and the kernel commits that added each feature.

Architecture: only the loader (dataplane/datapath.py) imports bcc and only dataplane/topology.py
opens netlink; this module asks them (`probe_map_create`, `ProbeBuild`, `add_veth_pair`,
`attach_tc`, `tc_bpf_filters`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import safety
from .errors import SetupError

if TYPE_CHECKING:
    from .datapath import ProbeBuild

# BPF_MAP_TYPE_* (include/uapi/linux/bpf.h)
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_LRU_HASH, MAP_LPM_TRIE, MAP_RINGBUF = 1, 2, 5, 9, 11, 27
BPF_F_NO_PREALLOC = 1  # an LPM trie must be created with it
TC_ACT_OK = 0

# What a simulated lack puts in place of a map kind or a helper (tests only, see `run`): ids no
# kernel defines, so the kernel itself refuses them.
_UNKNOWN_MAP_TYPE = 0xFFFF
_UNKNOWN_HELPER = 0xFFFF

OK, MISSING, UNTESTED = "ok", "missing", "untested"


@dataclass(frozen=True)
class MapSpec:
    """One map the kernel is asked to create (BPF_MAP_CREATE)."""

    kind: str  # for messages: "hash", "LRU hash", ...
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


@dataclass(frozen=True)
class Capability:
    """A kernel feature the lab relies on, and how the self-check asks for it.

    `program` is the C body of a probe program named `probe_<name>` (its argument is `skb`),
    after `declarations` (the maps it uses); `helpers` are the helpers it calls, the first being
    the one a simulated lack replaces. `requires` names capabilities that must be present for
    this one to be asked at all."""

    name: str
    title: str
    since: str  # the Linux version that brought it
    needed_for: str  # what the lab cannot do without it
    maps: tuple[MapSpec, ...] = ()
    declarations: str = ""
    program: str = ""
    helpers: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    @property
    def program_name(self) -> str:
        return "probe_" + self.name.replace("-", "_")


_PAGE = os.sysconf("SC_PAGE_SIZE")

CAPABILITIES: tuple[Capability, ...] = (
    Capability(
        "tc-programs", "tc BPF programs with direct packet access", "4.7",
        "no packet can be given a verdict",
        program="""
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    skb->mark = skb->mark + 1;  /* what test-run checks */
    if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > end)
        return TC_ACT_OK;
    if (bpf_ktime_get_ns() == 0 && bpf_get_prandom_u32() == 0 && skb->ingress_ifindex == 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;""",
        helpers=("bpf_ktime_get_ns", "bpf_get_prandom_u32")),
    Capability(
        "clsact", "tc clsact qdisc with direct-action filters at ingress and egress", "4.5",
        "the programs cannot be attached to the pods' veths", requires=("tc-programs",)),
    Capability(
        "hash-maps", "hash and array maps", "3.19",
        "endpoints, services and trace state cannot be stored",
        maps=(MapSpec("hash", MAP_HASH, 4, 8, 16), MapSpec("array", MAP_ARRAY, 4, 4, 1)),
        declarations="BPF_HASH(probe_hash_map, u32, u64, 16);\nBPF_ARRAY(probe_array_map, u32, 1);",
        program="""
    u32 key = skb->ifindex, slot = 0;
    u64 one = 1;
    probe_hash_map.update(&key, &one);
    u64 *v = probe_hash_map.lookup(&key);
    u32 *a = probe_array_map.lookup(&slot);
    probe_hash_map.delete(&key);
    return (v && a) ? TC_ACT_OK : TC_ACT_UNSPEC;"""),
    Capability(
        "percpu-hash-maps", "per-CPU hash maps", "4.6", "verdict metrics cannot be counted",
        maps=(MapSpec("per-CPU hash", MAP_PERCPU_HASH, 4, 8, 16),),
        declarations="BPF_PERCPU_HASH(probe_percpu_map, u32, u64, 16);",
        program="""
    u32 key = skb->ifindex;
    u64 one = 1;
    u64 *v = probe_percpu_map.lookup(&key);
    if (v)
        *v += 1;
    else
        probe_percpu_map.insert(&key, &one);
    return TC_ACT_OK;"""),
    Capability(
        "lru-hash-maps", "LRU hash maps", "4.10",
        "connections cannot be tracked (conntrack, fragments, service backends)",
        maps=(MapSpec("LRU hash", MAP_LRU_HASH, 4, 8, 16),),
        declarations='BPF_TABLE("lru_hash", u32, u64, probe_lru_map, 16);',
        program="""
    u32 key = skb->ifindex;
    u64 one = 1;
    if (!probe_lru_map.lookup(&key))
        probe_lru_map.update(&key, &one);
    probe_lru_map.delete(&key);
    return TC_ACT_OK;"""),
    Capability(
        "lpm-trie-maps", "LPM trie maps", "4.11",
        "the ipcache and the policy map (longest-prefix lookups) cannot be built",
        maps=(MapSpec("LPM trie", MAP_LPM_TRIE, 8, 8, 16, BPF_F_NO_PREALLOC),),
        declarations="struct probe_lpm_key { u32 prefixlen; u32 addr; };\n"
                     "BPF_LPM_TRIE(probe_lpm_map, struct probe_lpm_key, u64, 16);",
        program="""
    struct probe_lpm_key key = {.prefixlen = 32, .addr = skb->mark};
    return probe_lpm_map.lookup(&key) ? TC_ACT_OK : TC_ACT_UNSPEC;"""),
    Capability(
        "ringbuf-maps", "ring buffer maps", "5.8", "flow events cannot be delivered",
        maps=(MapSpec("ring buffer", MAP_RINGBUF, 0, 0, _PAGE),),
        declarations="BPF_RINGBUF_OUTPUT(probe_ringbuf_map, 1);",
        program="""
    u64 v = skb->len;
    probe_ringbuf_map.ringbuf_output(&v, sizeof(v), 0);
    return TC_ACT_OK;"""),
    Capability(
        "skb-helpers", "packet helpers bpf_skb_pull_data and bpf_skb_load_bytes", "4.9",
        "packets whose headers are not all in the linear buffer cannot be parsed",
        program="""
    u8 b = 0;
    bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct iphdr));
    if (bpf_skb_load_bytes(skb, 0, &b, 1) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;""",
        helpers=("bpf_skb_pull_data", "bpf_skb_load_bytes")),
    Capability(
        "rewrite-helpers", "rewrite helpers bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_skb_store_bytes",
        "4.1", "service addresses cannot be translated",
        program="""
    __be32 addr = 0;
    if (bpf_l4_csum_replace(skb, 50, 0, addr, BPF_F_PSEUDO_HDR | sizeof(addr)) < 0)
        return TC_ACT_SHOT;
    if (bpf_l3_csum_replace(skb, 24, 0, addr, sizeof(addr)) < 0)
        return TC_ACT_SHOT;
    return bpf_skb_store_bytes(skb, 30, &addr, sizeof(addr), 0) < 0 ? TC_ACT_SHOT : TC_ACT_OK;""",
        helpers=("bpf_l4_csum_replace", "bpf_l3_csum_replace", "bpf_skb_store_bytes")),
    Capability(
        "sk-lookup", "socket lookup helpers bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release", "4.20",
        "the L7 proxy's listening socket cannot be found",
        program="""
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk)
        bpf_sk_release(sk);
    sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk)
        bpf_sk_release(sk);
    return TC_ACT_OK;""",
        helpers=("bpf_sk_lookup_tcp", "bpf_sk_lookup_udp", "bpf_sk_release")),
    Capability(
        "skc-lookup", "bpf_skc_lookup_tcp and the socket's state", "5.2",
        "the proxy's socket of a connection already redirected cannot be found",
        program="""
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    int listening = 0;
    if (sk) {
        listening = sk->state == BPF_TCP_LISTEN;
        bpf_sk_release(sk);
    }
    return listening ? TC_ACT_OK : TC_ACT_UNSPEC;""",
        helpers=("bpf_skc_lookup_tcp",)),
    Capability(
        "sk-assign", "bpf_sk_assign at tc ingress", "5.7",
        "flows cannot be handed to the L7 proxy (L7 redirect)",
        program="""
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    long err;
    if (!sk)
        return TC_ACT_OK;
    err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err ? TC_ACT_SHOT : TC_ACT_OK;""",
        helpers=("bpf_sk_assign",), requires=("sk-lookup",)),
    Capability(
        "test-run", "BPF_PROG_TEST_RUN of tc programs with an skb context", "5.2",
        "benchmarks and kernel tests cannot run the programs on test packets", requires=("tc-programs",)),
)

BY_NAME = {c.name: c for c in CAPABILITIES}

# uapi headers only: the kernel-internal ones make the compile several times slower.
PROBE_PRELUDE = """\
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
"""

# The throwaway namespace: a lab-shaped name (l7lab-<lab>.check), so `l7lab clean --all` finds
# one left behind by a self-check that was killed; the veth pair inside it.
_NETNS_LAB_PREFIX = "selfcheck-"
_VETH = ("sc0", "sc1")
FILTER_NAME = "l7lab-selfcheck"


@dataclass
class Result:
    """What the kernel said about one capability."""

    capability: Capability
    status: str  # OK, MISSING or UNTESTED (a capability it needs is missing, or nothing could be asked)
    detail: str = ""  # the kernel's answer, or why it was not asked

    def to_json(self) -> dict[str, Any]:
        c = self.capability
        return {"name": c.name, "title": c.title, "since": c.since, "status": self.status,
                "needed_for": c.needed_for, "detail": self.detail}


@dataclass
class Report:
    kernel: str
    results: list[Result] = field(default_factory=list)
    error: str = ""  # what stopped the check before it could ask (not root, no BCC, no compile)
    headers: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.results) and all(r.status == OK for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "kernel": self.kernel, "minimum_kernel": minimum_kernel(),
                "headers": self.headers, "error": self.error or None, "seconds": round(self.seconds, 3),
                "capabilities": [r.to_json() for r in self.results]}


def minimum_kernel() -> str:
    """The oldest Linux that has every capability."""
    return max((c.since for c in CAPABILITIES), key=_version)


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of "5.8" or of a release such as "6.1.0-18-amd64"; () if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else ()


# -- the probe source -----------------------------------------------------------------------------
def probe_source(capabilities: list[Capability], simulate: str | None = None) -> str:
    """The one compilation unit: each capability's maps and program. For `simulate` (tests only),
    its first helper is replaced, in its own program only, by a helper id no kernel defines."""
    parts = [PROBE_PRELUDE]
    for cap in capabilities:
        if not cap.program:
            continue
        parts.append(f"/* {cap.title} (Linux {cap.since}) */")
        if cap.declarations:
            parts.append(cap.declarations)
        fake = cap.helpers[0] if simulate == cap.name and cap.helpers else None
        if fake:
            # The macro's own name is not expanded again inside it: __typeof__ sees BCC's helper.
            parts.append(f"#define {fake} ((__typeof__({fake})){_UNKNOWN_HELPER:#x})")
        parts.append(f"int {cap.program_name}(struct __sk_buff *skb)\n{{{cap.program}\n}}")
        if fake:
            parts.append(f"#undef {fake}")
    return "\n".join(parts) + "\n"


def check_simulation(name: str | None) -> None:
    """A simulated lack is for a capability asked through a map kind or a helper; ValueError else."""
    if name is None:
        return
    cap = BY_NAME.get(name)
    if cap is None or not (cap.maps or cap.helpers):
        can = ", ".join(c.name for c in CAPABILITIES if c.maps or c.helpers)
        raise ValueError(f"cannot simulate the lack of {name!r}: expected one of {can}")


# -- asking the kernel ----------------------------------------------------------------------------
def run(*, _simulate_missing: str | None = None) -> Report:
    """Ask the running kernel for every capability.

    `_simulate_missing` exists for the kernel tests alone (it is no command-line option): the
    named capability is asked with an id no kernel defines in place of its map kind or helper,
    so the kernel itself refuses it. It can only make a check fail, never pass."""
    check_simulation(_simulate_missing)
    started = time.monotonic()
    report = Report(kernel=platform.release(), headers=_headers())
    if os.geteuid() != 0:
        report.error = "not root: creating maps and loading BPF programs needs root"
        return report
    results: dict[str, Result] = {}
    try:
        _ask_maps(results, _simulate_missing)
        _ask_programs(results, _simulate_missing)
    except SetupError as exc:
        report.error = str(exc)
    for cap in CAPABILITIES:
        results.setdefault(cap.name, Result(cap, UNTESTED, "not asked: " + (report.error or "the check stopped")))
    report.results = [results[c.name] for c in CAPABILITIES]
    report.seconds = time.monotonic() - started
    return report


def _headers() -> str:
    build = f"/lib/modules/{platform.release()}/build"
    return os.path.realpath(build) if os.path.exists(build) else ""


def _ask_maps(results: dict[str, Result], simulate: str | None) -> None:
    from .datapath import probe_map_create  # noqa: PLC0415 - only when the kernel is asked

    for cap in CAPABILITIES:
        for i, spec in enumerate(cap.maps):
            map_type = _UNKNOWN_MAP_TYPE if simulate == cap.name and i == 0 else spec.map_type
            try:
                probe_map_create(map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)
            except OSError as exc:
                results[cap.name] = Result(cap, MISSING, f"the kernel refused a {spec.kind} map: {exc.strerror}")
                break


def _ask_programs(results: dict[str, Result], simulate: str | None) -> None:
    """One compile of every program whose maps exist, then each capability in order."""
    from .datapath import ProbeBuild, ProgramRefused  # noqa: PLC0415 - only when the kernel is asked

    with ProbeBuild(probe_source([c for c in CAPABILITIES if c.name not in results], simulate)) as build:
        fds: dict[str, int] = {}
        for cap in CAPABILITIES:
            if cap.name in results:
                continue
            lacking = [r for r in cap.requires if results[r].status != OK]
            if lacking:
                results[cap.name] = Result(cap, UNTESTED, "needs " + ", ".join(BY_NAME[r].title for r in lacking))
                continue
            if cap.program:
                try:
                    fds[cap.name] = build.load(cap.program_name)
                except ProgramRefused as exc:
                    results[cap.name] = Result(cap, MISSING, f"the verifier said: {exc.reason}")
                    continue
            if cap.name == "test-run":
                results[cap.name] = _ask_test_run(build, fds["tc-programs"])
            elif cap.name == "clsact":
                results[cap.name] = _ask_attach(fds["tc-programs"])
            else:
                results[cap.name] = Result(cap, OK)


def _ask_test_run(build: "ProbeBuild", fd: int) -> Result:
    cap = BY_NAME["test-run"]
    packet = bytes(64)  # an Ethernet frame of zeros: the program only counts on its length
    try:
        r = build.test_run(fd, BY_NAME["tc-programs"].program_name, packet, mark=0x1234)
    except OSError as exc:
        return Result(cap, MISSING, f"the kernel said: {exc.strerror}")
    if (r.retval, r.mark) != (TC_ACT_OK, 0x1235):
        return Result(cap, MISSING, f"the program ran but returned {r.retval} with mark {r.mark:#x} "
                                    "(expected 0 and 0x1235: the context did not reach it)")
    return Result(cap, OK)


def throwaway_netns() -> str:
    """A fresh, validated name for the namespace the attach check makes: l7lab-selfcheck-<hex>.check."""
    lab = safety.check_lab_name(_NETNS_LAB_PREFIX + uuid.uuid4().hex[:8])
    return safety.check_netns_name(lab, safety.lab_prefix(lab) + "check")


def _ask_attach(fd: int) -> Result:
    """Attach the basic program at ingress and egress of a veth in a namespace of its own, read
    the filters back, and remove the namespace whatever happened."""
    from . import topology  # noqa: PLC0415 - netlink only when the kernel is asked

    cap = BY_NAME["clsact"]
    ns = throwaway_netns()
    if topology.netns_exists(ns):
        return Result(cap, UNTESTED, f"network namespace {ns} already exists")
    try:
        try:
            topology.create_netns(ns)
            topology.add_veth_pair(ns, *_VETH)
        except Exception as exc:  # noqa: BLE001 - pyroute2 and the kernel raise many kinds
            return Result(cap, UNTESTED, f"could not make the test namespace and its veth pair: {exc}")
        try:
            topology.attach_tc(ns, _VETH[0], ingress_fd=fd, egress_fd=fd, name=FILTER_NAME)
            seen = topology.tc_bpf_filters(ns, _VETH[0])
        except Exception as exc:  # noqa: BLE001 - a netlink error names what the kernel refused
            return Result(cap, MISSING, f"the kernel said: {exc}")
        wanted = {"ingress": [FILTER_NAME], "egress": [FILTER_NAME]}
        if {hook: [n for n in names if n.startswith(FILTER_NAME)] for hook, names in seen.items()} != wanted:
            return Result(cap, MISSING, f"attached, but the kernel lists {seen}")
        return Result(cap, OK)
    finally:
        topology.remove_netns(ns)


# -- output ---------------------------------------------------------------------------------------
def format_result(r: Result, kernel: str = "") -> str:
    c = r.capability
    head = f"{c.title} (Linux {c.since})"
    if r.status == OK:
        return f"{head}: ok"
    if r.status == MISSING:
        line = f"{head}: missing — {c.needed_for}"
        if r.detail:
            line += f" ({r.detail})"
        if _version(kernel) and _version(kernel) >= _version(c.since):
            line += f"; Linux {kernel} is new enough: its configuration or a security policy turns it off"
        return line
    return f"{head}: not tested — {r.detail}" if r.detail else f"{head}: not tested"


def format_text(report: Report) -> str:
    headers = (f"BCC uses the headers in {report.headers}" if report.headers
               else f"no kernel headers at /lib/modules/{report.kernel}/build for BCC")
    lines = [f"l7lab self-check on Linux {report.kernel} ({headers})"]
    if report.error:
        lines.append(f"  cannot check: {report.error}")
    lines += [f"  {format_result(r, report.kernel)}" for r in report.results if not report.error or r.status != UNTESTED]
    if report.ok:
        lines.append(f"self-check: all {len(report.results)} capabilities present ({report.seconds:.1f}s)")
    else:
        bad = [r for r in report.results if r.status != OK]
        lines.append(f"self-check: FAILED, {len(bad)} of {len(report.results)} capabilities missing or not tested; "
                     f"the lab needs Linux {minimum_kernel()} or newer with all of them")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplane.selfcheck",
                                     description="Check that this kernel has every capability l7lab needs.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_text(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
