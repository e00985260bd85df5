"""Hubble's filter flags on real flows: the retail and dns-policy scenarios run for real (`l7lab
run --keep`), then `l7lab observe LAB <flags> -o json` must give exactly the flows the
scenario's probes make, flag by flag; `--follow` and `monitor` must show new traffic as it
happens. One lab per scenario serves the whole module.

The expectations come from the scenarios' probes (`load_scenario`), with what the policies say
about them: in retail only frontend-app reaches the two backends, through the L7 proxy, and
every other probe to them is dropped at L3/L4; in dns-policy mediabot's DNS goes through the DNS
proxy and its other traffic is checked at L3/L4. A probe through the proxy gives the Hubble
flows of its connection (a policy verdict and a trace to the proxy), its request, and the
response the proxy sent; a probe dropped at L3/L4 gives a policy verdict and a drop for each
packet dropped (a SYN may be sent again, so at least one).
"""

from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

import pytest

from dataplane.fqdn.oracle import expected_walk
from dataplane.policy import PolicyEngine
from dataplane.scenario import Probe, load_scenario
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.cli_lab import L7LAB, RETAIL, curl, l7lab, leftovers, nothing_left
from tests.support.wait import wait_for

pytestmark = pytest.mark.kernel

DNS_POLICY = REPO / "scenarios" / "dns-policy.yaml"
L7_BACKENDS = ("retail/inventory-api", "retail/payment-gateway")  # retail's pods with HTTP rules
Flow = dict[str, Any]


# --------------------------------------------------------------------------- reading flows


def name(flow: Flow, side: str) -> str:
    """'ns/pod', a world host's name, or the address (the node)."""
    ep = flow.get(side) or {}
    if ep.get("pod_name"):
        return f"{ep['namespace']}/{ep['pod_name']}"
    names = flow.get(f"{side}_names")
    return names[0] if names else flow["IP"][side]


def connection(flow: Flow) -> tuple[str, str, int]:
    """(client, server, server port): a response's sides put back as its request's."""
    l4 = next(iter(flow["l4"].values()))
    if flow.get("is_reply"):
        return name(flow, "destination"), name(flow, "source"), l4.get("source_port", 0)
    return name(flow, "source"), name(flow, "destination"), l4.get("destination_port", 0)


def kind(flow: Flow) -> str:
    """'policy-verdict', 'drop', 'trace:to-proxy', 'http-request', 'dns-response', ..."""
    event = flow["event_type"]
    if event["type"] == 129:
        l7 = flow["l7"]
        return f"{'http' if 'http' in l7 else 'dns'}-{l7['type'].lower()}"
    points = {0: "to-endpoint", 1: "to-proxy", 3: "to-stack"}
    return {1: "drop", 5: "policy-verdict"}.get(event["type"]) or f"trace:{points[event.get('sub_type', 0)]}"


def request_line(flow: Flow) -> str:
    """'GET /path' of an HTTP flow, 'DNS name' of a DNS flow."""
    l7 = flow["l7"]
    if "http" in l7:
        url = l7["http"]["url"]
        return f"{l7['http']['method']} /{url.split('/', 3)[3] if url.count('/') >= 3 else ''}"
    return f"DNS {l7['dns'].get('query', '').rstrip('.')}"


