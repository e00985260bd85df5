"""dashboards/l7.json is what Grafana's import needs, and every panel's PromQL parses (Debian's
promtool, installed with Prometheus by `scripts/setup.sh --test`) and names only metrics the
lab exports. (tests/kernel/test_prometheus_dashboard.py evaluates them against real traffic.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dataplane.hubblemetrics import METRIC_NAMES
from tests.conftest import IN_CI, REPO
from tests.support.prometheus import ALL, panel_queries, substitute, totals

DASHBOARD = REPO / "dashboards" / "l7.json"
DS = "${DS_PROMETHEUS}"
# l7lab's own metrics (dataplane/metrics.py) beside Hubble's
L7LAB_METRICS = {"l7lab_datapath_packets_total", "l7lab_datapath_bytes_total", "l7lab_flow_events_total",
                 "l7lab_l7_records_total", "l7lab_policy_changes_total", "l7lab_policies", "l7lab_proxy_up",
                 "l7lab_proxy_restarts_total"}
PROMQL_WORDS = {"sum", "rate", "increase", "histogram_quantile", "on", "ignoring", "group_left", "group_right",
                "and", "or", "unless", "avg", "max", "min", "count", "topk"}  # functions and operators


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported() -> set[str]:
    names = set(METRIC_NAMES) | L7LAB_METRICS
    for name in list(names):
        if name.endswith("_seconds"):  # a histogram's series
            names |= {name + "_bucket", name + "_sum", name + "_count"}
    return names


def test_the_json_is_what_grafanas_import_needs() -> None:
    d = dashboard()
    assert d["title"] and re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"])
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 39
    assert [(i["name"], i["type"], i["pluginId"]) for i in d["__inputs"]] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    assert "id" not in d or d["id"] is None  # Grafana assigns it on import
    panels = d["panels"]
    assert len(panels) >= 7 and len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["title"] and p["targets"], p
        assert p["datasource"] == {"type": "prometheus", "uid": DS}
        assert all(t["datasource"]["uid"] == DS and t["expr"] and t["refId"] for t in p["targets"])
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    for var in d["templating"]["list"]:
        assert var["datasource"]["uid"] == DS


def test_the_panels_the_issue_asks_for_are_there() -> None:
    titles = {p["title"] for p in dashboard()["panels"]}
    assert {"Incoming HTTP request rate per workload", "Forwarded vs dropped verdicts",
            "HTTP responses by method and status", "HTTP latency p50 / p95",
            "Dropped flows by the policy that dropped them", "DNS queries and refusals"} <= titles


def test_every_query_names_only_metrics_the_lab_exports() -> None:
    known = exported()
    for title, ref, expr in panel_queries(dashboard()):
        code = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
        code = re.sub(r"\{[^}]*\}", "{}", code)  # nor label names inside selectors
        code = re.sub(r"\[[^\]]*\]", "", code)  # nor range durations
        code = re.sub(r"\b(?:by|without)\s*\(\s*[a-z_]+(?:\s*,\s*[a-z_]+)*\s*\)", "", code)  # grouping labels
        names = {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", code) if n not in PROMQL_WORDS}
        assert names and names <= known, (title, ref, names - known)


def test_every_query_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool (Debian's prometheus package) is missing: scripts/setup.sh --test installs it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    rules = []
    for i, (_title, _ref, expr) in enumerate(panel_queries(dashboard())):
        for variant in (substitute(expr, {"instance": ALL}), totals(substitute(expr, {"instance": ALL}))):
            rules.append({"record": f"l7lab:panel_{i}:{len(rules)}", "expr": variant})
    file = tmp_path / "rules.yml"
    file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_totals_keep_the_grouping_and_drop_only_the_rates() -> None:
    expr = 'sum by (action) (rate(hubble_policy_verdicts_total{instance=~"$instance"}[$__rate_interval]))'
    assert totals(substitute(expr, {"instance": ALL})) == 'sum by (action) (hubble_policy_verdicts_total{instance=~".+"})'
