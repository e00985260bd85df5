"""`python -m proxy` as its own process keeps its L7 event log bounded under traffic: past
L7LAB_LOG_ROTATE_BYTES the file becomes NAME.1 and a new one begins, and a follower reading
while the proxy rotates gets every record once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dataplane.flowrecord import Flow
from dataplane.logfiles import FollowedFile, json_lines

from tests.support.http import Client

REPO = Path(__file__).resolve().parents[3]
CAP = 32768  # bytes: dozens of records per file, so the follower (every 10 requests) misses no rotation


def test_a_running_proxy_rotates_its_event_log(fresh, tmp_path: Path) -> None:
    state_file = tmp_path / "policy.json"
    state_file.write_text(json.dumps(fresh.state.to_json()))
    events = tmp_path / "l7-events.jsonl"
    env = {**os.environ, "L7LAB_LOG_ROTATE_BYTES": str(CAP)}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--lab", "t", "--state", str(state_file), "--host", "127.0.0.1",
                             "--port", "0", "--original-dst", f"{fresh.backend.host}:{fresh.backend.port}", "--no-mark",
                             "--events", str(events)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        client = Client(int(line.rsplit(":", 1)[1]))
        follower = FollowedFile(events)
        seen: list[str] = []
        total = 300
        for i in range(total):
            path = f"/public/{i}" if i % 3 else f"/private/{i}"
            assert client.request("GET", path).status in (200, 403)
            if i % 10 == 0:
                seen += [Flow.from_json(r).http.path for r in json_lines(follower.read())]
        client.close()
        # The proxy writes a record once a response is done: wait (bounded) for the last one.
        deadline = time.monotonic() + 30
        while len(seen) < total and time.monotonic() < deadline:
            time.sleep(0.01)
            seen += [Flow.from_json(r).http.path for r in json_lines(follower.read())]
        rotated = events.with_name(events.name + ".1")
        assert rotated.exists(), "the proxy never rotated its event log"
        assert events.stat().st_size <= CAP and rotated.stat().st_size <= CAP
        assert seen == [f"/public/{i}" if i % 3 else f"/private/{i}" for i in range(total)]
    finally:
        proc.kill()
        proc.wait()
