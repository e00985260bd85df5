"""scripts/setup.sh's kernel-headers choice, without root or apt: the script, sourced, defines
`headers_package`, `headers_build_dir` and `headers_source_dir` and runs nothing else. Each case
gives an os-release file, a kernel release, a machine, the headers packages apt knows (a stub
`apt-cache` on PATH) and the /usr/src the packages install, and checks the package setup.sh
installs and the directories it links at /lib/modules/KERNEL/{build,source}: Debian 12 and
Ubuntu 24.04, each with a stock kernel (its own headers package) and a custom one (none, so the
distribution's generic headers), on x86_64 and aarch64."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

SETUP = REPO / "scripts" / "setup.sh"

DEBIAN_12 = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
"""
UBUNTU_2404 = """PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=noble
"""

# apt-cache as setup.sh calls it (`apt-cache show NAME`): found when NAME is in the list given.
APT_CACHE = """#!/bin/sh
[ "$1" = show ] || { echo "apt-cache stub: unexpected $*" >&2; exit 2; }
for known in $APT_KNOWS; do
  [ "$known" = "$2" ] && { echo "Package: $2"; exit 0; }
done
echo "E: No packages found" >&2
exit 100
"""
# Should sourcing ever fall through to the script's body, it stops at its first step: "run as root".
ID = "#!/bin/sh\necho 1000\n"
REFUSE = "#!/bin/sh\necho \"$0 must not run in this test\" >&2\nexit 99\n"


@dataclass(frozen=True)
class Case:
    os_release: str
    kernel: str
    machine: str
    apt_knows: tuple[str, ...]
    usr_src: tuple[str, ...]  # the directories under /usr/src once the package is installed
    package: str
    build: str
    source: str


CASES = {
    "debian12 stock kernel": Case(
        DEBIAN_12, "6.1.0-18-amd64", "x86_64",
        ("linux-headers-6.1.0-18-amd64", "linux-headers-amd64"),
        ("linux-headers-6.1.0-18-amd64", "linux-headers-6.1.0-18-common"),
        "linux-headers-6.1.0-18-amd64", "linux-headers-6.1.0-18-amd64", "linux-headers-6.1.0-18-common"),
    "debian12 custom kernel": Case(
        DEBIAN_12, "6.6.7-lab", "x86_64",
        ("linux-headers-amd64", "linux-headers-6.1.0-18-amd64"),
        # an older ABI left over, and the newest that linux-headers-amd64 brought
        ("linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-9-common",
         "linux-headers-6.1.0-18-amd64", "linux-headers-6.1.0-18-common"),
        "linux-headers-amd64", "linux-headers-6.1.0-18-amd64", "linux-headers-6.1.0-18-common"),
    "ubuntu2404 stock kernel": Case(
        UBUNTU_2404, "6.8.0-31-generic", "x86_64",
        ("linux-headers-6.8.0-31-generic", "linux-headers-generic"),
        ("linux-headers-6.8.0-31-generic", "linux-headers-6.8.0-31"),
        "linux-headers-6.8.0-31-generic", "linux-headers-6.8.0-31-generic", "linux-headers-6.8.0-31"),
    "ubuntu2404 custom kernel": Case(
        UBUNTU_2404, "6.9.3-lab", "x86_64",
        ("linux-headers-generic", "linux-headers-6.8.0-45-generic"),
        ("linux-headers-6.8.0-45-generic", "linux-headers-6.8.0-45"),
        "linux-headers-generic", "linux-headers-6.8.0-45-generic", "linux-headers-6.8.0-45"),
    "debian12 arm64 stock kernel": Case(
        DEBIAN_12, "6.1.0-18-arm64", "aarch64",
        ("linux-headers-6.1.0-18-arm64", "linux-headers-arm64"),
        ("linux-headers-6.1.0-18-arm64", "linux-headers-6.1.0-18-common"),
        "linux-headers-6.1.0-18-arm64", "linux-headers-6.1.0-18-arm64", "linux-headers-6.1.0-18-common"),
    "debian12 arm64 custom kernel": Case(
        DEBIAN_12, "6.6.7-lab", "aarch64",
        ("linux-headers-arm64", "linux-headers-6.1.0-18-arm64"),
        ("linux-headers-6.1.0-18-arm64", "linux-headers-6.1.0-18-common"),
        "linux-headers-arm64", "linux-headers-6.1.0-18-arm64", "linux-headers-6.1.0-18-common"),
    "ubuntu2404 arm64 custom kernel": Case(
        UBUNTU_2404, "6.9.3-lab", "aarch64",
        ("linux-headers-generic",),
        ("linux-headers-6.8.0-45-generic", "linux-headers-6.8.0-45"),
        "linux-headers-generic", "linux-headers-6.8.0-45-generic", "linux-headers-6.8.0-45"),
    "debian12 headers without their common half": Case(
        DEBIAN_12, "6.6.7-lab", "x86_64", ("linux-headers-amd64",),
        ("linux-headers-6.1.0-18-amd64",),
        "linux-headers-amd64", "linux-headers-6.1.0-18-amd64", "linux-headers-6.1.0-18-amd64"),
}


