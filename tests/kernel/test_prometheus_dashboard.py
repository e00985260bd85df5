"""The Grafana dashboard's PromQL against a real Prometheus scraping real labs.

Two labs come up with `l7lab up --metrics` on free loopback ports: the retail scenario and the
dns-policy scenario. Each scenario's probes (its steps up to its first policy change) run from
the pods, twice, with Debian's /usr/bin/prometheus scraping both labs every second from a
tmp_path. Twice, because a rate needs an increase between two scrapes: the first round creates
the series, the second makes every rate positive.

Then every panel of dashboards/l7.json is evaluated through Prometheus's HTTP API:
- as drawn (`rate(...[$__rate_interval])`), each query gives series, and the ones the traffic
  touches are positive;
- with each rate replaced by its counter (the same grouping, totals since the lab came up),
  the values equal the traffic sent: exactly 2 denied DELETEs (403), 4 HTTP requests per round
  to inventory-api and 3 to payment-gateway, the L3/L4 drops of each policy exactly as many as
  the labs' own flow records hold, the DNS queries denied by policy and answered REFUSED exactly
  2 per round, every DNS record the proxy wrote a query; the latency quantiles are within
  Hubble's buckets. Whatever a panel groups by, its totals are also checked against the labs'
  own flow records, turned into Hubble flows by `dataplane/hubble.py`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from dataplane import lab as labmod
from dataplane.flowrecord import Flow, FlowType, Verdict
from dataplane.flows import RecordTail
from dataplane.hubble import hubble_flows
from dataplane.fqdn.lookup import lookup_in_netns
from dataplane.probes import Observation, run_probe
from dataplane.scenario import Probe, load_scenario
from tests.conftest import REPO, patient, unique_lab
from tests.support.cli_lab import RETAIL, free_loopback_port, l7lab, leftovers, nothing_left, scrape
from tests.support.prometheus import ALL, Prometheus, panel_queries, sane, substitute, totals, wait_until_scraped
from tests.support.wait import wait_for

pytestmark = pytest.mark.kernel

DASHBOARD = REPO / "dashboards" / "l7.json"
DNS_POLICY = REPO / "scenarios" / "dns-policy.yaml"
ROUNDS = 2
COUNTERS = ("hubble_flows_processed_total", "hubble_drop_total", "hubble_policy_verdicts_total",
            "hubble_http_requests_total", "hubble_http_responses_total", "hubble_dns_queries_total",
            "hubble_dns_responses_total", "hubble_tcp_flags_total", "l7lab_policy_drops_total",
            "hubble_http_request_duration_seconds_count")
# The policy that isolates the endpoint whose default deny drops a flow (the scenarios' own).
ISOLATING = {"retail/inventory-api": "inventory-read-only", "retail/payment-gateway": "payments-post-only",
             "shop/mediabot": "mediabot-dns"}


@dataclass
class MetricsLab:
    name: str
    scenario: Path
    address: str  # HOST:PORT of its /metrics
    sent: list[tuple[Probe, Observation]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"


def up(scenario: Path, prefix: str) -> MetricsLab:
    lab = MetricsLab(unique_lab(prefix), scenario, f"127.0.0.1:{free_loopback_port()}")
    out = l7lab("up", str(scenario), "--name", lab.name, "--metrics", lab.address, timeout=300)
    assert out.returncode == 0, out.stderr
    return lab


def send_traffic(lab: MetricsLab) -> None:
    """The scenario's probes, step by step (the probes of a step at once, as `l7lab run` sends
    them), up to its first policy change; each must meet its expectation."""
    endpoints = labmod.LabRecord.load(lab.name).endpoints
    scenario = load_scenario(lab.scenario)

    async def one(p: Probe) -> Observation:
        """A probe to a DNS name looks it up from the pod first, as `l7lab run` sends it."""
        netns = endpoints[p.source].netns
        if p.destination.dns_name and p.source in scenario.pods and scenario.nameserver:
            search = scenario.search_path(scenario.pods[p.source].namespace)
            lookup = await lookup_in_netns(netns, p.destination.dns_name, scenario.nameserver, search, p.timeout)
            if not lookup.resolved:
                return Observation("unresolved", lookup.why, extra={"lookup": lookup.to_json()})
            observed = await run_probe(replace(p, destination=replace(p.destination, ip=lookup.address)), netns)
            observed.extra["lookup"] = lookup.to_json()
            return observed
        return await run_probe(p, netns)

    for step in patient(scenario).steps:
        if step.kind != "probes":
            break

        async def one_step() -> list[Observation]:
            return list(await asyncio.gather(*(one(p) for p in step.probes)))
        observed = asyncio.run(one_step())
        for probe, obs in zip(step.probes, observed):
            assert obs.outcome == probe.expect, (probe, obs)
            lab.sent.append((probe, obs))


def pod(key: str) -> str:
    """A pod's name from its key ("retail/frontend-app")."""
    return key.split("/")[-1]


def records(lab: MetricsLab) -> list[Flow]:
    return [r for r in RecordTail(labmod.lab_dir(lab.name)).read() if isinstance(r, Flow)]


