"""`l7lab observe` and `l7lab monitor` on a lab's record files: Hubble's outputs (`-o compact`,
`dict`, `json`, `jsonpb`) and l7lab's records (`--json`), the filter flags on the command line,
`--last N` of the flows that pass, `--since` / `--until`, `--follow` until Ctrl-C, `monitor`
streaming only what comes next, and usage errors (exit 2) that name the flag. The records are
written by hand where `observe` finds a lab (L7LAB_RUN_DIR); kernel tests run the same verbs on
real traffic (tests/kernel/test_observe_filters.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest

from dataplane.flowrecord import (Endpoint, Flow, FlowType, L4, L7, PolicyAttribution, ProxyEvent, TracePoint,
                                  TrafficDirection, Verdict)
from dataplane.flowrender import json_line
from dataplane.flows import KERNEL_FLOWS, PROXY_RECORDS
from l7.http import HttpFlow

REPO = Path(__file__).resolve().parents[2]
START = time.time() - 600  # the records are ten minutes old, one a second

FRONTEND = dict(namespace="retail", pod="frontend-app", labels={"app": "frontend-app"}, endpoint_id=11, identity=256)
INVENTORY = dict(namespace="retail", pod="inventory-api", labels={"app": "inventory-api"}, endpoint_id=12,
                 identity=257)
REPORTING = dict(namespace="retail", pod="reporting", labels={"app": "reporting"}, endpoint_id=13, identity=258)
READ_ONLY = "CiliumNetworkPolicy retail/inventory-read-only"


def kernel(seq: int, src: dict[str, Any], dst: dict[str, Any], verdict: Verdict, sport: int) -> Flow:
    dropped = verdict == Verdict.DROP
    return Flow(START + seq, FlowType.L3_L4, verdict, Endpoint("10.0.0.11" if src is FRONTEND else "10.0.0.13", sport,
                                                               **src),
                Endpoint("10.0.0.12", 8080, **dst), L4("TCP", ("SYN",)), TrafficDirection.INGRESS,
                TracePoint.FROM_ENDPOINT, "POLICY_DENIED" if dropped else "NONE",
                policy=PolicyAttribution() if dropped else PolicyAttribution((3,), (READ_ONLY,), (f"{READ_ONLY} ingress[0]",)),
                proxy_port=0 if dropped else 15001, bytes=60)


def request(seq: int, method: str, code: int, sport: int) -> Flow:
    return Flow(START + seq, FlowType.L7, Verdict.FORWARDED if code == 200 else Verdict.DENIED,
                Endpoint("10.0.0.11", sport, **FRONTEND), Endpoint("10.0.0.12", 8080, **INVENTORY), L4("TCP"),
                TrafficDirection.INGRESS, TracePoint.PROXY, policy=PolicyAttribution((), (READ_ONLY,)),
                l7=L7(0.5, http=HttpFlow(method, f"http://inventory-api:8080/api/inventory/{seq}",
                                         f"/api/inventory/{seq}", "HTTP/1.1", code)))


# Seconds 0-1: a GET let through (redirect, request); 2-3: a DELETE denied; 4: a drop of
# reporting; 5: the proxy exited; 6-7: a second DELETE denied.
RECORDS: list[Any] = [
    kernel(0, FRONTEND, INVENTORY, Verdict.REDIRECT, 40000), request(1, "GET", 200, 40000),
    kernel(2, FRONTEND, INVENTORY, Verdict.REDIRECT, 40002), request(3, "DELETE", 403, 40002),
    kernel(4, REPORTING, INVENTORY, Verdict.DROP, 40004),
    ProxyEvent(START + 5, "exited", "the L7 proxy killed by SIGKILL", 4242),
    kernel(6, FRONTEND, INVENTORY, Verdict.REDIRECT, 40006), request(7, "DELETE", 403, 40006),
]


def write(run_dir: Path, records: list[Any]) -> None:
    for record in records:
        name = PROXY_RECORDS if record.type == FlowType.L7 else KERNEL_FLOWS
        with open(run_dir / "obs" / name, "a") as f:
            f.write(json_line(record) + "\n")


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A lab as `observe` finds it: its record and its directory with the records above."""
    (tmp_path / "obs.json").write_text(json.dumps({"lab": "obs", "scenario": "s.yaml", "status": "up"}))
    (tmp_path / "obs").mkdir()
    write(tmp_path, RECORDS)
    return tmp_path


