"""Names that reach paths, namespaces and processes, and the one way a lab's files are removed.

l7lab runs as root, so a lab name is never trusted: whatever the user typed, whatever a record
file says and whatever `ip netns list` shows is checked here before it becomes a path or a
namespace name. Every removal goes through `remove_owned`, which refuses anything that is not
one of the lab's own paths:

    RUN_DIR/<lab>, RUN_DIR/<lab>.json, RUN_DIR/<lab>.tmp   (and what lies inside RUN_DIR/<lab>)
    /etc/netns/l7lab-<lab>.*                               (and what lies inside them)

A path is the lab's only when it is spelled without `..`, when no directory on the way to it is
a symbolic link, and when it is not a symbolic link itself (removing a link would be harmless,
but a link where the lab keeps its files means someone else put it there: it is reported, not
touched). `shutil.rmtree` then removes the tree without following links inside it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

from .errors import SetupError

PREFIX = "l7lab-"
LAB_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?")
LAB_NAME_RULE = "1-20 characters a-z, 0-9 and '-', starting and ending with a letter or digit"
# What follows `l7lab-<lab>.` in a namespace name: node, pod.<ns>.<pod>, world.<host>.
_NETNS_REST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
DEFAULT_RUN_DIR = "/run/l7lab"


class UnsafePathError(SetupError):
    """A removal that would reach outside what the lab owns; nothing is removed."""


def is_lab_name(name: object) -> bool:
    return isinstance(name, str) and LAB_NAME_RE.fullmatch(name) is not None


def check_lab_name(name: object, what: str = "lab name") -> str:
    """`name` if it is a valid lab name; a SetupError that says what is expected otherwise."""
    if not is_lab_name(name):
        raise SetupError(f"invalid {what} {name!r}: expected {LAB_NAME_RULE}")
    return name  # type: ignore[return-value]


def lab_prefix(lab: str) -> str:
    return f"{PREFIX}{lab}."


def lab_of_netns(netns: str) -> str | None:
    """The lab a namespace called `l7lab-<lab>.<rest>` belongs to, None when it is not one."""
    if not netns.startswith(PREFIX):
        return None
    lab, dot, rest = netns[len(PREFIX):].partition(".")
    if not dot or not is_lab_name(lab) or not _NETNS_REST_RE.fullmatch(rest):
        return None
    return lab


def check_netns_name(lab: str, netns: object) -> str:
    """A namespace name (from a record or a listing) that belongs to lab `lab`."""
    if not isinstance(netns, str) or lab_of_netns(netns) != lab:
        raise UnsafePathError(f"namespace {netns!r} does not belong to lab {lab!r} "
                              f"(expected {lab_prefix(lab)}<name>)")
    return netns


def check_run_dir(raw: str) -> Path:
    """The run directory (`L7LAB_RUN_DIR`): an absolute, normalized path of a directory of its
    own, with no symbolic link on the way, never `/` or a top-level directory."""
    what = f"L7LAB_RUN_DIR={raw!r}"
    if not raw or not raw.startswith("/"):
        raise SetupError(f"{what}: expected an absolute path, e.g. {DEFAULT_RUN_DIR}")
    if raw.startswith("//") or os.path.normpath(raw) != raw or "\0" in raw:
        raise SetupError(f"{what}: expected a normalized path (no '.', '..', '//' or trailing '/')")
    if len(Path(raw).parts) < 3:
        raise SetupError(f"{what}: expected a directory of l7lab's own below a top-level directory, "
                         f"e.g. {DEFAULT_RUN_DIR}, not '/' or a top-level directory")
    real = os.path.realpath(raw)
    if real != raw:
        raise SetupError(f"{what}: the path goes through a symbolic link (it resolves to {real!r}); "
                         "give the real path")
    try:
        st = os.lstat(raw)
    except FileNotFoundError:
        return Path(raw)
    if not stat.S_ISDIR(st.st_mode):
        raise SetupError(f"{what}: exists and is not a directory")
    return Path(raw)


def _normalized(path: Path) -> str:
    text = str(path)
    if not text.startswith("/") or os.path.normpath(text) != text or text.startswith("//"):
        raise UnsafePathError(f"refusing to remove {text!r}: not an absolute, normalized path")
    return text


def owned_root(path: Path, lab: str, run_dir: Path, netns_etc: Path) -> Path:
    """The path among the lab's own (see the module docstring) that `path` is or lies in;
    UnsafePathError when there is none. Only the spelling is checked here; the lab name is
    checked again, so that no caller can widen what it owns ("..", "/", "" never pass)."""
    if not is_lab_name(lab):
        raise UnsafePathError(f"refusing to remove {path}: {lab!r} is not a lab name")
    text = _normalized(path)
    p = Path(text)
    exact = {run_dir / lab, run_dir / f"{lab}.json", run_dir / f"{lab}.tmp"}
    if p in exact:
        return p
    if p.is_relative_to(run_dir / lab):
        return run_dir / lab
    if p.is_relative_to(netns_etc) and p != netns_etc:
        top = netns_etc / p.relative_to(netns_etc).parts[0]
        if lab_of_netns(top.name) == lab:
            return top
    raise UnsafePathError(f"refusing to remove {text}: lab {lab!r} owns only {run_dir / lab}, "
                          f"{run_dir / lab}.json and {netns_etc / lab_prefix(lab)}*")


def check_owned(path: Path, lab: str, run_dir: Path, netns_etc: Path) -> bool:
    """Raise UnsafePathError unless `path` is the lab's to remove; True when it exists.

    Beyond the spelling: no directory between the lab's root and `path` (nor the root's
    parent) may be a symbolic link, and `path` itself must not be one."""
    root = owned_root(path, lab, run_dir, netns_etc)
    parent = os.path.dirname(str(path))
    if os.path.realpath(parent) != parent or os.path.realpath(root.parent) != str(root.parent):
        raise UnsafePathError(f"refusing to remove {path}: a directory on its path is a symbolic link "
                              f"(it resolves to {os.path.realpath(path)})")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"refusing to remove {path}: it is a symbolic link (to {os.readlink(path)!r}), "
                              "not a file or directory l7lab made; remove it by hand if it is yours")
    return True


def remove_owned(path: Path, lab: str, run_dir: Path, netns_etc: Path) -> bool:
    """Remove `path` (a file, or a directory with everything in it) if it is the lab's own
    (`check_owned`); False when it was not there. Links inside a directory are removed, never
    followed."""
    if not check_owned(path, lab, run_dir, netns_etc):
        return False
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            # rmtree works on file descriptors here (avoids_symlink_attacks): a directory swapped
            # for a link after the check above is refused, not followed.
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SetupError(f"could not remove {path}: {exc.strerror or exc}") from None
    return True
