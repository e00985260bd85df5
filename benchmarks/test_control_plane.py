"""Control plane: how long a lab takes to come up and go down, and how long a policy change
takes to be enforced, as the lab grows.

    lab up / down       Lab.up() and Lab.down() (namespaces, veths, servers, programs, proxy)
                        for 2, 8 and 32 pods, as a ratio to 2 pods
    policy change       apply one CiliumNetworkPolicy to a running lab until the kernel and
                        the proxy both enforce it (resolution, proxy reload with its
                        acknowledgement, map diff), as a ratio to the smallest lab; and the map
                        writes it took

Sizes are measured side by side in one run; each figure is the median of its rounds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from dataplane.lab import Lab
from dataplane.policy import PolicyEngine
from dataplane.scenario import Scenario, parse_scenario
from dataplane.yamlsource import load_documents

PODS = (2, 8, 32)
ROUNDS = 3

CHANGE = """\
name: change
steps:
  - name: protect every pod
    apply:
      - apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: only-clients, namespace: bench}
        spec:
          endpointSelector: {}
          ingress:
            - fromEndpoints: [{matchLabels: {role: client}}]
              toPorts:
                - ports: [{port: "8080", protocol: TCP}]
                  rules:
                    http: [{method: GET, path: "/.*"}]
"""


def scenario(name: str, pods: int) -> Scenario:
    lines = ["name: bench", "namespaces: [{name: bench}]", "pods:"]
    lines += [f"  - {{name: p{i}, namespace: bench, labels: {{role: {'client' if i % 2 else 'server'}}}, "
              f"ports: [{{port: 8080}}]}}" for i in range(pods)]
    (doc,) = load_documents("\n".join(lines) + "\n" + CHANGE.split("\n", 1)[1], "bench.yaml")
    return parse_scenario(doc, Path("bench.yaml")).with_name(name)


@pytest.mark.benchmark(group="control-plane")
def test_lab_lifecycle_and_policy_change(benchmark, datapath) -> None:  # noqa: ANN001
    seconds: dict[tuple[str, int], list[float]] = {}
    writes: dict[int, int] = {}
    for round_ in range(ROUNDS):
        for pods in PODS:
            sc = scenario(f"cp-{pods}-{round_}", pods)
            engine = PolicyEngine(sc)
            lab = Lab(sc, datapath=datapath, policy=engine)
            started = time.perf_counter()
            lab.up()
            try:
                seconds.setdefault(("up", pods), []).append(time.perf_counter() - started)
                started = time.perf_counter()
                engine.apply_step(sc.steps[0])
                stats = lab.sync_policy(engine.map_state())
                seconds.setdefault(("policy change", pods), []).append(time.perf_counter() - started)
                writes[pods] = stats.total
            finally:
                started = time.perf_counter()
                lab.down()
                seconds.setdefault(("down", pods), []).append(time.perf_counter() - started)
    benchmark.pedantic(lambda: None, rounds=1)  # the figures above are the measurement
    table: dict[str, float] = {}
    print("\ncontrol plane, median seconds and ratio to the smallest lab:")
    for what in ("up", "policy change", "down"):
        base = statistics.median(seconds[(what, PODS[0])])
        for pods in PODS:
            median = statistics.median(seconds[(what, pods)])
            table[f"{what}@{pods}"] = round(median / base, 2)
            extra = f"  ({writes[pods]} map writes)" if what == "policy change" else ""
            print(f"  {what:>13} {pods:>3} pods {median:8.3f} s  {median / base:5.2f}x{extra}")
    benchmark.extra_info["ratio_to_smallest"] = table
