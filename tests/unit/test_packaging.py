"""A wheel of l7lab carries everything the package reads at run time: the eBPF C sources the
loader compiles, the scenario schema and the service map's page. (tests/kernel/test_install.py
installs such a wheel into a fresh venv and runs a lab with it.)"""

from __future__ import annotations

from pathlib import Path

from dataplane.bpfsource import BPF_DIR, MAIN_SOURCE
from tests.conftest import REPO
from tests.support.install import build_wheel, wheel_files


def test_bpf_sources_are_package_data_of_dataplane() -> None:
    assert BPF_DIR == REPO / "dataplane" / "bpf"
    assert MAIN_SOURCE.is_file() and (BPF_DIR / "lib" / "drop.h").is_file()
    assert not (REPO / "bpf").exists()


def test_wheel_carries_every_module_the_bpf_sources_and_the_schema(tmp_path: Path) -> None:
    files = wheel_files(build_wheel(tmp_path))
    package = REPO / "dataplane"
    data = {p.relative_to(REPO).as_posix() for p in (*BPF_DIR.rglob("*.[ch]"), *(package / "schema").glob("*.json"),
                                                     *(package / "ui" / "static").iterdir())}
    assert "dataplane/bpf/datapath.c" in data and "dataplane/bpf/lib/policy.h" in data
    assert "dataplane/ui/static/app.js" in data  # the service map's page (l7lab ui)
    assert data - files == set()
    modules = {p.relative_to(REPO).as_posix() for top in ("dataplane", "proxy", "l7") for p in (REPO / top).rglob("*.py")}
    assert {"proxy/server.py", "l7/http.py"} <= modules
    assert modules - files == set()
