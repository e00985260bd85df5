"""Kubernetes NetworkPolicy semantics, with expectations written from the Kubernetes docs
(https://kubernetes.io/docs/concepts/services-networking/network-policies/) and the upstream
e2e suite's layout (kubernetes/kubernetes test/e2e/network/netpol: namespaces x,y,z; pods
a,b,c; ports 80/81 TCP/UDP). Expectations are ours, not copied."""

from __future__ import annotations

from tests.support.policy import DENY_ALL_INGRESS_X, engine, matrix, outcome


def test_no_policy_everything_connects():
    eng = engine()
    assert set(matrix(eng).values()) == {"allowed"}
    assert set(matrix(eng, 81, "UDP").values()) == {"allowed"}


def test_default_deny_ingress_isolates_only_the_namespace_and_direction():
    eng = engine(DENY_ALL_INGRESS_X)
    m = matrix(eng)
    for (s, d), got in m.items():
        assert got == ("dropped" if d.startswith("x/") else "allowed"), (s, d)
    # egress from x is not isolated (policyTypes defaults to Ingress only)
    assert outcome(eng, "x/a", "y/b") == "allowed"


def test_default_deny_egress():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-egress, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      policyTypes: [Egress]
    """)
    assert outcome(eng, "x/a", "x/b") == "dropped"
    assert outcome(eng, "x/a", "y/a", 81, "UDP") == "dropped"
    assert outcome(eng, "x/b", "x/a") == "allowed"  # ingress of a is not isolated


def test_allow_all_ingress_empty_rule():
    # ingress: [{}] in a NetworkPolicy allows everything (unlike Cilium's, see the Cilium suite)
    eng = engine(DENY_ALL_INGRESS_X + """  ingress: [{}]
""")
    assert set(matrix(eng).values()) == {"allowed"}


def test_pod_selector_only_peer_is_same_namespace():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: allow-b, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
        - from: [{podSelector: {matchLabels: {pod: b}}}]
    """)
    assert outcome(eng, "x/b", "x/a") == "allowed"
    assert outcome(eng, "y/b", "x/a") == "dropped"
    assert outcome(eng, "x/c", "x/a") == "dropped"


def test_namespace_and_pod_selector_in_one_peer_is_AND():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: and, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
        - from:
            - namespaceSelector: {matchLabels: {ns: y}}
              podSelector: {matchLabels: {pod: b}}
    """)
    assert outcome(eng, "y/b", "x/a") == "allowed"
    assert outcome(eng, "y/c", "x/a") == "dropped"
    assert outcome(eng, "z/b", "x/a") == "dropped"
    assert outcome(eng, "x/b", "x/a") == "dropped"


def test_namespace_and_pod_selector_in_two_peers_is_OR():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: or, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
        - from:
            - namespaceSelector: {matchLabels: {ns: y}}
            - podSelector: {matchLabels: {pod: b}}
    """)
    assert outcome(eng, "y/c", "x/a") == "allowed"  # any pod of y
    assert outcome(eng, "x/b", "x/a") == "allowed"  # b of x (podSelector alone: own namespace)
    assert outcome(eng, "z/b", "x/a") == "dropped"
    assert outcome(eng, "x/c", "x/a") == "dropped"


def test_match_expressions_operators():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: exprs, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
        - from:
            - namespaceSelector:
                matchExpressions:
                  - {key: ns, operator: NotIn, values: [y]}
                  - {key: ns, operator: Exists}
              podSelector:
                matchExpressions:
                  - {key: pod, operator: In, values: [b, c]}
                  - {key: missing, operator: DoesNotExist}
    """)
    assert outcome(eng, "z/b", "x/a") == "allowed"
    assert outcome(eng, "x/c", "x/a") == "allowed"
    assert outcome(eng, "y/b", "x/a") == "dropped"
    assert outcome(eng, "z/a", "x/a") == "dropped"


def test_kubernetes_metadata_name_namespace_label():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: by-name, namespace: x}
    spec:
      podSelector: {}
      ingress:
        - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]
    """)
    assert outcome(eng, "z/c", "x/a") == "allowed"
    assert outcome(eng, "y/c", "x/a") == "dropped"


