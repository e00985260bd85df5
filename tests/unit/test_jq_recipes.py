"""The jq recipes of docs/observe.md work on l7lab's flows as they work on `hubble observe -o
jsonpb`: each runs exactly as the docs write it (jq, sort, uniq: the real tools) over the lines
`l7lab observe LAB -o jsonpb` prints (its reader and printer, over a lab directory holding the
records a real lab wrote: tests/unit/records/, kept from runs of scenarios/retail.yaml and
scenarios/dns-policy.yaml), and prints exactly the output the docs show. The recipes are written
here too, and must be the docs' text: they cannot drift apart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dataplane.cli.observe import Printer
from dataplane.flowrecord import record_from_json, record_type
from dataplane.flows import KERNEL_FLOWS, PROXY_RECORDS
from dataplane.hubbleobserve import Observer, Window
from tests.conftest import REPO

RECORDS = {"shp1": REPO / "tests" / "unit" / "records" / "retail.jsonl",
           "shp2": REPO / "tests" / "unit" / "records" / "dns-policy.jsonl"}

RECIPES = (
    "l7lab observe shp2 -o jsonpb | jq 'select(.flow.l7.dns.rcode==3) | .flow.destination.namespace + \"/\" + "
    ".flow.destination.pod_name' | sort | uniq -c | sort -r",
    "l7lab observe shp1 -o jsonpb | jq -c 'select(.flow.event_type.type == 5 and .flow.verdict == \"DROPPED\") | .flow "
    "| {source: .source.labels, destination: .destination.pod_name, traffic_direction, port: "
    ".l4.TCP.destination_port}'",
    "l7lab observe shp1 -o jsonpb | jq -c 'select(.flow.verdict == \"DROPPED\" or .flow.verdict == \"ERROR\") | .flow "
    "| {time, source: {namespace: .source.namespace, pod_name: .source.pod_name}, destination: {namespace: "
    ".destination.namespace, pod_name: .destination.pod_name}, verdict, drop_reason_desc}'",
)


def documented() -> list[tuple[str, list[str]]]:
    """(command, output lines) of every console block in docs/observe.md's "jq recipes" section."""
    text = (REPO / "docs" / "observe.md").read_text()
    section = text.split("\n## jq recipes", 1)[1].split("\n## ", 1)[0]
    out = []
    for block in re.findall(r"```console\n(.*?)```", section, re.DOTALL):
        first, *rest = block.rstrip("\n").split("\n")
        assert first.startswith("$ "), block
        out.append((first[2:], rest))
    return out


def observe_jsonpb(lab: str, lab_dir: Path) -> str:
    """What `l7lab observe LAB -o jsonpb` prints for a lab whose files hold the kept records:
    the reader and the printer of `observe` over a lab directory of those files."""
    lines = RECORDS[lab].read_text().splitlines()
    kernel = [line for line in lines if record_type(record_from_json(json.loads(line))) != "L7"]
    (lab_dir / KERNEL_FLOWS).write_text("".join(line + "\n" for line in kernel))
    (lab_dir / PROXY_RECORDS).write_text("".join(line + "\n" for line in lines if line not in kernel))
    printer = Printer("jsonpb")
    return "".join(printer.text(event) + "\n" for _, events in Observer(lab_dir, lab, Window()).history()
                   for event in events)


def test_the_docs_show_the_recipes_this_test_runs() -> None:
    assert [command for command, _ in documented()] == list(RECIPES)


@pytest.mark.parametrize("index", range(len(RECIPES)))
def test_each_recipe_prints_what_the_docs_show(index: int, tmp_path: Path) -> None:
    assert shutil.which("jq"), "jq is installed by scripts/setup.sh --test"
    command, shown = documented()[index]
    observe, pipeline = command.split(" | ", 1)
    lab = observe.split()[2]
    out = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], input=observe_jsonpb(lab, tmp_path),
                         capture_output=True, text=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == shown
    assert shown  # a recipe that selects nothing proves nothing
