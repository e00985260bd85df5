"""`python -m proxy` as its own process: READY, SIGHUP reload, SIGTERM, events file, and memory
that stays far below the size of the bodies it streams (peak RSS, no timing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.flowrecord import Flow
from dataplane.mapstate import MapState

from tests.support.http import Client, pattern_bytes

REPO = Path(__file__).resolve().parents[3]
MB = 1024 * 1024


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def proc(fresh, tmp_path):
    state_file = tmp_path / "policy.json"
    state_file.write_text(json.dumps(fresh.state.to_json()))
    events = tmp_path / "events.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "proxy", "--lab", "t", "--state", str(state_file), "--host", "127.0.0.1",
                          "--port", "0", "--original-dst", f"{fresh.backend.host}:{fresh.backend.port}", "--no-mark",
                          "--events", str(events)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("READY 127.0.0.1:"), (line, p.stderr.read() if p.poll() is not None else "")
    p.port = int(line.rsplit(":", 1)[1])
    p.state_file, p.events = state_file, events
    yield p
    if p.poll() is None:
        p.kill()
        p.wait()


def test_ready_reload_terminate(fresh, proc):
    c = Client(proc.port)
    assert c.request("GET", "/public").status == 200
    # New state without L7 rules: written atomically (tmp + rename), then SIGHUP.
    tmp = proc.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({**fresh.state.to_json(), "l7": []}))
    os.replace(tmp, proc.state_file)
    proc.send_signal(signal.SIGHUP)
    statuses = [c.request("GET", "/public").status for _ in range(50)]
    assert statuses[-1] == 403 and set(statuses) <= {200, 403}
    assert statuses == sorted(statuses)  # once the new state is seen, never the old one again
    # A broken file fails closed: everything denied.
    proc.state_file.write_text(json.dumps(fresh.state.to_json()))
    proc.send_signal(signal.SIGHUP)
    while c.request("GET", "/public").status != 200:
        pass
    proc.state_file.write_text("{not json")
    proc.send_signal(signal.SIGHUP)
    while c.request("GET", "/public").status != 403:
        pass
    c.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "cannot load" in proc.stderr.read()
    records = [Flow.from_json(json.loads(line)) for line in proc.events.read_text().splitlines()]
    assert records[0].verdict == "forwarded" and records[0].http.path == "/public"
    assert {r.verdict for r in records} == {"forwarded", "denied"}


def test_memory_is_not_the_body_size(fresh, proc):
    c = Client(proc.port)
    assert c.request("GET", "/public").status == 200
    assert c.request("POST", "/upload", body=pattern_bytes(MB)).status == 200  # warm up buffers
    before = _vm_hwm_kb(proc.pid)
    body = pattern_bytes(4 * MB)
    c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n" % (5 * len(body)))
    for _ in range(5):
        c.send(body)
    assert c.read_response().status == 200
    got = [0]
    c.send(b"GET /big/%d HTTP/1.1\r\nHost: backend\r\n\r\n" % (20 * MB))
    c.read_response(sink=lambda piece: got.__setitem__(0, got[0] + len(piece)))
    assert got[0] == 20 * MB
    c.close()
    grown_mb = (_vm_hwm_kb(proc.pid) - before) / 1024
    assert grown_mb < 8, f"peak RSS grew by {grown_mb:.1f} MB while streaming 2 x 20 MB"


def test_bad_state_file_at_start_exits_2(tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({"format": 99}))
    p = subprocess.run([sys.executable, "-m", "proxy", "--lab", "t", "--state", str(bad), "--host", "127.0.0.1",
                        "--port", "0", "--no-mark", "--original-dst", "127.0.0.3:1"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unsupported map state format" in p.stderr


def test_state_round_trip_file(fresh):
    again = MapState.from_json(json.loads(json.dumps(fresh.state.to_json())))
    assert again.to_json() == fresh.state.to_json()
