"""Lab names never reach outside the lab's own files: every verb that takes a lab name, with
traversal, absolute, symlinked, empty, over-long and non-ASCII names, in a sandboxed run
directory (L7LAB_RUN_DIR), with canaries outside it that must not change.

Nothing here needs a kernel: names are checked before any namespace is looked at, and the few
namespace lookups that valid names cause only read /run/netns for this test's own lab names.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dataplane import cli
from dataplane import lab as labmod
from dataplane import processes, safety
from dataplane.errors import SetupError
from tests.conftest import REPO, unique_lab

L7LAB = [sys.executable, "-m", "dataplane.cli"]
BAD_NAMES = ["../../etc", "..", "a/../../b", "/etc", "", "a" * 21, "läb", "lab\n", "Lab", "_a", "a-", "a.b"]
SCENARIO = str(REPO / "scenarios" / "connectivity.yaml")


def verbs(name: str, policy: str) -> list[list[str]]:
    """Every way a lab name reaches the CLI."""
    return [["down", name], ["down", "--lab", name], ["clean", name], ["clean", "--lab", name],
            ["status", name], ["status", "--lab", name], ["observe", name], ["observe", "--lab", name],
            ["apply", policy, "--lab", name], ["delete", "cnp", "p", "--lab", name],
            ["label", "pod", "shop/frontend-app", "k=v", "--lab", name],
            ["exec", "--lab", name, "frontend-app", "--", "true"],
            ["up", SCENARIO, "--name", name], ["run", SCENARIO, "--name", name],
            ["run", "--dry-run", SCENARIO, "--name", name]]


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under `root` (links not followed): its type and content or link target."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = ("file", p.read_bytes())
            else:
                out[str(p.relative_to(root))] = ("dir",)
    return out


class Sandbox:
    """tmp/a/b/run is the run directory; tmp/a/etc, tmp/a/b/b and tmp/outside are what a
    traversal or a link would reach; lab `keep` is another lab in the run directory."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp
        self.run = tmp / "a" / "b" / "run"
        self.outside = tmp / "outside"
        for d in (self.run / "keep", tmp / "a" / "etc", tmp / "a" / "b" / "b", self.outside / "sub"):
            d.mkdir(parents=True)
        for f in (tmp / "a" / "etc" / "canary", tmp / "a" / "etc.json", tmp / "a" / "b" / "b" / "canary",
                  self.outside / "canary.txt", self.outside / "sub" / "x", self.run / "keep" / "proxy.log",
                  tmp / "a" / "b" / "run.json"):
            f.write_text("must stay\n")
        self.write_record("keep", [{"kind": "dir", "path": str(self.run / "keep")}])
        self.policy = tmp / "p.yaml"
        self.policy.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
                               "spec: {endpointSelector: {}}\n")
        self.before = snapshot(tmp)

    def write_record(self, lab: str, resources: list[dict[str, Any]]) -> Path:
        path = self.run / f"{lab}.json"
        path.write_text(json.dumps({"lab": lab, "scenario": "s.yaml", "status": "up", "resources": resources}))
        return path

    def env(self) -> dict[str, str]:
        return {**os.environ, "L7LAB_RUN_DIR": str(self.run), "COLUMNS": "200"}

    def l7lab(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*L7LAB, *args], cwd=REPO, capture_output=True, text=True, env=env or self.env(),
                             timeout=120)
        out.args = list(args)
        return out

    def l7lab_all(self, argvs: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
        """Several commands, a few side by side (each on its own, as a user would run them)."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda argv: self.l7lab(*argv), argvs))

    def unchanged(self) -> bool:
        return snapshot(self.root) == self.before


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    box = Sandbox(Path(os.path.realpath(tmp_path)))
    monkeypatch.setattr(labmod, "RUN_DIR", str(box.run))
    return box


# --- the rules themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_lab_name_is_refused_with_the_rule(name: str) -> None:
    with pytest.raises(SetupError, match=r"invalid lab name .*expected 1-20 characters a-z, 0-9 and '-'"):
        labmod.validate_lab_name(name)
    for build in (labmod.record_path, labmod.lab_dir, labmod.LabRecord.load, labmod.down, labmod.clean,
                  labmod.check_absent):
        with pytest.raises(SetupError, match="invalid lab name"):
            build(name)


def test_good_lab_names() -> None:
    for name in ("a", "0", "shop", "t-1234abcd", "a" * 20, "a-b-c"):
        labmod.validate_lab_name(name)


@pytest.mark.parametrize("raw, expected", [
    ("run/l7lab", "expected an absolute path"), ("", "expected an absolute path"),
    ("/", "not '/' or a top-level directory"), ("/tmp", "not '/' or a top-level directory"),
    ("/run/l7lab/", "normalized"), ("/run/../etc/l7lab", "normalized"), ("//run/l7lab", "normalized"),
    ("/run/./l7lab", "normalized")])
def test_run_dir_override_must_be_an_absolute_normalized_path(raw: str, expected: str) -> None:
    with pytest.raises(SetupError, match=expected):
        safety.check_run_dir(raw)


def test_run_dir_override_through_a_link_or_a_file_is_refused(sandbox: Sandbox) -> None:
    link = sandbox.root / "runlink"
    link.symlink_to(sandbox.run)
    sandbox.before = snapshot(sandbox.root)
    with pytest.raises(SetupError, match="symbolic link"):
        safety.check_run_dir(str(link / "inner"))
    out = sandbox.l7lab("down", "keep", env={**sandbox.env(), "L7LAB_RUN_DIR": str(link)})
    assert out.returncode == 1 and "L7LAB_RUN_DIR" in out.stderr and "symbolic link" in out.stderr, out.stderr
    out = sandbox.l7lab("clean", "keep", env={**sandbox.env(), "L7LAB_RUN_DIR": str(sandbox.outside / "canary.txt")})
    assert out.returncode == 1 and "is not a directory" in out.stderr, out.stderr
    out = sandbox.l7lab("down", "keep", env={**sandbox.env(), "L7LAB_RUN_DIR": "/"})
    assert out.returncode == 1 and "not '/'" in out.stderr, out.stderr
    assert sandbox.unchanged()
    assert safety.check_run_dir(str(sandbox.run)) == sandbox.run


def test_owned_paths_are_the_labs_own_only(sandbox: Sandbox) -> None:
    run, etc = sandbox.run, sandbox.root / "netns"
    for path in (run / "x", run / "x.json", run / "x.tmp", run / "x" / "deep" / "file", etc / "l7lab-x.node",
                 etc / "l7lab-x.pod.a.b" / "hosts"):
        safety.owned_root(path, "x", run, etc)
    for path in (run, run / "xy", run / "x-y.json", run / "x.log", run / "x" / ".." / "keep", sandbox.outside,
                 etc, etc / "l7lab-xy.node", etc / "l7lab-x", Path("/etc"), Path("relative/x")):
        with pytest.raises(safety.UnsafePathError, match="refusing to remove"):
            safety.owned_root(path, "x", run, etc)
    # A lab name that is not one never owns anything, even a path spelled inside it.
    (run / "x").mkdir(parents=True, exist_ok=True)
    for bad in ("..", "../x", "x/..", "", "x/y", "/x"):
        with pytest.raises(safety.UnsafePathError, match="is not a lab name"):
            safety.owned_root(run / "x", bad, run, etc)
        with pytest.raises(safety.UnsafePathError, match="is not a lab name"):
            safety.remove_owned(run / "x", bad, run, etc)
    assert (run / "x").is_dir()  # refused before anything was removed


def test_removal_refuses_links_and_never_follows_them(sandbox: Sandbox) -> None:
    run, etc = sandbox.run, sandbox.root / "netns"
    (run / "x").symlink_to(sandbox.outside)
    with pytest.raises(safety.UnsafePathError, match="symbolic link"):
        safety.remove_owned(run / "x", "x", run, etc)
    # A link on the way to a path inside the lab's directory is refused too.
    with pytest.raises(safety.UnsafePathError, match="symbolic link"):
        safety.remove_owned(run / "x" / "sub", "x", run, etc)
    (run / "x").unlink()
    # A real lab directory with a link inside: the link goes, what it points at stays.
    (run / "x").mkdir()
    (run / "x" / "escape").symlink_to(sandbox.outside)
    assert safety.remove_owned(run / "x", "x", run, etc)
    assert not (run / "x").exists() and (sandbox.outside / "canary.txt").read_text() == "must stay\n"
    assert not safety.remove_owned(run / "x", "x", run, etc)  # idempotent


# --- every verb, through the command line ----------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_every_verb_refuses_a_bad_lab_name_in_process(name: str, sandbox: Sandbox,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for argv in verbs(name, str(sandbox.policy)):
        assert cli.main(argv) == cli.EXIT_SETUP, argv
        err = capsys.readouterr().err
        assert f"invalid lab name {name!r}: expected 1-20 characters" in err, (argv, err)
    assert sandbox.unchanged()
    assert Path("/etc/passwd").exists()


def test_every_verb_refuses_a_traversal_through_the_cli(sandbox: Sandbox) -> None:
    for out in sandbox.l7lab_all(verbs("../../etc", str(sandbox.policy))):
        argv = out.args
        assert out.returncode == 1, (argv, out.stdout, out.stderr)
        assert "error: invalid lab name '../../etc': expected 1-20 characters" in out.stderr, (argv, out.stderr)
    assert sandbox.unchanged()


def test_removal_verbs_refuse_every_bad_name_through_the_cli(sandbox: Sandbox) -> None:
    """(Both ways of naming the lab, for every verb and name, are covered in process above.)"""
    argvs = [[verb, name] if i % 2 else [verb, "--lab", name]
             for verb in ("down", "clean", "status") for i, name in enumerate(BAD_NAMES)]
    for out in sandbox.l7lab_all(argvs):
        name = out.args[-1]
        assert out.returncode == 1 and f"invalid lab name {name!r}" in out.stderr, (out.args, out.stderr)
    assert sandbox.unchanged()


@pytest.mark.parametrize("verb", ["down", "clean"])
def test_a_lab_directory_that_is_a_link_is_refused(verb: str, sandbox: Sandbox) -> None:
    lab = unique_lab("n")
    (sandbox.run / lab).symlink_to(sandbox.outside)
    sandbox.before = snapshot(sandbox.root)
    out = sandbox.l7lab(verb, lab)
    assert out.returncode == 1, out.stderr
    assert f"refusing to remove {sandbox.run / lab}: it is a symbolic link" in out.stderr
    assert "nothing of lab" in out.stderr
    assert sandbox.unchanged()


def test_a_record_that_is_a_link_is_neither_read_nor_removed(sandbox: Sandbox) -> None:
    lab = unique_lab("n")
    outside_record = sandbox.outside / "record.json"
    outside_record.write_text(json.dumps({"lab": lab, "scenario": "s", "resources": [
        {"kind": "dir", "path": str(sandbox.outside)}]}))
    (sandbox.run / f"{lab}.json").symlink_to(outside_record)
    sandbox.before = snapshot(sandbox.root)
    for verb in ("down", "clean"):
        out = sandbox.l7lab(verb, lab)
        assert out.returncode == 1 and "symbolic link" in out.stderr, out.stderr
    assert sandbox.unchanged()


@pytest.mark.parametrize("resource", [
    {"kind": "dir", "path": "{outside}"},
    {"kind": "dir", "path": "{run}/{lab}/../keep"},
    {"kind": "dir", "path": "{run}"},
    {"kind": "dir", "path": "{run}/keep"},
    {"kind": "dir", "path": "/etc"},
    {"kind": "dir", "path": "/etc/netns/l7lab-keep.node"},
    {"kind": "netns", "name": "../../../etc/passwd"},
    {"kind": "netns", "name": "l7lab-keep.node"},
])
def test_a_record_listing_what_the_lab_does_not_own_removes_nothing(resource: dict[str, Any],
                                                                   sandbox: Sandbox) -> None:
    lab = unique_lab("n")
    (sandbox.run / lab).mkdir()
    (sandbox.run / lab / "proxy.log").write_text("x")
    res = {k: v.format(outside=sandbox.outside, run=sandbox.run, lab=lab) if isinstance(v, str) else v
           for k, v in resource.items()}
    sandbox.write_record(lab, [{"kind": "dir", "path": str(sandbox.run / lab)}, res])
    sandbox.before = snapshot(sandbox.root)
    out = sandbox.l7lab("down", lab)
    assert out.returncode == 1, out.stderr
    assert f"the record {sandbox.run / lab}.json lists what lab '{lab}' does not own" in out.stderr
    assert f"'l7lab clean {lab}'" in out.stderr
    assert sandbox.unchanged()
    # clean does not read the record: it removes only what carries the lab's name.
    out = sandbox.l7lab("clean", lab)
    assert out.returncode == 0, out.stderr
    assert not (sandbox.run / lab).exists() and not (sandbox.run / f"{lab}.json").exists()
    after = snapshot(sandbox.root)
    assert {k: v for k, v in sandbox.before.items() if lab not in k} == after


@pytest.mark.parametrize("netns", ["{lab}.node", "init", None, "l7lab-keep.node"])
def test_a_recorded_process_outside_the_labs_namespaces_is_not_killed(netns: str | None, sandbox: Sandbox) -> None:
    """A record names a process of the machine, with its (public) start time: not stopped."""
    lab = unique_lab("n")
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        res = {"kind": "process", "pid": bystander.pid, "start": processes.start_time(bystander.pid), "what": "x"}
        if netns is not None:
            res["netns"] = netns.format(lab=f"l7lab-{lab}")
        sandbox.write_record(lab, [res, {"kind": "process", "pid": 1, "start": processes.start_time(1),
                                         "netns": f"l7lab-{lab}.node"}])
        out = sandbox.l7lab("down", lab)
        assert out.returncode == 0, out.stderr
        assert not (sandbox.run / f"{lab}.json").exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_down_removes_the_lab_and_says_what(sandbox: Sandbox) -> None:
    lab = unique_lab("n")
    (sandbox.run / lab).mkdir()
    (sandbox.run / lab / "escape").symlink_to(sandbox.outside)
    sandbox.write_record(lab, [{"kind": "dir", "path": str(sandbox.run / lab)}])
    out = sandbox.l7lab("down", "--lab", lab)
    assert out.returncode == 0, out.stderr
    assert f"lab {lab}: removed dir {sandbox.run / lab}" in out.stdout
    assert f"lab {lab}: removed record {sandbox.run / lab}.json" in out.stdout
    assert not (sandbox.run / lab).exists()
    assert sandbox.unchanged()  # the lab's files were not in the snapshot; everything else is as it was
    again = sandbox.l7lab("down", lab)
    assert again.returncode == 0 and f"lab {lab}: nothing left to remove" in again.stdout


@pytest.mark.parametrize("verb", ["down", "clean"])
def test_down_and_clean_without_a_name_need_all(verb: str, sandbox: Sandbox) -> None:
    out = sandbox.l7lab(verb)
    assert out.returncode == 2, out.stderr
    assert f"usage: l7lab {verb}" in out.stderr
    assert "which lab? give its name, or --all to remove every lab on this machine (labs up or left over: " in out.stderr
    assert "keep" in out.stderr
    both = sandbox.l7lab(verb, "keep", "--all")
    assert both.returncode == 2 and "give a lab name or --all, not both" in both.stderr
    twice = sandbox.l7lab(verb, "keep", "--lab", "other")
    assert twice.returncode == 2 and "the lab is given twice, as 'keep' and --lab 'other'" in twice.stderr
    assert sandbox.unchanged()


def test_clean_all_removes_every_lab_and_only_what_labs_own(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """In process, with the namespace list and /etc/netns replaced: `--all` on the real machine
    would reach labs that are not this test's."""
    etc = sandbox.root / "netns"
    (etc / "l7lab-gone.pod.shop.a").mkdir(parents=True)
    (etc / "l7lab-gone.pod.shop.a" / "hosts").write_text("x")
    (etc / "l7lab-Bad.node").mkdir()  # not a name l7lab makes: left alone, with a warning
    (etc / "l7lab-evil.node").symlink_to(sandbox.outside)  # refused: a link
    (etc / "other").mkdir()
    (sandbox.run / "Not-A-Lab").mkdir()
    monkeypatch.setattr(labmod, "NETNS_ETC", etc)
    monkeypatch.setattr(labmod.topology, "list_netns", lambda prefix="": [])
    assert cli.main(["clean", "--all"]) == cli.EXIT_SETUP
    out = capsys.readouterr()
    assert "clean --all: removing labs evil, gone, keep" in out.out
    assert f"lab keep: removed dir {sandbox.run / 'keep'}" in out.out
    assert f"lab gone: removed dir {etc / 'l7lab-gone.pod.shop.a'}" in out.out
    assert f"error: refusing to remove {etc / 'l7lab-evil.node'}: it is a symbolic link" in out.err
    assert "warning: ignoring" in out.err and "'Not-A-Lab' is not a valid lab name" in out.err
    assert not (sandbox.run / "keep").exists() and not (sandbox.run / "keep.json").exists()
    assert sorted(p.name for p in etc.iterdir()) == ["l7lab-Bad.node", "l7lab-evil.node", "other"]
    assert (sandbox.outside / "canary.txt").read_text() == "must stay\n" and (sandbox.run / "Not-A-Lab").is_dir()
    assert {k: v for k, v in snapshot(sandbox.root).items() if "netns" not in k and "Not-A-Lab" not in k} == {
        k: v for k, v in sandbox.before.items() if not k.startswith("a/b/run/keep")}


def test_names_read_back_from_the_machine_are_checked(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (sandbox.run / "UPPER.json").write_text("{}")
    monkeypatch.setattr(labmod.topology, "list_netns",
                        lambda prefix="": [n for n in ("l7lab-ok.node", "l7lab-..x.node", "l7lab-noname")
                                           if n.startswith(prefix)])
    assert labmod.running_labs() == ["keep", "ok"]
    err = capsys.readouterr().err
    assert "'UPPER' is not a valid lab name" in err and "'l7lab-..x.node'" in err and "'l7lab-noname'" in err


# --- status -----------------------------------------------------------------------------------


def test_status_of_a_lab_that_does_not_exist_says_so(sandbox: Sandbox) -> None:
    out = sandbox.l7lab("status", "nolab")
    assert out.returncode == 1 and "error: no lab named 'nolab' is up" in out.stderr, out.stderr
    assert "leftover" not in out.stdout + out.stderr
    # A real leftover (something of the lab, no record) is still reported as one.
    lab = unique_lab("n")
    (sandbox.run / lab).mkdir()
    out = sandbox.l7lab("status", "--lab", lab, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["status"].startswith("leftover (no record")
    out = sandbox.l7lab("status", "keep", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["status"] == "up", out.stderr


def test_observe_takes_the_lab_as_argument_or_option(sandbox: Sandbox) -> None:
    for argv in (["observe", "nolab"], ["observe", "--lab", "nolab"]):
        out = sandbox.l7lab(*argv)
        assert out.returncode == 1 and "no lab named 'nolab' is up" in out.stderr, out.stderr
    out = sandbox.l7lab("observe", "keep", "--lab", "nolab")
    assert out.returncode == 2 and "the lab is given twice" in out.stderr
    out = sandbox.l7lab("observe", "--lab", "keep", "--json")
    assert out.returncode == 0, out.stderr
