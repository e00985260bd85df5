"""`validate` notes probes of one step that race a lookup: a connection by address to a world
host while another probe of the step looks up, through the DNS proxy, a name that teaches a
toFQDNs selector that address (probes of a step run at once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.support.fqdn import FQDN_LAB
from tests.support.scenario_files import write_scenario

SCENARIO = FQDN_LAB + "    steps:\n"
RACING = """\
      - name: at once
        probes:
          - {from: checkout, to: api.example.com:80, expect: allowed}
          - {from: checkout, to: api:80, expect: dropped}
          - {from: checkout, to: www.example.org:80, expect: dropped}
          - {from: checkout, to: other:80, expect: dropped}
"""
APART = """\
      - name: the lookup
        probes:
          - {from: checkout, to: api.example.com:80, expect: allowed}
      - name: then the address
        probes:
          - {from: checkout, to: api:80, expect: allowed}
"""


def validate(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dataplane.cli", "validate", "--json", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_probe_by_address_beside_the_lookup_that_teaches_it_is_noted(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, SCENARIO + RACING)
    (notice,) = validate(path)["notices"][str(path)]
    # www.example.org is looked up too, but no toFQDNs selector matches it: no race for "other".
    assert notice.startswith("steps[0] (at once): probes[1] connects to 203.0.113.20 (world host api) by address "
                             "while probes[0] looks up api.example.com"), notice
    assert "put them in separate steps" in notice


def test_the_same_probes_in_separate_steps_are_not(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, SCENARIO + APART)
    assert validate(path)["notices"] == {}