def test_ports_numbered_named_and_protocol():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: ports, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
        - ports:
            - port: 80
            - {port: serve-81-udp, protocol: UDP}
    """)
    assert outcome(eng, "y/b", "x/a", 80) == "allowed"
    assert outcome(eng, "y/b", "x/a", 81) == "dropped"
    assert outcome(eng, "y/b", "x/a", 80, "UDP") == "dropped"  # protocol defaults to TCP
    assert outcome(eng, "y/b", "x/a", 81, "UDP") == "allowed"  # named port on the destination


def test_named_port_egress_resolves_on_destination():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: egress-named, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      policyTypes: [Egress]
      egress:
        - to: [{namespaceSelector: {}}]
          ports: [{port: serve-81-tcp}]
    """)
    assert outcome(eng, "x/a", "y/b", 81) == "allowed"
    assert outcome(eng, "x/a", "y/b", 80) == "dropped"


def test_unknown_named_port_allows_nothing():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: nope, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress: [{ports: [{port: no-such-port}]}]
    """)
    assert outcome(eng, "x/b", "x/a", 80) == "dropped"
    assert outcome(eng, "x/b", "x/a", 81) == "dropped"


def test_end_port_range():
    topo = """\
name: ranges
pods:
  - {name: a, labels: {pod: a}, ports: [{port: 80}, {port: 81}, {port: 90}, {port: 91}]}
  - {name: b, labels: {pod: b}}
"""
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: range}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress: [{ports: [{port: 81, endPort: 90}]}]
    """, topology=topo)
    assert outcome(eng, "b", "a", 80) == "dropped"
    assert outcome(eng, "b", "a", 81) == "allowed"
    assert outcome(eng, "b", "a", 90) == "allowed"
    assert outcome(eng, "b", "a", 91) == "dropped"


def test_protocol_only_rule_allows_every_port_of_that_protocol():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: udp-only, namespace: x}
    spec:
      podSelector: {}
      ingress: [{ports: [{protocol: UDP}]}]
    """)
    assert outcome(eng, "y/a", "x/a", 80, "UDP") == "allowed"
    assert outcome(eng, "y/a", "x/a", 81, "UDP") == "allowed"
    assert outcome(eng, "y/a", "x/a", 80, "TCP") == "dropped"


def test_union_of_policies():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: from-y, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: from-z, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81}]}]
    """)
    assert outcome(eng, "y/a", "x/a", 80) == "allowed"
    assert outcome(eng, "y/a", "x/a", 81) == "dropped"
    assert outcome(eng, "z/a", "x/a", 81) == "allowed"
    assert outcome(eng, "z/a", "x/a", 80) == "dropped"


def test_both_directions_must_allow():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: egress-a, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      policyTypes: [Egress]
      egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-b, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: b}}
    """)
    assert outcome(eng, "x/a", "x/b") == "dropped"  # egress allows, b's ingress does not
    assert outcome(eng, "x/a", "x/c") == "dropped"  # egress does not allow
    assert outcome(eng, "x/c", "x/a") == "allowed"


def test_policy_types_default_adds_egress_when_egress_rules_present():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: both, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]
    """)
    assert outcome(eng, "x/a", "x/b") == "allowed"
    assert outcome(eng, "x/a", "x/c") == "dropped"
    assert outcome(eng, "x/c", "x/a") == "dropped"  # Ingress is always in the defaulted types


def test_explicit_policy_types_ignores_other_direction_rules():
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: egress-only, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      policyTypes: [Egress]
      ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
      egress: [{}]
    """)
    assert outcome(eng, "x/c", "x/a") == "allowed"  # ingress not isolated
    assert outcome(eng, "x/a", "y/c") == "allowed"


def test_ip_block_with_except_selects_world_not_pods():
    topo = """\
