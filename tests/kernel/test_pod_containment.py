"""Pods are contained: a lab's pod and world servers run unprivileged, each as a uid of its own,
in a mount namespace where the lab's control directory is hidden, and `l7lab exec` runs commands the same
way. From inside a pod neither the agent's socket nor the policy files are reachable, the node
namespace cannot be entered, and a policy cannot be deleted; pod traffic, DNS and the servers'
request logs (rotated at the logs' size cap) still work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest

from dataplane import lab as labmod
from dataplane.confine import POD_ID_BASE
from dataplane.logfiles import previous, read_all, request_log
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.cli_lab import leftovers, nothing_left

pytestmark = pytest.mark.kernel

L7LAB = [sys.executable, "-m", "dataplane.cli"]
SCENARIO = REPO / "scenarios" / "dns-policy.yaml"
CAP = 4096  # the lab's log cap (L7LAB_LOG_ROTATE_BYTES): a few dozen requests rotate a log
NOBODY = 65534


def l7lab(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*L7LAB, *args], cwd=REPO, capture_output=True, text=True, timeout=scaled(timeout),
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def lab() -> Iterator[str]:
    name = unique_lab("pc")
    try:
        up = l7lab("up", str(SCENARIO), "--name", name, env={"L7LAB_LOG_ROTATE_BYTES": str(CAP)})
        assert up.returncode == 0, up.stderr
        yield name
    finally:
        l7lab("down", name)
        assert nothing_left(name), leftovers(name)


def in_pod(lab: str, pod: str, *command: str, user: str = "nobody") -> subprocess.CompletedProcess[str]:
    return l7lab("exec", "--lab", lab, "--user", user, pod, "--", *command)


def server_pids(lab: str) -> dict[str, int]:
    """Endpoint -> pid of its server, from the lab's record."""
    record = labmod.LabRecord.load(lab)
    assert record is not None
    return {r["what"].split(" ", 1)[1]: r["pid"] for r in record.resources
            if r["kind"] == "process" and r.get("what", "").startswith("dataplane.podserver")}


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def server_uid(pid: int) -> int:
    return int(status_fields(pid)["Uid"].split()[0])


def test_pod_and_world_servers_run_unprivileged_each_as_its_own_user(lab: str) -> None:
    pids = server_pids(lab)
    assert set(pids) == {"kube-system/kube-dns", "shop/mediabot", "shop/shell", "www", "partner", "elsewhere"}
    uids = set()
    for endpoint, pid in pids.items():
        status = status_fields(pid)
        uid = server_uid(pid)
        assert uid >= POD_ID_BASE and status["Uid"].split() == [str(uid)] * 4, (endpoint, status["Uid"])
        assert status["Gid"].split() == [str(uid)] * 4, (endpoint, status["Gid"])
        assert status["Groups"] == "", (endpoint, status["Groups"])
        assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0, endpoint
        uids.add(uid)
    assert len(uids) == len(pids)  # no two servers share a uid: none can signal or trace another
    # Nor can a pod's process: neither as nobody nor as another server's uid.
    dns_server = pids["kube-system/kube-dns"]
    signal_it = in_pod(lab, "shell", "kill", "-0", str(dns_server))
    assert signal_it.returncode != 0 and "Operation not permitted" in signal_it.stderr, signal_it
    shell = pids["shop/shell"]
    as_other_server = subprocess.run(["nsenter", "-t", str(shell), "-m", "-n", "-S", str(server_uid(shell)),
                                      "-G", str(server_uid(shell)), "--", "kill", "-0", str(dns_server)],
                                     capture_output=True, text=True)
    assert as_other_server.returncode != 0 and "Operation not permitted" in as_other_server.stderr, as_other_server


def test_the_control_directory_is_hidden_from_pods(lab: str) -> None:
    run_dir, lab_dir = labmod.RUN_DIR, labmod.lab_dir(lab)
    assert (lab_dir / "agent.sock").exists() and (lab_dir / "policy.json").exists()  # seen from the host
    # The pod server's own mount namespace, looked at as root: the run directory is empty there.
    pid = server_pids(lab)["shop/shell"]
    seen = subprocess.run(["nsenter", "-t", str(pid), "-m", "--", "ls", "-A", str(run_dir)], capture_output=True, text=True)
    assert seen.returncode == 0 and seen.stdout == "", seen
    # A command in the pod, as nobody and as root: the same.
    for user in ("nobody", "root"):
        listing = in_pod(lab, "shell", "ls", "-A", str(run_dir), user=user)
        assert listing.returncode == 0 and listing.stdout == "", (user, listing)
        policy = in_pod(lab, "shell", "cat", str(lab_dir / "policy.json"), user=user)
        assert policy.returncode != 0 and "No such file" in policy.stderr, (user, policy)
    # Hidden in the pod only: the host still sees its mounts unchanged.
    assert str(run_dir) not in [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert (lab_dir / "agent.sock").exists()


def test_a_pod_reaches_neither_the_agent_nor_the_node_namespace(lab: str) -> None:
    sock = str(labmod.lab_dir(lab) / "agent.sock")
    connect = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
               "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(e.__class__.__name__); sys.exit(1)\n"
               "print('connected')")
    # As the pod server itself (its uid, its mount and network namespaces).
    pid = server_pids(lab)["shop/shell"]
    uid = str(server_uid(pid))
    as_server = subprocess.run(["nsenter", "-t", str(pid), "-m", "-n", "-S", uid, "-G", uid, "--",
                                "/usr/bin/python3", "-c", connect, sock], capture_output=True, text=True)
    assert as_server.returncode == 1 and "FileNotFoundError" in as_server.stdout, as_server
    # And as a command run in the pod.
    as_exec = in_pod(lab, "shell", "python3", "-c", connect, sock)
    assert as_exec.returncode == 1 and "FileNotFoundError" in as_exec.stdout, as_exec
    # The l7lab command itself, run in a pod, finds no lab to change: the policy stays.
    delete = in_pod(lab, "shell", *L7LAB, "delete", "cnp", "mediabot-dns", "-n", "shop", "--lab", lab)
    assert delete.returncode == 1 and f"no lab named {lab!r} is up" in delete.stderr, delete
    status = l7lab("status", lab, "--json")
    assert status.returncode == 0 and "mediabot-dns" in status.stdout
    # Entering the node namespace needs privileges a pod's process does not have.
    node = labmod.node_netns(lab)
    enter = in_pod(lab, "shell", "ip", "netns", "exec", node, "true")
    assert enter.returncode != 0 and "Operation not permitted" in enter.stderr, enter
    enter = in_pod(lab, "shell", "nsenter", f"--net=/run/netns/{node}", "true")
    assert enter.returncode != 0 and "Operation not permitted" in enter.stderr, enter
    enter = in_pod(lab, "shell", "nsenter", "-t", "1", "-m", "-n", "true")
    assert enter.returncode != 0, enter