class Lab:
    """A kept lab and the moment its scenario's flows were all recorded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.until = 0.0

    def observe(self, *args: str) -> list[Flow]:
        """`observe LAB <args> -o json` up to the end of the scenario (later tests add traffic)."""
        out = l7lab("observe", self.name, "-o", "json", "--until", f"{self.until:.6f}", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def retail() -> Iterator[Lab]:
    lab = Lab(unique_lab("flt-retail"))
    try:
        out = l7lab("run", "--keep", "--name", lab.name, str(RETAIL), timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        expected = RetailExpectations()
        lab.until = time.time() + 3600
        # The proxy writes its records as it answers: wait until every request and answer is there.
        wait_for("the retail flows", lambda: len(lab.observe("--type", "l7")) == 2 * len(expected.l7), timeout=60,
                 every=0.2)
        lab.until = time.time()
        yield lab
    finally:
        assert l7lab("down", lab.name).returncode == 0
        assert nothing_left(lab.name), leftovers(lab.name)


@pytest.fixture(scope="module")
def dns() -> Iterator[Lab]:
    lab = Lab(unique_lab("flt-dns"))
    try:
        out = l7lab("run", "--keep", "--name", lab.name, str(DNS_POLICY), timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        lab.until = time.time() + 3600
        wait_for("the dns-policy flows", lambda: len(lab.observe("--type", "l7")) == DnsExpectations().l7_flows,
                 timeout=60, every=0.2)
        lab.until = time.time()
        yield lab
    finally:
        assert l7lab("down", lab.name).returncode == 0
        assert nothing_left(lab.name), leftovers(lab.name)


# --------------------------------------------------------------------------- what the probes make


def target(probe: Probe) -> str:
    return probe.destination.name


class RetailExpectations:
    """The retail scenario's probes, sorted by what the policies do with them."""

    def __init__(self) -> None:
        probes = [p for step in load_scenario(RETAIL).steps for p in step.probes]
        self.l7 = [p for p in probes if target(p) in L7_BACKENDS and p.expect != "dropped"]
        self.dropped = [p for p in probes if p.expect == "dropped"]
        self.open = [p for p in probes if p not in self.l7 and p not in self.dropped]
        # Only frontend-app reaches the backends, every one of its requests through the proxy.
        assert {p.source for p in self.l7} == {"retail/frontend-app"} and all(p.http for p in self.l7)
        assert self.dropped and all(p.source != "retail/frontend-app" for p in self.dropped)
        assert [(p.source, target(p), p.expect) for p in self.open] == [
            ("retail/inventory-api", "retail/reporting", "allowed")]

    @staticmethod
    def line(p: Probe) -> str:
        assert p.http is not None
        return f"{p.http.method} {posixpath.normpath(p.http.path)}"  # the proxy forwards the normalized path

    def requests(self, expect: str | None = None) -> Counter[str]:
        return Counter(self.line(p) for p in self.l7 if expect is None or p.expect == expect)

    def dropped_pairs(self) -> set[tuple[str, str, int]]:
        return {(p.source, target(p), p.destination.port) for p in self.dropped}


def lines(flows: list[Flow]) -> Counter[str]:
    return Counter(request_line(f) for f in flows)


def l7_only(flows: list[Flow]) -> list[Flow]:
    return [f for f in flows if "l7" in f]


def kernel_only(flows: list[Flow]) -> list[Flow]:
    return [f for f in flows if "l7" not in f]


# --------------------------------------------------------------------------- retail, flag by flag


def test_verdict_dropped_is_the_l3_l4_drops_and_the_denied_requests(retail: Lab) -> None:
    want = RetailExpectations()
    found = retail.observe("--verdict", "DROPPED")
    assert all(f["verdict"] == "DROPPED" for f in found)
    assert lines(l7_only(found)) == want.requests("denied")
    assert {kind(f) for f in l7_only(found)} == {"http-request"}
    kernel = kernel_only(found)
    assert {connection(f) for f in kernel} == want.dropped_pairs()
    per_kind = Counter(kind(f) for f in kernel)
    assert set(per_kind) == {"policy-verdict", "drop"} and per_kind["policy-verdict"] == per_kind["drop"]
    assert all(f["drop_reason_desc"] == "POLICY_DENIED" for f in kernel)
    # Several verdicts: any of them.
    both = retail.observe("--verdict", "DROPPED", "--verdict", "REDIRECTED")
    assert len(both) == len(found) + len(retail.observe("--verdict", "REDIRECTED"))