def lab_totals(lab: MetricsLab) -> dict[str, float]:
    samples = scrape(lab.url)
    return {name: sum(v for k, v in samples.items() if k.split("{")[0] == name) for name in COUNTERS}


def settled(lab: MetricsLab) -> dict[str, float]:
    """The lab's totals once its agent counted every L7 request sent so far (the proxy's records
    are the last to arrive) and every Hubble flow of the records its files hold."""
    l7_probes = sum(1 for p, _o in lab.sent if (pod(p.source), p.http is not None, p.dns is not None)
                    in (("frontend-app", True, False), ("mediabot", False, True)))
    wait_for(f"{l7_probes} L7 requests counted by lab {lab.name}",
             lambda: (lambda t: t["hubble_http_requests_total"] + t["hubble_dns_queries_total"])(lab_totals(lab))
             >= l7_probes)

    def caught_up() -> dict[str, float] | None:
        totals = lab_totals(lab)
        return totals if totals["hubble_flows_processed_total"] == len(hubble(lab)) else None
    return wait_for(f"lab {lab.name} to count every record", caught_up, every=0.2)


def hubble(lab: MetricsLab) -> list[dict]:
    return [f for r in records(lab) for f in hubble_flows(r, f"l7lab/{lab.name}")]


def expected_policy_drops(lab: MetricsLab) -> Counter[tuple[str, str]]:
    """(policy name, match) -> flows dropped, from the lab's own records: a kernel DROP of a
    policy decision by its deny rule's policy, an L7 request denied by the policies it failed,
    and either, when the record names none, by the policy isolating the deciding endpoint."""
    out: Counter[tuple[str, str]] = Counter()
    for r in records(lab):
        if r.type == FlowType.L3_L4 and r.verdict == Verdict.DROP and r.drop_reason in ("POLICY_DENIED", "POLICY_EXPLICIT_DENY"):
            names = [p.split("/")[-1] for p in r.policy.policies] or [ISOLATING[r.deciding_endpoint.name]]
            out.update((name, "none") for name in names)
        elif r.type == FlowType.L7 and r.verdict == Verdict.DENIED:
            names = [p.split("/")[-1] for p in r.policy.policies] or [ISOLATING[r.deciding_endpoint.name]]
            out.update((name, "l7/" + r.l7.protocol.lower()) for name in names)
    return out


def regroup(values: dict[tuple[str, ...], float], by: tuple[str, ...], keep: tuple[str, ...]) -> Counter:
    idx = [by.index(k) for k in keep]
    out: Counter = Counter()
    for key, v in values.items():
        out[tuple(key[i] for i in idx)] += v
    return out


