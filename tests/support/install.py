"""A normal (non-editable) install of l7lab, built the way a user's `pip install .` builds it.

`build_wheel` copies the source tree to a scratch directory (a build writes `build/` and
`*.egg-info` next to the sources, which must not land in the checkout) and builds a wheel there
with the test environment's own setuptools, offline. `fresh_venv` makes a venv of the system
Python with `--system-site-packages` (BCC is the distribution's python3-bpfcc) and installs the
wheel into it, not editable and without dependencies; the dependencies come from the test
environment's site-packages, listed in a `.pth` file that sorts after the venv's own
site-packages, so `dataplane`, `proxy` and `l7` are the wheel's and nothing else.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

# What a build never needs: the repository's own state, environments, caches, earlier builds.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist", "__pycache__",
                                      ".pytest_cache", ".benchmarks", "*.pyc")


def build_wheel(scratch: Path) -> Path:
    """A wheel of the repository's current sources, built under `scratch`; its path."""
    src, out = scratch / "src", scratch / "wheels"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCES)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("l7lab-*.whl")
    return wheel


def wheel_files(wheel: Path) -> set[str]:
    """The paths a wheel installs (relative to site-packages)."""
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


@dataclass(frozen=True)
class Venv:
    """A venv with l7lab installed from a wheel."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def l7lab(self) -> Path:
        return self.root / "bin" / "l7lab"

    def env(self) -> dict[str, str]:
        """The environment to run it in: nothing that points back at the checkout."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env


def fresh_venv(where: Path, wheel: Path) -> Venv:
    """A new venv at `where` (system Python, system site-packages) with `wheel` installed."""
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--system-site-packages", "--without-pip", str(where)],
                   check=True, capture_output=True, text=True)
    venv = Venv(where)
    own_site = Path(subprocess.run([str(venv.python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True, env=venv.env()).stdout.strip())
    # The dependencies (pyroute2, aiohttp, ...) as the test environment has them. A path line in a
    # .pth file only extends sys.path: the .pth files over there (the checkout's editable install)
    # are not run, so the checkout stays invisible.
    dependencies = [p for p in site.getsitepackages() if Path(p).resolve() != own_site.resolve()]
    (own_site / "zz-l7lab-test-dependencies.pth").write_text("".join(f"{p}\n" for p in dependencies))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv.python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True, env=venv.env())
    return venv
