"""A normal `pip install` of l7lab (a wheel, not editable) runs a lab: the installed `l7lab`,
started from a directory outside the checkout, compiles the eBPF programs it carries as
package data, brings a lab up, and every probe of an L7 scenario meets its expectation."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.install import build_wheel, fresh_venv

SCENARIO = "allow-get-products.yaml"


def test_wheel_install_runs_a_scenario_outside_the_checkout(tmp_path: Path) -> None:
    venv = fresh_venv(tmp_path / "venv", build_wheel(tmp_path / "build"))
    workdir = tmp_path / "work"
    scenarios = workdir / "scenarios"
    shutil.copytree(REPO / "scenarios", scenarios)
    # A slow answer on a loaded machine must not pass for a drop.
    data = yaml.safe_load((scenarios / SCENARIO).read_text())
    data.setdefault("settings", {})["probeTimeout"] = 5.0
    (scenarios / SCENARIO).write_text(yaml.safe_dump(data, sort_keys=False))

    where = subprocess.run([str(venv.python), "-c", "import dataplane.bpfsource as b, proxy, l7; "
                            "print(b.MAIN_SOURCE, proxy.__file__, l7.__file__, sep='\\n')"],
                           cwd=workdir, env=venv.env(), capture_output=True, text=True, check=True)
    for path in where.stdout.split():
        assert Path(path).is_relative_to(venv.root), where.stdout
        assert not Path(path).resolve().is_relative_to(REPO.resolve()), where.stdout

    out = subprocess.run([str(venv.l7lab), "run", f"scenarios/{SCENARIO}", "--name", unique_lab("inst"), "--json"],
                         cwd=workdir, env=venv.env(), capture_output=True, text=True, timeout=scaled(300))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["mode"] == "kernel" and report["passed"] and report["failed"] == 0
    assert report["probes"] == sum(len(step.get("probes", ())) for step in data["steps"])
    # The kernel's own verdicts: programs compiled from the installed sources, the proxy in the path.
    assert all(r["kernel"] for r in report["results"])
    assert any(r["kernel"].startswith("REDIRECT") and r["observed"] == "denied" for r in report["results"])
