"""How a client in a pod turns a name into an address, for real and in the oracle's model.

A pod's resolv.conf is the kubelet's (ClusterFirst): the cluster DNS pod as nameserver, the
search path `<ns>.svc.cluster.local svc.cluster.local cluster.local` and `ndots:5`. A stub
resolver (glibc's `res_nsearch`) then asks, in order:

- a name with a trailing dot: that name only;
- a name with at least `ndots` dots: the name itself, then the name under each search domain;
- any other name: the name under each search domain, then the name itself.

NXDOMAIN, and an answer without an address (NODATA), go on to the next candidate; an address
ends the lookup (the first one is used); REFUSED, SERVFAIL and silence end it unresolved, as in
glibc (Cilium's `--tofqdns-dns-reject-response-code` exists because REFUSED stops such
searches). A DNS rule that refuses the search-path names therefore makes a name unresolvable
even when it allows the name itself: allow `*.cluster.local` too, or use a trailing dot.

`lookup_in_netns` does that with real queries from the pod's namespace (UDP, what the pod's
resolver uses first); `model_lookup` is the oracle's account of the same lookup: each query
judged by the policy like any flow to the DNS pod, answered from the cluster DNS's zone, and,
when it went through the DNS proxy, learned into the model's FQDN cache as the proxy would.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import timescale, topology
from .cache import AnswerRecord, FqdnCache

if TYPE_CHECKING:
    from ..clusterdns import Zone
    from ..policy.engine import PolicyEngine

NDOTS = 5
DNS_PORT = 53
RCODE_NOERROR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_REFUSED = 0, 2, 3, 5


def candidates(name: str, search: list[str], ndots: int = NDOTS) -> list[str]:
    """The names a stub resolver asks for `name`, in order (lower case, no trailing dot)."""
    if name.endswith("."):
        return [name.rstrip(".").lower()]
    name = name.lower()
    under = [f"{name}.{domain}" for domain in search]
    return [name, *under] if name.count(".") >= ndots else [*under, name]


@dataclass
class Lookup:
    """What one lookup came to."""

    name: str
    address: str = ""  # the address the client uses; "" when unresolved
    # (name asked, what happened: "NOERROR 203.0.113.20", "NXDOMAIN", "REFUSED", "dropped", ...)
    queries: list[tuple[str, str]] = field(default_factory=list)
    why: str = ""  # why it is unresolved
    learned: list[str] = field(default_factory=list)  # model: names the DNS proxy would learn
    last_sport: int = 0  # the source port of the last query sent (finds its kernel events)

    @property
    def resolved(self) -> bool:
        return bool(self.address)

    def summary(self) -> str:
        steps = ", ".join(f"{q} {what}" for q, what in self.queries)
        return f"lookup of {self.name}: {steps}" if steps else f"lookup of {self.name}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address or None, "queries": [list(q) for q in self.queries],
                "why": self.why or None}


# ---------------------------------------------------------------------------- the real lookup


async def lookup_in_netns(netns: str, name: str, nameserver: str, search: list[str], timeout: float) -> Lookup:
    """Resolve `name` as a pod's stub resolver does, with queries sent from namespace `netns`,
    waiting `timeout` seconds of an ordinary machine (scaled to this one) for each answer."""
    timeout = timescale.scaled(timeout)
    import dns.exception  # noqa: PLC0415 - only name probes need it
    import dns.message  # noqa: PLC0415
    import dns.rcode  # noqa: PLC0415
    import dns.rdatatype  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    result = Lookup(name)
    for qname in candidates(name, search):
        query = dns.message.make_query(qname + ".", "A")
        sock = topology.socket_in(netns, kind=socket.SOCK_DGRAM)
        try:
            sock.connect((nameserver, DNS_PORT))
            result.last_sport = sock.getsockname()[1]
            await loop.sock_sendall(sock, query.to_wire())
            deadline = time.monotonic() + timeout
            reply = None
            while reply is None and (left := deadline - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 65535), left)
                except asyncio.TimeoutError:
                    break
                except OSError as exc:  # ICMP unreachable: nothing listens on the DNS pod's port
                    result.queries.append((qname, f"error ({exc.strerror or exc})"))
                    result.why = f"the query for {qname} got no DNS answer: {exc.strerror or exc}"
                    return result
                try:
                    message = dns.message.from_wire(data)
                except dns.exception.DNSException:
                    continue
                if message.id == query.id:
                    reply = message
        finally:
            sock.close()
        if reply is None:
            result.queries.append((qname, "dropped"))
            result.why = f"no answer to the query for {qname} within {timeout:g}s"
            return result
        rcode = reply.rcode()
        addresses = [rd.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]
        if rcode == RCODE_NOERROR and addresses:
            result.queries.append((qname, f"NOERROR {addresses[0]}"))
            result.address = addresses[0]
            return result
        text = dns.rcode.to_text(rcode) if rcode != RCODE_NOERROR else "NODATA"
        result.queries.append((qname, text))
        if rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
            result.why = f"the query for {qname} was answered {text}"
            return result
    result.why = f"no name of the search path has an address (last: {result.queries[-1][0]} {result.queries[-1][1]})"
    return result


# ---------------------------------------------------------------------------- the oracle's model


def model_lookup(engine: "PolicyEngine", zone: "Zone", cache: FqdnCache, source: str, name: str,
                 now: float) -> Lookup:
    """The oracle's account of `source`'s lookup of `name`: each query a UDP flow to the
    nameserver judged by `engine`; an allowed query answered from `zone`; an answer relayed by
    the DNS proxy (the query was redirected to it) learned into `cache`."""
    from ..policy.engine import Flow  # noqa: PLC0415 - the policy layer imports this package's cache

    sc = engine.scenario
    result = Lookup(name)
    nameserver = sc.nameserver
    if nameserver is None:
        result.why = "the lab has no cluster DNS (no pod labelled k8s-app=kube-dns)"
        return result
    pod = sc.pods[source]
    for qname in candidates(name, sc.search_path(pod.namespace)):
        decision = engine.verdict(Flow(source, nameserver, "UDP", DNS_PORT, dns_name=qname,
                                       destination_name=sc.pods[sc.cluster_dns_pods()[0]].name))
        if decision.outcome == "dropped":
            result.queries.append((qname, "dropped"))
            result.why = f"the query for {qname} is dropped: {decision.trace[-1] if decision.trace else 'policy'}"
            return result
        if decision.outcome != "allowed":  # the DNS proxy's REFUSED, or nothing listens there
            result.queries.append((qname, "REFUSED" if decision.outcome == "refused" else decision.outcome))
            result.why = f"the query for {qname} was answered REFUSED" if decision.outcome == "refused" else \
                f"the query for {qname} was {decision.outcome}"
            return result
        answer = zone.resolve(qname, "A")
        records = [AnswerRecord(o.lower().rstrip("."), t, ttl, d.lower().rstrip(".") if t == "CNAME" else d)
                   for o, t, ttl, d in answer.records]
        addresses = [r.data for r in records if r.type == "A"]
        if decision.l7 is not None and answer.rcode == RCODE_NOERROR and addresses:
            learned = cache.learn(source, qname, records, now)
            result.learned.extend(sorted({e.name for e in learned}))
        if answer.rcode == RCODE_NOERROR and addresses:
            result.queries.append((qname, f"NOERROR {addresses[0]}"))
            result.address = addresses[0]
            return result
        text = "NXDOMAIN" if answer.rcode == RCODE_NXDOMAIN else "NODATA" if answer.rcode == RCODE_NOERROR else str(answer.rcode)
        result.queries.append((qname, text))
        if answer.rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
            result.why = f"the query for {qname} was answered {text}"
            return result
    result.why = f"no name of the search path has an address (last: {result.queries[-1][0]} {result.queries[-1][1]})"
    return result