def test_every_dashboard_panel_matches_the_traffic_sent(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dashboard)
    labs: list[MetricsLab] = []
    prom: Prometheus | None = None
    try:
        labs.append(up(RETAIL, "me-prom"))
        labs.append(up(DNS_POLICY, "me-prom"))
        retail, dns = labs
        prom = Prometheus(tmp_path, [lab.address for lab in labs])
        prom.wait_ready()
        wait_for("prometheus to scrape both labs", prom.targets_up, every=0.5)
        for n in range(1, ROUNDS + 1):
            for lab in labs:
                send_traffic(lab)
            want: Counter[str] = Counter()
            for lab in labs:
                want.update(settled(lab))
            wait_until_scraped(prom, dict(want))

        def panel(title: str, lab: MetricsLab, *, exact: bool, by: tuple[str, ...]) -> list[dict[tuple, float]]:
            """Every target of the panel `title`, for one lab: drawn (rates) or as totals."""
            found = [(t, e) for t, _ref, e in queries if t == title]
            assert found, f"no panel {title!r}"
            out = []
            for _t, expr in found:
                expr = substitute(expr, {"instance": lab.address})
                out.append(prom.values(totals(expr) if exact else expr, *by))
            return out

        # -- every panel's query, as drawn, gives sane values for both labs together -------------
        for title, ref, expr in queries:
            result = prom.query(substitute(expr, {"instance": ALL}))
            assert result, f"panel {title!r} {ref}: no series for {expr}"
            assert all(sane(float(r["value"][1])) for r in result), (title, result)

        r = ROUNDS
        # mediabot's lookups before it connects to a DNS name: each query reaches the DNS proxy
        lookups = [what for p, o in dns.sent if pod(p.source) == "mediabot" and "lookup" in o.extra
                   for _q, what in o.extra["lookup"]["queries"]]
        lookups_refused = lookups.count("REFUSED")
        # -- incoming HTTP request rate per workload ----------------------------------------------
        (drawn,) = panel("Incoming HTTP request rate per workload", retail, exact=False,
                         by=("destination_namespace", "destination_workload"))
        (total,) = panel("Incoming HTTP request rate per workload", retail, exact=True,
                         by=("destination_namespace", "destination_workload"))
        by_pod = Counter()
        for p, _o in retail.sent:
            if p.http is not None and pod(p.source) == "frontend-app":
                by_pod[pod(p.destination.name)] += 1
        assert by_pod == Counter({"inventory-api": 4 * r, "payment-gateway": 3 * r})
        workloads = {f["destination"]["pod_name"]: (f["destination"]["namespace"], f["destination"]["workloads"][0]["name"])
                     for f in hubble(retail) if f.get("l7") and f["l7"]["type"] == "REQUEST"}
        assert total == {workloads[pod]: n for pod, n in by_pod.items()}
        assert set(drawn) == set(total) and all(v > 0 for v in drawn.values())

        # -- HTTP responses by method and status: exactly the statuses the probes got ----------
        (total,) = panel("HTTP responses by method and status", retail, exact=True, by=("method", "status"))
        statuses = Counter((p.http.method, str(o.status)) for p, o in retail.sent
                           if p.http is not None and pod(p.source) == "frontend-app")
        assert total == statuses
        assert total[("DELETE", "403")] == r  # the denied DELETEs, exactly
        (drawn,) = panel("HTTP responses by method and status", retail, exact=False, by=("method", "status"))
        assert drawn[("DELETE", "403")] > 0 and drawn[("GET", "200")] > 0

        # -- p50 / p95 latency: within Hubble's buckets -----------------------------------------
        p50, p95 = panel("HTTP latency p50 / p95", retail, exact=False, by=())
        assert 0 < p50[()] <= p95[()] <= 10, (p50, p95)

        # -- forwarded vs dropped verdicts: as many as the flow records give -------------------
        for lab in labs:
            (total,) = panel("Forwarded vs dropped verdicts", lab, exact=True, by=("action",))
            want_actions = Counter((f["verdict"].lower(),) for f in hubble(lab)
                                   if f["event_type"]["type"] == 129
                                   or (f["event_type"]["type"] == 5 and f["source"].get("identity") != 1))
            assert total == want_actions
            assert {("forwarded",), ("dropped",), ("redirected",)} <= set(total)
            (drawn,) = panel("Forwarded vs dropped verdicts", lab, exact=False, by=("action",))
            assert drawn[("dropped",)] > 0 and drawn[("redirected",)] > 0

        # -- dropped flows by the policy that dropped them --------------------------------------
        by = ("policy_namespace", "policy_name", "destination_workload", "match")
        for lab in labs:
            (total,) = panel("Dropped flows by the policy that dropped them", lab, exact=True, by=by)
            assert regroup(total, by, ("policy_name", "match")) == expected_policy_drops(lab)
        (total,) = panel("Dropped flows by the policy that dropped them", retail, exact=True, by=by)
        got = regroup(total, by, ("policy_name", "match"))
        assert got[("inventory-read-only", "none")] >= 1 * r and got[("payments-post-only", "none")] >= 2 * r
        assert got[("inventory-read-only", "l7/http")] == 3 * r  # DELETE, POST and GET ../admin, denied
        assert got[("payments-post-only", "l7/http")] == 2 * r
        (total,) = panel("Dropped flows by the policy that dropped them", dns, exact=True, by=by)
        assert regroup(total, by, ("policy_name", "match"))[("mediabot-dns", "l7/dns")] == 2 * r + lookups_refused

        # -- drops by reason: every DROPPED Hubble flow ------------------------------------------
        for lab in labs:
            (total,) = panel("Drops by reason", lab, exact=True, by=("reason",))
            assert sum(total.values()) == sum(1 for f in hubble(lab) if f["verdict"] == "DROPPED")
        (total,) = panel("Drops by reason", retail, exact=True, by=("reason",))
        assert total[("POLICY_DENIED",)] > 0

        # -- DNS queries and refusals ------------------------------------------------------------
        queries_, denied, refused = panel("DNS queries and refusals", dns, exact=True, by=())
        mediabot_questions = sum(1 for p, _o in dns.sent if p.dns is not None and pod(p.source) == "mediabot")
        assert mediabot_questions == 4 * r
        assert lookups and lookups_refused == 2 * r  # www.example.com.shop.svc.cluster.local, www.example.org
        # the DNS proxy's records: those questions and queries, and what is no DNS on port 53 (the
        # datagram, and the HTTP request over TCP, where DNS over TCP is served)
        dns_records = sum(1 for rec in records(dns) if rec.dns is not None)
        assert dns_records == mediabot_questions + len(lookups) + 2 * r
        assert queries_[()] == dns_records
        # www.example.org, api.partner.example.com, and the refused queries of the lookups
        assert denied[()] == 2 * r + lookups_refused and refused[()] == 2 * r + lookups_refused
        queries_, denied, refused = panel("DNS queries and refusals", dns, exact=False, by=())
        assert queries_[()] > 0 and denied[()] > 0 and refused[()] > 0

        # -- every flow processed, by type and verdict -------------------------------------------
        names = {1: "Drop", 4: "Trace", 5: "PolicyVerdict", 129: "L7"}
        for lab in labs:
            (total,) = panel("Flows processed by type", lab, exact=True, by=("type", "verdict"))
            assert total == Counter((names[f["event_type"]["type"]], f["verdict"]) for f in hubble(lab))
    finally:
        if prom is not None:
            prom.stop()
        for lab in labs:
            assert l7lab("down", lab.name).returncode == 0
        for lab in labs:
            assert nothing_left(lab.name), leftovers(lab.name)
