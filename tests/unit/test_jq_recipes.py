"""The jq recipes of docs/observe.md work on l7lab's flows as they work on `hubble observe -o
jsonpb`: each runs exactly as the docs write it (jq, sort, uniq: the real tools) over the lines
`observe -o jsonpb` prints for records a real lab wrote (tests/unit/records/, kept from runs of
scenarios/retail.yaml and scenarios/dns-policy.yaml), and prints exactly the output the docs
show. The recipes are written here too, and must be the docs' text: they cannot drift apart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from dataplane.flowrecord import Flow, record_from_json
from dataplane.hubble import hubble_flows, jsonpb, node_name
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


def observe_jsonpb(lab: str) -> str:
    """What `l7lab observe LAB -o jsonpb` prints for the lab's records: every record's Hubble
    flows, in time order, one GetFlowsResponse per line."""
    records = [record_from_json(json.loads(line)) for line in RECORDS[lab].read_text().splitlines()]
    flows = sorted((r for r in records if isinstance(r, Flow)), key=lambda r: r.time)
    return "".join(json.dumps(jsonpb(f), separators=(",", ":")) + "\n"
                   for r in flows for f in hubble_flows(r, node_name(lab)))


def test_the_docs_show_the_recipes_this_test_runs() -> None:
    assert [command for command, _ in documented()] == list(RECIPES)


@pytest.mark.parametrize("index", range(len(RECIPES)))
def test_each_recipe_prints_what_the_docs_show(index: int) -> None:
    assert shutil.which("jq"), "jq is installed by scripts/setup.sh --test"
    command, shown = documented()[index]
    observe, pipeline = command.split(" | ", 1)
    lab = observe.split()[2]
    out = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], input=observe_jsonpb(lab), capture_output=True,
                         text=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == shown
    assert shown  # a recipe that selects nothing proves nothing