def env(run_dir: Path) -> dict[str, str]:
    return {**os.environ, "L7LAB_RUN_DIR": str(run_dir), "PYTHONPATH": str(REPO)}


def l7lab(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataplane.cli", *args], cwd=REPO, env=env(run_dir),
                          capture_output=True, text=True, timeout=60)


def flows(run_dir: Path, *args: str) -> list[dict[str, Any]]:
    out = l7lab(run_dir, "observe", "obs", "-o", "json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def kinds(found: list[dict[str, Any]]) -> list[str]:
    """Each flow as 'verdict type' ('REDIRECTED policy-verdict', 'DROPPED l7 DELETE', ...)."""
    names = {1: "drop", 4: "trace", 5: "policy-verdict", 129: "l7"}
    out = []
    for f in found:
        text = f"{f['verdict']} {names[f['event_type']['type']]}"
        if "http" in f.get("l7", {}):
            text += f" {f['l7']['type']} {f['l7']['http']['method']}"
        out.append(text)
    return out


def test_observe_offers_every_filter_flag() -> None:
    from dataplane.cli.observe import FILTER_HELP  # noqa: PLC0415
    from dataplane.hubblefilter import FILTER_FLAGS  # noqa: PLC0415

    assert tuple(FILTER_HELP) == FILTER_FLAGS


def test_outputs_show_every_flow_once(lab: Path) -> None:
    every = flows(lab)
    # 3 redirects (policy verdict + trace each), 3 requests (+ a response each), 1 drop (policy
    # verdict + drop); the proxy's exit is an agent event, shown only with --type agent.
    assert len(every) == 14 and all("agent_event" not in f for f in every)
    assert all(f["node_name"] == "l7lab/obs" for f in every)
    compact = l7lab(lab, "observe", "obs").stdout.splitlines()
    assert len(compact) == 14 and "retail/reporting:40004 (ID:258)" in compact[8], compact
    jsonpb = [json.loads(line) for line in l7lab(lab, "observe", "obs", "-o", "jsonpb").stdout.splitlines()]
    assert [line["flow"] for line in jsonpb] == every and jsonpb[0]["time"] == every[0]["time"]
    text = l7lab(lab, "observe", "obs", "-o", "dict").stdout
    blocks = text.split("\n------------\n")
    assert len(blocks) == 14 and all(b.splitlines()[0].startswith("  TIMESTAMP: ") for b in blocks), text


def test_filters_on_the_command_line(lab: Path) -> None:
    assert kinds(flows(lab, "--verdict", "DROPPED")) == [
        "DROPPED l7 REQUEST DELETE", "DROPPED policy-verdict", "DROPPED drop", "DROPPED l7 REQUEST DELETE"]
    assert kinds(flows(lab, "--http-method", "DELETE", "--http-status", "403")) == [
        "FORWARDED l7 RESPONSE DELETE", "FORWARDED l7 RESPONSE DELETE"]
    assert kinds(flows(lab, "--from-pod", "retail/reporting")) == ["DROPPED policy-verdict", "DROPPED drop"]
    assert kinds(flows(lab, "--type", "trace:to-proxy", "--verdict", "FORWARDED", "--verdict", "REDIRECTED")) == \
        ["FORWARDED trace"] * 3
    assert len(flows(lab, "--not", "--verdict", "FORWARDED")) == 7  # 3 + 1 policy verdicts, 2 denied requests, a drop
    assert flows(lab, "--pod", "retail/frontend-app") == flows(lab, "--not", "--from-pod", "retail/reporting")


def test_last_counts_the_flows_that_pass(lab: Path) -> None:
    assert kinds(flows(lab, "--last", "2")) == ["DROPPED l7 REQUEST DELETE", "FORWARDED l7 RESPONSE DELETE"]
    assert kinds(flows(lab, "--last", "3", "--verdict", "DROPPED")) == [
        "DROPPED policy-verdict", "DROPPED drop", "DROPPED l7 REQUEST DELETE"]
    assert flows(lab, "--last", "0") == []
    records = l7lab(lab, "observe", "obs", "--json", "--last", "2", "--verdict", "DROPPED").stdout.splitlines()
    # --json prints l7lab's records: the last two with a flow that passes.
    assert [(r["type"], r["verdict"]) for r in map(json.loads, records)] == [("L3_L4", "DROP"), ("L7", "denied")]


def test_last_reaches_past_records_that_show_nothing(lab: Path) -> None:
    """The proxy's notes at the end of a file are no flows: --last N still finds N flows."""
    for name in (KERNEL_FLOWS, PROXY_RECORDS):
        (lab / "obs" / name).unlink()
    write(lab, [request(0, "GET", 200, 39000), kernel(1, REPORTING, INVENTORY, Verdict.DROP, 40000)] +
          [ProxyEvent(START + 2 + i, "restarted", "the L7 proxy is back", 100 + i) for i in range(3)])
    assert kinds(flows(lab, "--last", "1")) == ["DROPPED drop"]
    assert kinds(flows(lab, "--last", "5")) == ["FORWARDED l7 REQUEST GET", "FORWARDED l7 RESPONSE GET",
                                                "DROPPED policy-verdict", "DROPPED drop"]
    assert len(l7lab(lab, "observe", "obs", "--json", "--last", "2").stdout.splitlines()) == 2  # records: the notes


def test_since_and_until(lab: Path) -> None:
    window = flows(lab, "--since", str(START + 1.5), "--until", str(START + 4.5))
    assert kinds(window) == ["REDIRECTED policy-verdict", "FORWARDED trace", "DROPPED l7 REQUEST DELETE",
                             "FORWARDED l7 RESPONSE DELETE", "DROPPED policy-verdict", "DROPPED drop"]
    assert flows(lab, "--since", "1m") == []  # the records are ten minutes old
    assert len(flows(lab, "--since", "1h", "--until", "5m")) == 14
    assert flows(lab, "--until", "1h") == []


def test_agent_events_with_type_agent_and_in_records(lab: Path) -> None:
    out = l7lab(lab, "observe", "obs", "--type", "agent")
    assert out.stdout.splitlines()[0].endswith(
        ": AGENT_EVENT_UNKNOWN (type: proxy exited, notification: the L7 proxy killed by SIGKILL (pid 4242))"), out
    agent = flows(lab, "--type", "agent")
    assert agent == [{"type": "AGENT_EVENT_UNKNOWN", "unknown": {
        "type": "proxy exited", "notification": "the L7 proxy killed by SIGKILL (pid 4242)"}}]
    records = [json.loads(line) for line in l7lab(lab, "observe", "obs", "--json").stdout.splitlines()]
    assert [r["type"] for r in records].count("PROXY") == 1 and len(records) == len(RECORDS)
    # The old --type words: flows (the kernel's), l7; and `all`.
    only_kernel = l7lab(lab, "observe", "obs", "--json", "--type", "flows").stdout.splitlines()
    assert {json.loads(r)["type"] for r in only_kernel} == {"L3_L4"} and len(only_kernel) == 4
    only_l7 = l7lab(lab, "observe", "obs", "--json", "--type", "l7").stdout.splitlines()
    assert {json.loads(r)["type"] for r in only_l7} == {"L7"} and len(only_l7) == 3
    assert len(l7lab(lab, "observe", "obs", "--json", "--type", "all").stdout.splitlines()) == len(RECORDS)
    # --not negates each type `flows` stands for: what is left is the L7 flows.
    assert {f["event_type"]["type"] for f in flows(lab, "--not", "--type", "flows")} == {129}


def test_largest_last_shows_every_flow(lab: Path) -> None:
    assert len(flows(lab, "--last", "9223372036854775807")) == 14
    assert len(flows(lab, "--last", "9223372036854775807", "--verdict", "DROPPED")) == 4


@pytest.mark.parametrize(("args", "message"), [
    (("--verdict", "DENIED"), "--verdict: expected one of FORWARDED, DROPPED"),
    (("--http-path", "/api/(x"), "--http-path: expected a regular expression (RE2 syntax)"),
    (("--http-status", "4xx"), "--http-status: expected a status code (403) or a prefix of one (4+, 40+)"),
    (("--to-port", "http"), "--to-port: expected a port number (0-65535), got 'http'"),
    (("--label", "app in x"), "--label: expected a label selector"),
    (("--type", "drops"), "--type: expected an event type"),
    (("--verdict", "DROPPED", "--not"), "--not: a trailing --not"),
    (("--port", "80", "--to-port", "80"), "filters --port and --to-port cannot be combined"),
    (("--json", "-o", "json"), "--json prints l7lab's own records and -o/--output Hubble's flows: choose one"),
    (("--until", "1m", "--follow"), "--until ends a window in the past"),
    (("-o", "table"), "argument -o/--output: invalid choice: 'table'"),
    (("--last", "-1"), "argument --last: expected a number of flows (0 or more,"),
    (("--since", "yesterday"), "argument --since: expected a duration (30s, 5m, 1h30m, 2d)"),
    (("--follow-for", "soon"), "argument --follow-for: expected a number of seconds"),
    # Numbers out of range: a usage error, never a traceback.
    (("--last", "99999999999999999999"), "argument --last: expected a number of flows (0 or more, at most "
                                         "9223372036854775807), got '99999999999999999999'"),
    (("--last", "9" * 5000), "argument --last: expected a number of flows"),
    (("--last", "nan"), "argument --last: expected a number of flows"),
    (("--follow-for", "inf"), "argument --follow-for: expected a number of seconds (0 or more), got 'inf'"),
    (("--follow-for", "1e400"), "argument --follow-for: expected a number of seconds"),
    (("--follow-for", "nan"), "argument --follow-for: expected a number of seconds"),
    (("--since", "nan"), "argument --since: expected a duration (30s, 5m, 1h30m, 2d), a unix time or an ISO 8601"),
    (("--until", "nan"), "argument --until: expected a duration"),
    (("--since", "inf"), "argument --since: expected a duration"),
    (("--until=-1e400",), "argument --until: expected a duration"),
    (("--since", "9" * 400 + "s"), "argument --since: expected a duration"),  # more seconds than a float holds
    (("--port", "9" * 5000), "--port: expected a port number (0-65535)"),
    (("--identity", "99999999999999999999"), "--identity: expected a numeric security identity"),
    (("--type", "99999999999999999999"), "--type: expected an event type"),
    (("--http-status", "99999999999999999999"), "--http-status: expected a status code"),
    # HTTP filters need --type l7 (or no --type), as in Hubble; they would show nothing.
    (("--http-status", "403", "--type", "drop"), "--http-status: cannot be combined with --type drop"),
    (("--http-method", "GET", "--type", "policy-verdict"), "--http-method: cannot be combined with --type "
                                                           "policy-verdict"),
    (("--type", "flows", "--http-path", "^/api"), "--http-path: cannot be combined with --type policy-verdict "
                                                  "--type drop --type trace"),
    (("--not", "--type", "all"), "--type all filters nothing; it cannot be negated"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(lab: Path, args: tuple[str, ...], message: str) -> None:
    out = l7lab(lab, "observe", "obs", *args)
    assert out.returncode == 2 and message in out.stderr and out.stdout == "", out


def read_line(stream: IO[str], deadline: float) -> str:
    """The next line of a child's stdout, waiting at most until `deadline` (a loaded machine)."""
    os.set_blocking(stream.fileno(), False)
    buffered = ""
    while time.monotonic() < deadline:
        chunk = stream.readline()
        if chunk:
            buffered += chunk
            if buffered.endswith("\n"):
                return buffered
        else:
            time.sleep(0.05)
    raise AssertionError(f"no line within the deadline (got {buffered!r})")


def interrupted(child: subprocess.Popen[str]) -> int:
    child.send_signal(signal.SIGINT)
    return child.wait(timeout=30)


def test_follow_prints_new_flows_until_interrupted(lab: Path) -> None:
    child = subprocess.Popen([sys.executable, "-m", "dataplane.cli", "observe", "obs", "--follow", "-o", "json",
                              "--from-pod", "retail/reporting", "--type", "drop"], cwd=REPO, env=env(lab),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        first = json.loads(read_line(child.stdout, deadline))  # what the files held
        assert first["l4"]["TCP"]["source_port"] == 40004
        write(lab, [kernel(8, REPORTING, INVENTORY, Verdict.DROP, 40008), request(9, "GET", 200, 40010)])
        new = json.loads(read_line(child.stdout, deadline))
        assert new["l4"]["TCP"]["source_port"] == 40008 and new["event_type"]["type"] == 1
    finally:
        code = interrupted(child)
    assert code == 0 and child.stderr.read() == "" and child.stdout.read() == ""  # Ctrl-C: a clean end


def test_follow_for_ends_by_itself(lab: Path) -> None:
    out = l7lab(lab, "observe", "obs", "--follow-for", "0.5", "--type", "drop")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1, out


def test_monitor_streams_only_what_comes_next(lab: Path) -> None:
    child = subprocess.Popen([sys.executable, "-m", "dataplane.cli", "monitor", "obs", "--type", "drop",
                              "--type", "policy-verdict"], cwd=REPO, env=env(lab), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        # The monitor starts at the end of the files: write until it has seen a new record.
        seq = 10
        lines: list[str] = []
        while not lines:
            write(lab, [kernel(seq, REPORTING, INVENTORY, Verdict.DROP, 40000 + seq)])
            try:
                lines.append(read_line(child.stdout, min(deadline, time.monotonic() + 1)))
            except AssertionError:
                assert time.monotonic() < deadline, "monitor printed nothing"
            seq += 1
        lines.append(read_line(child.stdout, deadline))
    finally:
        code = interrupted(child)
    assert code == 0, child.stderr.read()
    verdict, drop = lines
    assert verdict.startswith("Policy verdict log: flow 0x0 local EP ID 12, remote ID 258, proto 6, ingress, "
                              "action deny"), verdict
    assert drop.startswith("xx drop (Policy denied) flow 0x0 to endpoint 12,"), drop
    assert f":{40000 + seq - 1} -> 10.0.0.12:8080 tcp SYN" in drop  # the new record, not the ones before


def test_monitor_bad_type_and_bounded_run(lab: Path) -> None:
    out = l7lab(lab, "monitor", "obs", "--type", "drop:x")
    assert out.returncode == 2 and "--type: expected a sub-type name or number (0-255) after drop:" in out.stderr, out
    for seconds in ("inf", "1e400", "nan", "-1"):
        out = l7lab(lab, "monitor", "obs", "--for", seconds)
        assert out.returncode == 2 and "argument --for: expected a number of seconds (0 or more)" in out.stderr, out
    out = l7lab(lab, "monitor", "obs", "--for", "0.3", "--json")
    assert out.returncode == 0 and out.stdout == "", out  # nothing new in 0.3 s; the history is not shown


def test_monitor_shows_agent_events_as_notifications(lab: Path) -> None:
    child = subprocess.Popen([sys.executable, "-m", "dataplane.cli", "monitor", "obs", "--type", "agent"], cwd=REPO,
                             env=env(lab), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while not line:  # until the monitor, reading from the end of the files, sees one
            write(lab, [ProxyEvent(time.time(), "restarted", "the L7 proxy is back (pid 77, restart 1)", 77),
                        kernel(20, REPORTING, INVENTORY, Verdict.DROP, 40020)])
            try:
                line = read_line(child.stdout, min(deadline, time.monotonic() + 1))
            except AssertionError:
                assert time.monotonic() < deadline, "monitor printed nothing"
    finally:
        code = interrupted(child)
    assert code == 0 and line == ">> proxy restarted: the L7 proxy is back (pid 77, restart 1)\n", line
    rest = child.stdout.read()
    assert "drop" not in rest, rest  # --type agent: no flows