def test_verdict_redirected_is_one_policy_verdict_per_connection_to_the_proxy(retail: Lab) -> None:
    want = RetailExpectations()
    found = retail.observe("--verdict", "REDIRECTED")
    assert Counter(connection(f)[:2] for f in found) == Counter(("retail/frontend-app", target(p)) for p in want.l7)
    assert {kind(f) for f in found} == {"policy-verdict"}


def test_http_method_and_status(retail: Lab) -> None:
    want = RetailExpectations()
    found = retail.observe("--http-method", "DELETE", "--http-status", "403")
    assert len(found) == 1 == sum(1 for p in want.l7 if p.http.method == "DELETE")
    assert kind(found[0]) == "http-response" and found[0]["l7"]["http"]["code"] == 403
    assert connection(found[0]) == ("retail/frontend-app", "retail/inventory-api", 8080)
    # A method in any case; several methods: any of them; requests and responses alike.
    posts = retail.observe("--http-method", "post")
    assert lines(posts) == Counter({k: 2 * v for k, v in want.requests().items() if k.startswith("POST")})
    assert lines(retail.observe("--http-method", "GET", "--http-method", "DELETE", "--type", "l7")) == Counter(
        {k: 2 * v for k, v in want.requests().items() if k.split()[0] in ("GET", "DELETE")})
    # Status: responses only; a prefix.
    assert lines(retail.observe("--http-status", "4+")) == want.requests("denied")
    assert lines(retail.observe("--http-status", "200")) == want.requests("allowed")
    assert retail.observe("--http-status", "5+") == []


def test_http_path_is_a_regex_on_the_path(retail: Lab) -> None:
    want = RetailExpectations()
    found = retail.observe("--http-path", "^/process-payment$", "--type", "l7")
    expected = Counter({k: 2 * v for k, v in want.requests().items() if k.split()[1] == "/process-payment"})
    assert lines(found) == expected and len(expected) == 2  # the allowed POST and the denied GET
    assert lines(retail.observe("--http-path", "admin")) == Counter(
        {k: 2 * v for k, v in want.requests().items() if "admin" in k})


def test_from_to_and_pod(retail: Lab) -> None:
    want = RetailExpectations()
    from_reporting = retail.observe("--from-pod", "retail/reporting")
    assert {connection(f) for f in from_reporting} == {d for d in want.dropped_pairs() if d[0] == "retail/reporting"}
    assert all(name(f, "source") == "retail/reporting" and f["verdict"] == "DROPPED" for f in from_reporting)
    to_reporting = retail.observe("--to-pod", "retail/reporting")
    assert {connection(f) for f in to_reporting} == {(p.source, target(p), p.destination.port) for p in want.open}
    # reporting enforces no ingress policy: Cilium sends no policy verdict there, only the trace.
    assert Counter(kind(f) for f in to_reporting) == Counter({"trace:to-endpoint": 1})
    both = retail.observe("--pod", "retail/reporting")
    assert sorted(map(json.dumps, both)) == sorted(map(json.dumps, from_reporting + to_reporting))
    assert retail.observe("--pod", "retail/rep") == both  # a prefix
    assert retail.observe("--pod", "reporting") == []  # no namespace: "default", as in Hubble
    # Several pods: any of them.
    assert len(retail.observe("--from-pod", "retail/reporting", "--from-pod", "retail/inventory-api")) == len(
        from_reporting) + len(retail.observe("--from-pod", "retail/inventory-api"))


def test_namespaces(retail: Lab) -> None:
    everything = retail.observe()
    assert retail.observe("--namespace", "retail") == everything  # every flow has a pod of retail at one end
    assert retail.observe("--namespace", "kube-system") == []
    # The proxy's upstream connections come from the node, which is in no namespace.
    from_node = retail.observe("--to-namespace", "retail", "--not", "--from-namespace", "retail")
    want = RetailExpectations()
    assert {connection(f)[1] for f in from_node} == {target(p) for p in want.l7 if p.expect == "allowed"}
    assert all(kind(f) in ("policy-verdict", "trace:to-endpoint") and f["verdict"] == "FORWARDED" for f in from_node)
    assert retail.observe("--namespace", "retail", "--pod", "reporting") == retail.observe("--pod", "retail/reporting")


