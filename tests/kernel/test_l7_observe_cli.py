"""`l7lab up` leaves a lab that enforces L7 after the command exits, and `l7lab observe` shows
the proxy's record of each request."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import REPO, unique_lab

L7LAB = [sys.executable, "-m", "dataplane.cli"]


def l7lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*L7LAB, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_up_enforces_l7_and_observe_shows_each_request() -> None:
    name = unique_lab("ob")
    try:
        assert l7lab("up", str(REPO / "scenarios" / "retail.yaml"), "--name", name).returncode == 0
        curl = ["exec", "--lab", name, "frontend-app", "--", "curl", "-s", "-m", "3"]
        denied = l7lab(*curl, "-X", "DELETE", "http://inventory-api:8080/api/inventory/1")
        allowed = l7lab(*curl, "http://inventory-api:8080/api/inventory/1")
        assert denied.stdout.strip() == "Access denied"  # text mode folds the CRLF
        assert json.loads(allowed.stdout)["endpoint"] == "retail/inventory-api"
        dropped = l7lab("exec", "--lab", name, "reporting", "--", "curl", "-s", "-m", "1", "http://inventory-api:8080/")
        assert dropped.returncode == 28  # curl: timed out, the kernel dropped the SYN
        records: list[dict] = []
        deadline = time.monotonic() + 5  # the proxy writes its record just after the response
        while len(records) < 2 and time.monotonic() < deadline:
            out = l7lab("observe", name, "--json")
            assert out.returncode == 0, out.stderr
            records = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["method"], r["status"], r["verdict"]) for r in records] == [("DELETE", 403, "denied"), ("GET", 200, "forwarded")]
        assert all(r["source"]["pod"] == "retail/frontend-app" and r["destination"]["pod"] == "retail/inventory-api" for r in records)
        assert all("CiliumNetworkPolicy retail/inventory-read-only" in r["policies"] for r in records)
        text = l7lab("observe", name)
        assert "DELETE /api/inventory/1 denied 403" in text.stdout
    finally:
        assert l7lab("down", name).returncode == 0
