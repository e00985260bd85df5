"""Confinement of what runs inside a lab's pods: an unprivileged user in a private mount
namespace where the lab's control directory is not visible.

    python -m dataplane.confine --uid UID --gid GID --hide DIR [--hide DIR ...] -- COMMAND [ARGS...]

Run as root, inside the endpoint's network namespace (`ip netns exec NS python -m
dataplane.confine ...`; a server does the same steps in its own process with `confine()`,
after loading its code), it then:

1. enters a new mount namespace and makes every mount in it private first, so that nothing
   mounted here ever propagates back to the host's namespace;
2. mounts an empty, read-only tmpfs over each DIR (the lab's run directory: the agent's control
   socket, the policy files, every lab's records);
3. sets no_new_privs (no setuid binary or file capability can raise the process again), drops
   the supplementary groups and sets the real, effective and saved gid and uid;
4. executes COMMAND (the same process: a recorded pid stays the command's).

The lab's pod and world servers run this way, each as a uid and gid of its own
(`endpoint_user`); `l7lab exec` as the invoking user. A process that stays root (uid 0) could undo the mounts: root in a pod is not
contained, which is why nothing the lab starts in a pod stays root. docs/security.md says
what a pod can and cannot reach.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pwd
import sys
from dataclasses import dataclass

from .errors import L7LabError

POD_ID_BASE = 0x40000000  # servers' uids and gids: 1073741824 + n, far from any account's
_NSFS_FIRST_INODE = 0xF0000000  # the kernel numbers namespaces from here up

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


def resolve_user(spec: str) -> User:
    """A user given by name or number; it must exist in the user database."""
    try:
        entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError, OverflowError):
        raise L7LabError(f"unknown user {spec!r}: expected a user name or uid known to this machine") from None
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def endpoint_user(netns_path: str | os.PathLike[str]) -> User:
    """The uid and gid the server of one pod or world host runs as: its own, so that no other
    pod's process (nor another lab's) can signal or trace it. Derived from the inode of the
    endpoint's network namespace, which is unique among the namespaces alive on the machine;
    no account normally has it."""
    inode = os.stat(netns_path).st_ino
    offset = inode - _NSFS_FIRST_INODE if inode >= _NSFS_FIRST_INODE else inode
    uid = POD_ID_BASE + (offset & 0x0FFFFFFF)
    return User(f"uid {uid}", uid, uid, "/")


def invoking_user() -> User:
    """Who asked: the user behind sudo (SUDO_UID / SUDO_GID) when run through sudo as root,
    else the current user (root stays root when invoked directly as root)."""
    sudo_uid = os.environ.get("SUDO_UID", "")
    if os.geteuid() == 0 and sudo_uid.isdigit():
        user = resolve_user(sudo_uid)
        sudo_gid = os.environ.get("SUDO_GID", "")
        return User(user.name, user.uid, int(sudo_gid) if sudo_gid.isdigit() else user.gid, user.home)
    user = resolve_user(str(os.getuid()))
    return User(user.name, user.uid, os.getgid(), user.home)


def command(user: User, hide: list[str], argv: list[str]) -> list[str]:
    """The command line that runs `argv` confined (to put after `ip netns exec NS`)."""
    hidden = [arg for path in hide for arg in ("--hide", path)]
    return [sys.executable, "-m", "dataplane.confine", "--uid", str(user.uid), "--gid", str(user.gid),
            *hidden, "--", *argv]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def hide(paths: list[str]) -> None:
    """A private mount namespace of our own with an empty read-only tmpfs over each path."""
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Private first: a mount made below must never propagate to the namespace we came from.
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    for path in paths:
        if not os.path.isdir(path):
            continue
        _check(libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                          b"mode=0755,size=4k"), f"hiding {path}")


def drop_privileges(uid: int, gid: int) -> None:
    """no_new_privs, no supplementary groups, then gid and uid (real, effective and saved)."""
    _check(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0 and os.getresuid() != (uid, uid, uid):
        raise OSError(f"could not become uid {uid}")


def confine(uid: int, gid: int, paths: list[str]) -> None:
    """Confine the calling process (started as root) in place: hide `paths`, drop to uid/gid,
    and leave a working directory the hidden paths cannot be reached through. A server calls
    this once its code is loaded, so that neither the code nor Python has to be readable by
    `uid`."""
    hide(paths)
    drop_privileges(uid, gid)
    os.chdir("/")


def _environment(uid: int) -> dict[str, str]:
    env = dict(os.environ)
    if uid != 0:
        for key in ("SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND"):
            env.pop(key, None)
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:  # a server's own uid: no account, no home
        env.update(HOME="/", USER=str(uid), LOGNAME=str(uid))
        return env
    env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplane.confine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--hide", action="append", default=[], metavar="DIR", help="directory to hide")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("no command given")
    if os.geteuid() != 0:
        print("confine: must start as root (it mounts and changes user)", file=sys.stderr)
        return 1
    try:
        hide(args.hide)
        env = _environment(args.uid)
        drop_privileges(args.uid, args.gid)
    except OSError as exc:
        print(f"confine: {exc}", file=sys.stderr)
        return 1
    try:
        os.chdir(os.getcwd())  # still reachable by the new user? else start at /
        os.listdir(".")
    except OSError:
        os.chdir("/")
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        print(f"confine: cannot run {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