def test_labels(retail: Lab) -> None:
    assert retail.observe("--from-label", "app=reporting") == retail.observe("--from-pod", "retail/reporting")
    assert retail.observe("--from-label", "k8s:app=reporting") == retail.observe("--from-pod", "retail/reporting")
    assert retail.observe("--label", "app=reporting") == retail.observe("--pod", "retail/reporting")
    to_backends = retail.observe("--to-label", "app in (inventory-api, payment-gateway)")
    assert {connection(f)[1] for f in to_backends if not f.get("is_reply")} == set(L7_BACKENDS)
    assert to_backends == retail.observe("--to-pod", "retail/inventory-api", "--to-pod", "retail/payment-gateway")
    # `!app`: an end without an app label, the node (the proxy's upstream connections).
    assert retail.observe("--from-label", "!app") == retail.observe(
        "--to-namespace", "retail", "--not", "--from-namespace", "retail")
    assert retail.observe("--to-label", "team=retail") == []  # a namespace's label is not the pod's
    assert retail.observe("--to-label", "io.cilium.k8s.namespace.labels.team=retail") == retail.observe(
        "--to-namespace", "retail")


def test_identity(retail: Lab) -> None:
    reporting = retail.observe("--from-pod", "retail/reporting")
    identity = reporting[0]["source"]["identity"]
    assert identity >= 256 and {f["source"]["identity"] for f in reporting} == {identity}
    assert retail.observe("--identity", str(identity)) == retail.observe("--pod", "retail/reporting")
    assert retail.observe("--from-identity", str(identity)) == reporting
    assert retail.observe("--to-identity", "world") == []  # retail has no world hosts


def test_protocol_and_ports(retail: Lab) -> None:
    want = RetailExpectations()
    everything = retail.observe()
    assert retail.observe("--protocol", "tcp") == everything
    assert retail.observe("--protocol", "udp") == [] and retail.observe("--protocol", "dns") == []
    http = retail.observe("--protocol", "http")
    assert lines(http) == Counter({k: 2 * v for k, v in want.requests().items()})
    payments = [p for p in want.l7 if target(p) == "retail/payment-gateway"]
    # --to-port: the requests to the port, not the answers from it; --port: either side.
    assert lines(retail.observe("--to-port", "8443", "--type", "l7")) == Counter(map(want.line, payments))
    assert lines(retail.observe("--port", "8443", "--type", "l7")) == Counter(
        {k: 2 * v for k, v in Counter(map(want.line, payments)).items()})
    assert retail.observe("--from-port", "8443", "--type", "l7") == retail.observe(
        "--port", "8443", "--type", "l7", "--not", "--to-port", "8443")


def test_types(retail: Lab) -> None:
    want = RetailExpectations()
    assert len(retail.observe("--type", "l7")) == 2 * len(want.l7)
    drops = retail.observe("--type", "drop")
    assert {connection(f) for f in drops} == want.dropped_pairs() and {kind(f) for f in drops} == {"drop"}
    to_proxy = retail.observe("--type", "trace:to-proxy")
    assert len(to_proxy) == len(want.l7) and all(connection(f)[1] in L7_BACKENDS for f in to_proxy)
    verdicts = retail.observe("--type", "policy-verdict")
    # One per new connection judged by an enforcing endpoint: to the proxy, the drops. The proxy's
    # upstream connections skip policy, as in Cilium: a to-endpoint trace each, no policy verdict;
    # the open probe goes to reporting, which enforces nothing: a trace alone too.
    upstream = {target(p) for p in want.l7 if p.expect == "allowed"}
    assert Counter(f["verdict"] for f in verdicts) == Counter(
        {"REDIRECTED": len(want.l7), "DROPPED": len(retail.observe("--type", "drop"))})
    from_node = [f for f in retail.observe("--type", "trace:to-endpoint") if not f["source"].get("pod_name")]
    assert {name(f, "destination") for f in from_node} == upstream
    assert retail.observe("--type", "drop", "--type", "policy-verdict") == [
        f for f in retail.observe() if kind(f) in ("drop", "policy-verdict")]