def test_exec_runs_as_the_invoking_user_by_default(lab: str) -> None:
    as_root = l7lab("exec", "--lab", lab, "shell", "--", "id", "-u")
    assert as_root.returncode == 0 and as_root.stdout.strip() == "0"  # invoked directly as root
    behind_sudo = subprocess.run([*L7LAB, "exec", "--lab", lab, "shell", "--", "id", "-u"], cwd=REPO, capture_output=True,
                                 text=True, env={**os.environ, "SUDO_UID": str(NOBODY), "SUDO_GID": str(NOBODY)})
    assert behind_sudo.returncode == 0 and behind_sudo.stdout.strip() == str(NOBODY)
    unknown = l7lab("exec", "--lab", lab, "--user", "no-such-user-here", "shell", "--", "true")
    assert unknown.returncode == 1 and "unknown user 'no-such-user-here'" in unknown.stderr


def test_pod_traffic_dns_and_rotated_request_logs_still_work(lab: str) -> None:
    requests = 60
    loop = (f"for i in $(seq {requests}); do curl -s -m 10 -o /dev/null -w '%{{http_code}}\\n' "
            "http://www.example.org/probe-$i || echo failed; done")
    http = in_pod(lab, "shell", "sh", "-c", loop)
    assert http.returncode == 0 and http.stdout.split() == ["200"] * requests, http
    # The query is built and the answer read here, with dnspython; in the pod, as nobody, only the
    # system Python's standard library sends it (the venv may lie where nobody cannot read, /root).
    query = dns.message.make_query("www.example.org", "A")
    ask = ("import socket, sys\n"
           f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout({scaled(5):g})\n"
           "s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 53))\nprint(s.recv(4096).hex())")
    record = labmod.LabRecord.load(lab)
    assert record is not None
    kube_dns = record.endpoints["kube-system/kube-dns"].ip
    answer = in_pod(lab, "shell", "python3", "-c", ask, query.to_wire().hex(), kube_dns)
    assert answer.returncode == 0, answer
    reply = dns.message.from_wire(bytes.fromhex(answer.stdout.strip()))
    assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["198.51.100.30"], reply
    # The servers, unprivileged and blind to the lab's directory, still log what they received,
    # and rotate their logs at the cap.
    lab_dir = labmod.lab_dir(lab)
    questions = read_all(request_log(lab_dir, "pod.kube-system.kube-dns"))
    assert questions and questions[-1]["dns"] == "www.example.org" and questions[-1]["rcode"] == "NOERROR"
    log = request_log(lab_dir, "world.elsewhere")
    assert previous(log).exists(), "the world host's server never rotated its request log"
    assert log.stat().st_size <= CAP and previous(log).stat().st_size <= CAP
    paths = [r["path"] for r in read_all(log)]
    assert paths[-1] == f"/probe-{requests}" and paths == [f"/probe-{i}" for i in range(requests - len(paths) + 1, requests + 1)]
    assert json.loads(log.read_text().splitlines()[-1])["endpoint"] == "elsewhere"
    # And observe shows the last flows without reading everything.
    observed = l7lab("observe", lab, "--last", "3", "--json")
    assert observed.returncode == 0 and 0 < len(observed.stdout.splitlines()) <= 3, observed


def test_malformed_requests_do_not_grow_a_servers_log_without_bound(lab: str) -> None:
    """Each malformed request makes the server log an error; its log stays under the cap even
    though the confined server cannot see (or rename) the file."""
    flood = ("import socket, sys\n"
             "for i in range(int(sys.argv[2])):\n"
             "    s = socket.create_connection((sys.argv[1], 80), timeout=10)\n"
             "    s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: -%d\\r\\n\\r\\n' % i)\n"
             "    s.recv(1000)\n"
             "    s.close()\n")
    record = labmod.LabRecord.load(lab)
    assert record is not None
    sent = in_pod(lab, "shell", "python3", "-c", flood, record.endpoints["partner"].ip, "100")
    assert sent.returncode == 0, sent
    log = labmod.lab_dir(lab) / "world.partner.log"
    assert "Error handling request" in log.read_text()  # the errors are logged ...
    assert log.stat().st_size <= CAP  # ... within the cap (100 of them take ~100 kB)