name: ipblock
pods:
  - {name: a, labels: {pod: a}, ports: [{port: 80}]}
  - {name: b, labels: {pod: b}}
world:
  - {name: w1, address: 203.0.113.10, ports: [{port: 80}]}
  - {name: w2, address: 203.0.113.130, ports: [{port: 80}]}
  - {name: w3, address: 198.51.100.7, ports: [{port: 80}]}
"""
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: egress-cidr}
    spec:
      podSelector: {matchLabels: {pod: a}}
      policyTypes: [Egress]
      egress:
        - to: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]
        - to: [{ipBlock: {cidr: 10.0.0.0/8}}]
    """, topology=topo)
    assert outcome(eng, "a", "w1") == "allowed"
    assert outcome(eng, "a", "w2") == "dropped"  # in the except
    assert outcome(eng, "a", "w3") == "dropped"
    assert outcome(eng, "a", "b") == "dropped"  # 10.0.0.0/8 contains the pod, but CIDRs never select pods
    assert outcome(eng, "w1", "a") == "allowed"  # ingress of a is not isolated


def test_policy_update_replaces_old_version_and_relabel_reresolves():
    extra = """\
steps:
  - name: replace
    apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]
  - name: relabel
    relabel:
      - {pod: x/b, set: {pod: c}}
  - name: relabel ns
    relabel:
      - {namespace: y, set: {ns: x}}
  - name: delete
    delete:
      - {kind: NetworkPolicy, name: allow, namespace: x}
"""
    eng = engine("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: allow, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
    """, extra=extra)
    assert outcome(eng, "x/b", "x/a") == "allowed"
    steps = eng.scenario.steps
    eng.apply_step(steps[0])
    assert outcome(eng, "x/b", "x/a") == "dropped"
    assert outcome(eng, "x/c", "x/a") == "allowed"
    eng.apply_step(steps[1])
    assert outcome(eng, "x/b", "x/a") == "allowed"  # b now carries pod=c
    eng.apply_step(steps[2])
    assert outcome(eng, "y/c", "x/a") == "dropped"  # podSelector alone stays in namespace x
    eng.apply_step(steps[3])
    assert outcome(eng, "y/c", "x/a") == "allowed"  # no policy left


def test_enforcement_modes():
    always = engine(settings="policyEnforcement: always\n")
    assert set(matrix(always).values()) == {"dropped"}
    never = engine(DENY_ALL_INGRESS_X, settings="policyEnforcement: never\n")
    assert set(matrix(never).values()) == {"allowed"}


def test_audit_mode_passes_would_be_drops():
    eng = engine(DENY_ALL_INGRESS_X, settings="audit: true\n")
    d = eng.verdict(__import__("dataplane.policy", fromlist=["Flow"]).Flow("y/a", eng.scenario.pods["x/a"].ip, "TCP", 80))
    assert d.outcome == "allowed" and d.audited
    assert all(ep.audit for ep in eng.map_state().endpoints.values())


def test_host_reaches_pods_by_allow_localhost():
    eng = engine(DENY_ALL_INGRESS_X)
    assert outcome(eng, "host", "x/a") == "allowed"
    assert outcome(eng, "y/a", "x/a") == "dropped"


def test_port_not_declared_is_refused():
    eng = engine()
    assert outcome(eng, "x/a", "x/b", 8080) == "refused"


def test_a_pod_always_reaches_itself():
    # Traffic to a pod's own address never leaves its namespace, so no policy applies to it
    # (upstream netpol e2e: "loopback logic follows no policy").
    eng = engine("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
        """)
    assert outcome(eng, "x/a", "x/a") == "allowed"
    assert outcome(eng, "x/a", "x/b") == "dropped"