def test_not(retail: Lab) -> None:
    everything = retail.observe()
    not_forwarded = retail.observe("--not", "--verdict", "FORWARDED")
    assert not_forwarded == [f for f in everything if f["verdict"] != "FORWARDED"] and not_forwarded
    # --not covers the next flag only.
    assert lines(retail.observe("--not", "--verdict", "FORWARDED", "--type", "l7")) == \
        RetailExpectations().requests("denied")
    # Every --not of a line makes one blacklist filter: dropped AND l7 are hidden, nothing else.
    assert retail.observe("--not", "--verdict", "DROPPED", "--not", "--type", "l7") == [
        f for f in everything if not (f["verdict"] == "DROPPED" and "l7" in f)]


def test_last_since_until(retail: Lab) -> None:
    want = RetailExpectations()
    everything = retail.observe()
    assert retail.observe("--last", "3") == everything[-3:]
    # The last two requests denied: the payment step's, the last step with L7 probes.
    payment_denied = Counter(want.line(p) for p in want.l7 if target(p) == "retail/payment-gateway"
                             and p.expect == "denied")
    assert lines(retail.observe("--last", str(len(payment_denied)), "--type", "l7", "--verdict", "DROPPED")) == \
        payment_denied
    # The inventory step comes before the drops of step three: until its last request, no drop.
    last_inventory = [f for f in everything if "l7" in f and connection(f)[1] == "retail/inventory-api"][-1]
    until = retail.observe("--until", last_inventory["time"])
    assert last_inventory in until and not [f for f in until if f["verdict"] == "DROPPED" and "l7" not in f]
    since = retail.observe("--since", last_inventory["time"])
    assert since[0]["time"] == last_inventory["time"] and lines(l7_only(since)) >= Counter(
        map(want.line, (p for p in want.l7 if target(p) == "retail/payment-gateway")))
    assert retail.observe("--since", "1h") == everything and retail.observe("--until", "1h") == []


def test_outputs(retail: Lab) -> None:
    everything = retail.observe()
    out = l7lab("observe", retail.name, "-o", "jsonpb", "--until", f"{retail.until:.6f}")
    assert [json.loads(line)["flow"] for line in out.stdout.splitlines()] == everything
    compact = l7lab("observe", retail.name, "--until", f"{retail.until:.6f}", "--http-method", "DELETE").stdout
    assert "http-request DROPPED (HTTP/1.1 DELETE http://inventory-api:8080/api/inventory/item123)" in compact
    assert len(compact.splitlines()) == 2


def test_bad_values_are_usage_errors(retail: Lab) -> None:
    for args, message in ((("--verdict", "DENIED"), "--verdict: expected one of FORWARDED"),
                          (("--http-path", "(("), "--http-path: expected a regular expression"),
                          (("--to-port", "eighty"), "--to-port: expected a port number"),
                          (("--http-status", "403", "--type", "drop"), "--http-status: cannot be combined with "
                                                                       "--type drop"),
                          (("--last", "99999999999999999999"), "argument --last: expected a number of flows"),
                          (("--since", "nan"), "argument --since: expected a duration")):
        out = l7lab("observe", retail.name, *args)
        assert out.returncode == 2 and message in out.stderr and out.stdout == "", out
    # With l7 among the types the HTTP filter stands, and shows the denied requests' 403 answers.
    denied = retail.observe("--type", "l7", "--type", "drop", "--http-status", "403")
    assert denied and denied == retail.observe("--http-status", "403")
    assert {(f["verdict"], f["l7"]["type"]) for f in denied} == {("FORWARDED", "RESPONSE")}


# --------------------------------------------------------------------------- dns-policy


