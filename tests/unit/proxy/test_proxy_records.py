"""The proxy's flow records name the endpoints as the policy in force names them when the record
is made: a relabel (which reaches the proxy as a new snapshot) shows in the next record."""

from __future__ import annotations

from dataplane.flowrecord import FlowType, TracePoint
from dataplane.scenario import Relabel, Step
from proxy.state import Snapshot
from tests.support.loopback import engine, remap


def test_a_relabel_shows_in_the_labels_of_later_records(fresh) -> None:
    relabelled = engine(fresh.backend.port)
    relabelled.apply_step(Step(0, "relabel", relabel=(Relabel("pod", "shop/frontend", {"tier": "web"}, ()),
                                                       Relabel("namespace", "shop", {"zone": "a"}, ()))))
    c = fresh.client()
    try:
        assert c.request("GET", "/public/before").status == 200
        fresh.proxy.reload(Snapshot(remap(relabelled.map_state(), relabelled)))
        assert c.request("GET", "/public/after").status == 200  # the same connection, a later request
    finally:
        c.close()
        fresh.proxy.reload(Snapshot(fresh.state))
    before, after = fresh.proxy.events.records
    assert (before.type, before.trace_point, before.http.path) == (FlowType.L7, TracePoint.PROXY, "/public/before")
    assert before.source.labels["app"] == "frontend" and "tier" not in before.source.labels
    assert after.http.path == "/public/after"
    assert after.source.labels["tier"] == "web" and after.source.labels["app"] == "frontend"
    assert after.source.labels["io.cilium.k8s.namespace.labels.zone"] == "a"  # the namespace's labels too
    assert after.destination.labels["io.cilium.k8s.namespace.labels.zone"] == "a"
    assert after.source.identity != before.source.identity  # a new label set, a new identity
