"""A real Prometheus for the tests (Debian's /usr/bin/prometheus, installed by `scripts/setup.sh
--test`): started on a free loopback port with its configuration and storage in a test's
tmp_path, scraping the given targets every second, queried through its HTTP API, stopped in the
test's `finally`; and the dashboard's panels read back as PromQL with their variables filled in.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from dataplane.timescale import scaled
from tests.support.cli_lab import NO_PROXY, free_loopback_port
from tests.support.wait import wait_for

PROMETHEUS = Path("/usr/bin/prometheus")
SCRAPE_INTERVAL = "1s"
RATE_WINDOW = "5m"  # what `$__rate_interval` stands for: the whole of a test's traffic fits in it
ALL = ".+"  # the dashboard's "All" value of a multi-value variable (its allValue)


def scrape_config(targets: list[str], job: str = "l7lab") -> str:
    """A Prometheus configuration scraping `targets` (HOST:PORT of labs' metrics) every second."""
    return json.dumps({  # YAML is a superset of JSON: no YAML writer needed
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                            "static_configs": [{"targets": targets}]}],
    }, indent=2)


class PrometheusAPI:
    """The HTTP API of a Prometheus at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else self.url + path
        with NO_PROXY.open(url, timeout=scaled(10)) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def targets_up(self) -> bool:
        active = self._get("/api/v1/targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self._get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def values(self, expr: str, *by: str) -> dict[tuple[str, ...], float]:
        """An instant query as {(values of the `by` labels): value}, the series that share
        them summed."""
        out: dict[tuple[str, ...], float] = {}
        for r in self.query(expr):
            key = tuple(r["metric"].get(label, "") for label in by)
            out[key] = out.get(key, 0.0) + float(r["value"][1])
        return out


class Prometheus(PrometheusAPI):
    """One Prometheus process; `stop()` (always, in a finally) ends it."""

    def __init__(self, tmp_path: Path, targets: list[str]) -> None:
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        config = self.dir / "prometheus.yml"
        config.write_text(scrape_config(targets))
        self.port = free_loopback_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log = self.dir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=scaled(15))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
        try:
            with NO_PROXY.open(self.url + "/-/ready", timeout=scaled(2)) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        wait_for("prometheus to be ready", self.ready, every=0.2)


# --------------------------------------------------------------------------- the dashboard


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every target of every panel, rows' panels included."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append((inner["title"], target["refId"], target["expr"]))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables filled in as Grafana would: `$__rate_interval` and the other range
    variables as RATE_WINDOW, template variables by `variables` ("$name" and "${name}")."""
    out = expr.replace("$__rate_interval", RATE_WINDOW).replace("$__interval", RATE_WINDOW) \
              .replace("$__range", RATE_WINDOW)
    for name, value in variables.items():
        out = out.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in out, f"a variable is left in {out!r}"
    return out


RATE = re.compile(r"\b(?:rate|increase)\((?P<series>[^()\[]+)\[[^\]]+\]\)")


def totals(expr: str) -> str:
    """A panel's query with each `rate(X[w])` replaced by the counter X itself: the same
    grouping, as totals since the lab started (exact counts, with no extrapolation)."""
    return RATE.sub(lambda m: m["series"], expr)


def sane(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def wait_until_scraped(prom: Prometheus, lab_totals: dict[str, float], timeout: float = 60.0) -> None:
    """Until Prometheus holds, for every `sum(metric)` given, exactly the value the lab reports."""
    def caught_up() -> bool:
        for metric, want in lab_totals.items():
            got = prom.values(f"sum({metric})")
            if got.get((), None) != want:
                return False
        return True
    wait_for(f"prometheus to scrape {sorted(lab_totals)}", caught_up, timeout=timeout, every=0.5)