class DnsExpectations:
    def __init__(self) -> None:
        scenario = load_scenario(DNS_POLICY)
        walk = expected_walk(PolicyEngine(scenario))
        probes = [p for _, p, _, _ in walk]
        mediabot = [p for p in probes if p.source == "shop/mediabot"]
        self.questions = [p for p in mediabot if p.dns is not None]  # through the DNS proxy
        # The queries of mediabot's lookups (a probe to a DNS name looks it up first) that reach
        # the DNS proxy: (name asked, what it answered); dropped ones never reach it.
        self.lookups = [(q, what) for _, p, _, lookup in walk if lookup is not None and p.source == "shop/mediabot"
                        for q, what in lookup.queries if what != "dropped"]
        # shell enforces nothing: its lookups' queries go straight to kube-dns
        self.shell_queries = sum(len(lookup.queries) for _, p, _, lookup in walk
                                 if lookup is not None and p.source == "shop/shell")
        self.not_dns = [p for p in mediabot if p.dns is None and target(p) == "kube-system/kube-dns"]
        self.dropped = [p for p in mediabot if p.expect == "dropped" and target(p) != "kube-system/kube-dns"]
        # to world hosts from mediabot, whose egress policy gives each a policy verdict (shell
        # enforces nothing: its flows are traces alone); a name that did not resolve connects nowhere
        self.world = [p for p in mediabot if p.destination.kind == "world" and p.expect != "unresolved"]
        self.world_names = {p.destination.ip: scenario.world[p.destination.name].dns_names for p in self.world}
        assert {(p.protocol, p.expect) for p in self.not_dns} == {("UDP", "dropped"), ("TCP", "dropped")}
        assert self.lookups and any(what == "REFUSED" for _, what in self.lookups)
        # Each question (a probe's, or a lookup's): a request and an answer; the datagram that is
        # no DNS and the HTTP request on TCP port 53 (DNS over TCP there): a request the proxy
        # could not read (ERROR), no answer.
        self.l7_flows = 2 * (len(self.questions) + len(self.lookups)) + 1 + 1

    def asked(self, expect: str) -> Counter[str]:
        """The questions answered `expect` (allowed: forwarded; refused: REFUSED by the proxy)."""
        out = Counter(f"DNS {p.dns.name}" for p in self.questions if p.expect == expect)
        out.update(f"DNS {q}" for q, what in self.lookups if (what == "REFUSED") == (expect == "refused"))
        return out


def test_dns_questions(dns: Lab) -> None:
    want = DnsExpectations()
    requests = dns.observe("--protocol", "dns", "--type", "l7")
    asked = len(want.questions) + len(want.lookups)
    assert Counter(kind(f) for f in requests) == Counter({"dns-request": asked + 2, "dns-response": asked})
    refused = dns.observe("--protocol", "dns", "--verdict", "DROPPED")
    assert lines(refused) == want.asked("refused") and {kind(f) for f in refused} == {"dns-request"}
    answered = [f for f in dns.observe("--protocol", "dns", "--verdict", "FORWARDED") if kind(f) == "dns-request"]
    assert lines(answered) == want.asked("allowed")
    broken = dns.observe("--verdict", "ERROR")
    assert len(broken) == 2 and {kind(f) for f in broken} == {"dns-request"}


def test_dns_namespaces_and_ports(dns: Lab) -> None:
    # shell has no policy: its question goes straight to kube-dns, no proxy, no L7 flow, and no
    # policy verdict (neither end enforces policy), only the trace.
    want = DnsExpectations()
    shell = dns.observe("--from-pod", "shop/shell", "--to-namespace", "kube-system")
    assert Counter(kind(f) for f in shell) == Counter({"trace:to-endpoint": 1 + want.shell_queries})
    assert dns.observe("--to-namespace", "kube-system", "--protocol", "udp") == dns.observe("--to-port", "53",
                                                                                            "--protocol", "udp")
    # TCP to port 53 meets the proxy's DNS over TCP: the HTTP request is no DNS message (ERROR).
    over_tcp = dns.observe("--to-port", "53", "--protocol", "tcp", "--type", "l7")
    assert [(kind(f), f["verdict"]) for f in over_tcp] == [("dns-request", "ERROR")]
    assert dns.observe("--http-status", "403") == []


