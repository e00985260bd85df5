"""The confinement step of pod processes: users are resolved and validated, the invoking user is
the one behind sudo, and a confined command runs unprivileged with the hidden directory empty,
while the host's view stays unchanged (the mount never propagates back)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane import confine
from dataplane.errors import L7LabError

REPO = Path(__file__).resolve().parents[2]


def test_users_are_resolved_by_name_or_number_and_must_exist() -> None:
    assert confine.resolve_user("nobody").uid == confine.resolve_user("65534").uid == 65534
    assert confine.resolve_user("root") == confine.resolve_user("0")
    for bad in ("no-such-user-here", "4294967294", "", "-1", "../../etc"):
        with pytest.raises(L7LabError, match="unknown user"):
            confine.resolve_user(bad)


def test_the_invoking_user_is_the_one_behind_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_UID", raising=False)
    monkeypatch.delenv("SUDO_GID", raising=False)
    me = confine.invoking_user()
    assert (me.uid, me.gid) == (os.getuid(), os.getgid())
    if os.geteuid() != 0:
        return
    monkeypatch.setenv("SUDO_UID", "65534")
    monkeypatch.setenv("SUDO_GID", "65534")
    assert (confine.invoking_user().uid, confine.invoking_user().gid) == (65534, 65534)
    monkeypatch.setenv("SUDO_UID", "not-a-number")
    assert confine.invoking_user().uid == 0  # a malformed SUDO_UID is ignored: root stays root


def test_endpoint_users_are_distinct_and_unprivileged(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.touch()
    b.touch()
    ua, ub = confine.endpoint_user(a), confine.endpoint_user(b)
    assert ua.uid != ub.uid and min(ua.uid, ub.uid) >= confine.POD_ID_BASE and ua.gid == ua.uid


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory any user may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="l7lab-confine-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="confining needs root")
def test_a_confined_command_sees_the_hidden_directory_empty_and_the_host_is_unchanged(public_dir: Path) -> None:
    hidden = public_dir / "run"
    hidden.mkdir()
    (hidden / "agent.sock").write_text("secret")
    script = (f"id -u; id -G; echo listing; ls -A {hidden}; echo end; grep NoNewPrivs /proc/self/status; "
              f"touch {hidden}/x 2>/dev/null || echo read-only")
    out = subprocess.run([sys.executable, "-m", "dataplane.confine", "--uid", "65534", "--gid", "65534",
                          "--hide", str(hidden), "--", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert lines[:4] == ["65534", "65534", "listing", "end"]  # the directory is there, and empty
    assert lines[4:] == ["NoNewPrivs:\t1", "read-only"]
    # Nothing propagated back: the host still sees the directory's contents, with no mount over it.
    assert (hidden / "agent.sock").read_text() == "secret"
    assert str(hidden) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="confining needs root")
def test_confine_reports_a_command_it_cannot_run(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "dataplane.confine", "--uid", "65534", "--gid", "65534", "--",
                          "no-such-command-here"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 127 and "cannot run 'no-such-command-here'" in out.stderr