def stub_path(tmp_path: Path) -> str:
    """A PATH whose apt-cache is the stub, and whose id, apt-get and dpkg-query could do no harm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"apt-cache": APT_CACHE, "id": ID, "apt-get": REFUSE, "dpkg-query": REFUSE}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def source_and_run(tmp_path: Path, script: str, *args: str, apt_knows: tuple[str, ...] = ()) -> \
        subprocess.CompletedProcess[str]:
    env = {"PATH": stub_path(tmp_path), "APT_KNOWS": " ".join(apt_knows), "LC_ALL": "C"}
    return subprocess.run(["bash", "-c", f'. "$0"; {script}', str(SETUP), *args],
                          capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize("name", CASES)
def test_the_headers_package_and_the_links(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    os_release = tmp_path / "os-release"
    os_release.write_text(case.os_release)
    usr_src = tmp_path / "usr-src"
    for d in case.usr_src:
        (usr_src / d).mkdir(parents=True)
    out = source_and_run(
        tmp_path,
        'package=$(headers_package "$1" "$2" "$3"); build=$(headers_build_dir "$4" "$2"); '
        'echo "$package"; echo "$build"; headers_source_dir "$build"',
        str(os_release), case.kernel, case.machine, str(usr_src), apt_knows=case.apt_knows)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [case.package, str(usr_src / case.build), str(usr_src / case.source)]


def test_sourcing_defines_the_functions_and_runs_nothing(tmp_path: Path) -> None:
    out = source_and_run(tmp_path, 'declare -F headers_package headers_build_dir headers_source_dir; echo sourced')
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["headers_package", "headers_build_dir", "headers_source_dir", "sourced"]
    assert out.stderr == ""


def test_no_headers_under_usr_src_is_no_build_dir(tmp_path: Path) -> None:
    (tmp_path / "usr-src" / "linux-6.1").mkdir(parents=True)
    out = source_and_run(tmp_path, 'headers_build_dir "$1" 6.6.7-lab', str(tmp_path / "usr-src"))
    assert out.returncode == 0 and out.stdout == "", out


@pytest.mark.parametrize("machine", ["riscv64", "armv7l"])
def test_a_machine_without_generic_headers_is_an_error(tmp_path: Path, machine: str) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text(DEBIAN_12)
    out = source_and_run(tmp_path, 'headers_package "$1" 6.6.7-lab "$2"', str(os_release), machine,
                         apt_knows=("linux-headers-amd64",))
    assert out.returncode != 0 and out.stdout == ""
    assert f"no generic kernel headers known for machine {machine}" in out.stderr


def test_an_unreadable_os_release_is_an_error(tmp_path: Path) -> None:
    out = source_and_run(tmp_path, 'headers_package "$1" 6.6.7-lab x86_64', str(tmp_path / "missing"))
    assert out.returncode != 0 and f"cannot read {tmp_path / 'missing'}" in out.stderr


def test_the_script_runs_the_functions_it_defines() -> None:
    """The body calls the functions the tests check, not a copy of the logic of its own."""
    text = SETUP.read_text()
    body = text[text.index("if (return 0 2>/dev/null); then"):]
    assert 'headers_package /etc/os-release "$kernel" "$(uname -m)"' in body
    assert 'headers_build_dir /usr/src "$kernel"' in body
    assert 'headers_source_dir "$build"' in body
    assert "apt-cache" not in body and "/etc/os-release\n" not in body
    assert os.access(SETUP, os.X_OK)