def test_dns_world_and_drops(dns: Lab) -> None:
    want = DnsExpectations()
    world = dns.observe("--to-label", "reserved:world", "--type", "policy-verdict")
    # (a dropped SYN may be sent again: sets, not counts)
    assert {(name(f, "source"), f["IP"]["destination"]) for f in world} == {
        (p.source, p.destination.ip) for p in want.world}
    # World hosts by DNS name: a pattern's `*` spans dots, as Hubble's.
    named = dns.observe("--to-fqdn", "*.example.com", "--type", "policy-verdict")
    assert {(name(f, "source"), f["IP"]["destination"]) for f in named} == {
        (p.source, p.destination.ip) for p in want.world
        if any(n.endswith(".example.com") for n in want.world_names[p.destination.ip])}
    assert dns.observe("--fqdn", "www.example.com") == dns.observe("--to-ip", "203.0.113.20")
    drops = dns.observe("--from-label", "app=mediabot", "--type", "drop")
    assert {f["IP"]["destination"] for f in drops} == {p.destination.ip for p in want.dropped}
    assert dns.observe("--to-identity", "world", "--verdict", "FORWARDED", "--type", "policy-verdict") == [
        f for f in world if f["destination"]["identity"] == 2 and f["verdict"] == "FORWARDED"]


# --------------------------------------------------------------------------- live (last: they add traffic)


def read_line(stream: IO[str], deadline: float) -> str:
    os.set_blocking(stream.fileno(), False)
    buffered = ""
    while time.monotonic() < deadline:
        chunk = stream.readline()
        buffered += chunk
        if buffered.endswith("\n"):
            return buffered
        if not chunk:
            time.sleep(0.05)
    raise AssertionError(f"nothing within the deadline (got {buffered!r})")


def drop_from_reporting(lab: str) -> None:
    out = curl(lab, "reporting", "http://inventory-api:8080/api/inventory/live", max_time="1")
    assert out.returncode == 28, out  # timed out: dropped


@pytest.mark.parametrize("verb", [
    ("observe", "--follow", "-o", "json", "--type", "drop", "--from-pod", "retail/reporting", "--since", "0s"),
    ("monitor", "--type", "drop", "--json"),
])
def test_follow_and_monitor_show_new_drops_until_interrupted(retail: Lab, verb: tuple[str, ...]) -> None:
    child = subprocess.Popen([*L7LAB, verb[0], retail.name, *verb[1:]], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + scaled(60)
        found: Flow = {}
        while not found:
            drop_from_reporting(retail.name)
            try:
                found = json.loads(read_line(child.stdout, min(deadline, time.monotonic() + 3)))
            except AssertionError:
                assert time.monotonic() < deadline, "no drop shown"
        assert kind(found) == "drop" and connection(found) == ("retail/reporting", "retail/inventory-api", 8080)
        assert found not in retail.observe()  # new: after the scenario
    finally:
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=scaled(30))
    assert code == 0, child.stderr.read()


def test_monitor_text_is_cilium_monitor_s(retail: Lab) -> None:
    child = subprocess.Popen([*L7LAB, "monitor", retail.name, "--type", "policy-verdict"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + scaled(60)
        line = ""
        while not line:
            drop_from_reporting(retail.name)
            try:
                line = read_line(child.stdout, min(deadline, time.monotonic() + 3))
            except AssertionError:
                assert time.monotonic() < deadline, "no policy verdict shown"
        reporting = retail.observe("--from-pod", "retail/reporting")[0]["source"]["identity"]
        assert line.startswith("Policy verdict log: flow 0x0 local EP ID ") and f"remote ID {reporting}, proto 6, " \
            "ingress, action deny" in line, line
    finally:
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=scaled(30))
    assert code == 0, child.stderr.read()
