"""TLS ports of world hosts on real traffic: a world host serves HTTPS with a certificate of the
lab's own CA; a pod's HTTPS probe is allowed under an L3/L4 allow on 443 and dropped without
one, the kernel agreeing with the oracle; inside a pod (the `l7lab exec` path) curl and
Python's default context verify the certificate with no options, because the pod's /etc/ssl is
the system's bundle plus the lab's CA; a name the certificate does not carry fails with the
reason; and `down` and `clean` remove the CA and the pods' bundles.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
from dataclasses import replace

from dataplane import lab as labmod
from dataplane.labca import ca_cert_file, ca_key_file, leaf_files, tls_dir
from dataplane.lab import Lab, lab_dir
from dataplane.logfiles import read_all, request_log
from dataplane.policy import PolicyEngine
from dataplane.probes import run_probe
from tests.conftest import require_kernel, unique_lab
from tests.support.cli_lab import l7lab, leftovers, nothing_left
from tests.support.kernel_lab import DROP_TIMEOUT, PASS_TIMEOUT, KernelLab, cnp
from tests.support.kernel_lab import make_scenario as scenario_from

LAB_PREFIX = "wtls"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)

TOPOLOGY = """\
name: tls
namespaces:
  - {name: kube-system}
  - {name: shop}
pods:
  - {name: client, namespace: shop, labels: {app: client}}
  - {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}]}
world:
  - name: www
    address: 203.0.113.20
    dnsNames: [www.example.com]
    aliases: [web.example.com]
    ports: [{port: 80}, {port: 443, tls: true}]
"""

ALLOW_80 = cnp("web-80", "shop", """
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toCIDR: [203.0.113.20/32]
        toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """)
ALLOW_443 = cnp("web-443", "shop", """
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toFQDNs: [{matchPattern: "*.example.com"}]
        toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    """)

# 443 by address, for the tests that connect without a learner serving (no lookup teaches then).
ALLOW_443_CIDR = cnp("web-443", "shop", """
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toCIDR: [203.0.113.20/32]
        toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    """)

# The client's lookups go to the cluster DNS through the DNS proxy, which teaches toFQDNs.
ALLOW_DNS = cnp("dns", "shop", """
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s:k8s-app: kube-dns}}]
        toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    """)

# Python's default context, as any program in the pod uses it: verifies the server's chain and
# the name sent as SNI (a DNS name or an alias) against the CAs the pod trusts, and prints what
# it saw.
VERIFY = ("import socket, ssl; "
          "c = ssl.create_default_context(); "
          "s = c.wrap_socket(socket.create_connection(('www.example.com', 443), timeout=10), server_hostname='{name}'); "
          "print(s.version(), dict(x[0] for x in s.getpeercert()['subject'])['commonName'])")


def make_scenario(policies: str = ""):  # noqa: ANN201 - a Scenario
    """The lab with `policies` and the client's DNS allowed (ALLOW_DNS) whenever its egress is
    locked down: its probe by DNS name looks the name up first."""
    if policies:
        policies = ALLOW_DNS + "---\n" + policies
    return scenario_from(policies, topology_text=TOPOLOGY, steps="""
        steps:
          - probes:
              - {from: client, to: www.example.com:443, expect: allowed}
              - {from: client, to: www:443, expect: allowed}
              - {from: client, to: www:80, expect: allowed}
        """)


def _probes(klab: KernelLab, https: str):  # noqa: ANN202 - Probes
    """The scenario's probes, the HTTPS ones expecting `https` (the plain one on 80 `allowed`),
    each with the timeout its expectation calls for."""
    out = []
    for p in klab.scenario.steps[0].probes:
        expect = https if p.destination.tls_name else "allowed"
        out.append(replace(p, expect=expect, timeout=PASS_TIMEOUT if expect == "allowed" else DROP_TIMEOUT))
    return out


def test_an_https_probe_is_allowed_by_an_allow_on_443_and_dropped_without(klab: KernelLab) -> None:
    engine = PolicyEngine(make_scenario(ALLOW_80 + "---\n" + ALLOW_443))
    klab.switch(engine)
    # toFQDNs allows the address once a lookup taught it: the probe by name first, on its own (the
    # probes of one run go at once, and the one by address would race the lookup).
    first = klab.run(_probes(klab, "allowed")[:1])
    assert not first.disagreements() and first.results[0].observed.outcome == "allowed", first.results
    out = klab.run(_probes(klab, "allowed"))
    assert not out.disagreements(), out.disagreements()
    assert [r.observed.outcome for r in out.results] == ["allowed"] * 3
    https = out.results[0].observed
    assert https.extra["tls"]["server_name"] == "www.example.com" and https.extra["tls"]["alpn"] == "http/1.1"
    assert out.results[1].observed.extra["tls"]["server_name"] == "www.example.com"  # by host name: its first DNS name
    assert "tls" not in out.results[2].observed.extra
    # The world host's own server answered over TLS on 443, and logged it.
    ns = klab.netns("www").removeprefix(labmod.lab_prefix(klab.lab.name))
    client = klab.lab.record.endpoints["shop/client"].ip
    seen = {(r["client"], r["server_port"]) for r in read_all(request_log(lab_dir(klab.lab.name), ns)) if "server_port" in r}
    assert (f"{client}:{https.extra['sport']}", 443) in seen

    engine = PolicyEngine(make_scenario(ALLOW_80))  # egress on 80 only: 443 is dropped
    klab.switch(engine)
    out = klab.run(_probes(klab, "dropped"))
    assert not out.disagreements(), out.disagreements()
    assert [r.observed.outcome for r in out.results] == ["dropped", "dropped", "allowed"]
    assert [r.kernel_verdict for r in out.results[:2]] == ["DROP", "DROP"]


def test_a_name_the_certificate_does_not_carry_is_an_error_with_the_reason(klab: KernelLab) -> None:
    klab.switch(PolicyEngine(make_scenario(ALLOW_443_CIDR)))
    probe = klab.scenario.steps[0].probes[0]
    wrong = replace(probe, destination=replace(probe.destination, tls_name="www.example.org"), timeout=PASS_TIMEOUT)
    observed = asyncio.run(run_probe(wrong, klab.netns("shop/client")))
    assert observed.outcome == "error", observed
    assert "TLS handshake with www.example.org failed: certificate verify failed" in observed.detail


def test_the_certificate_verifies_inside_the_pod(klab: KernelLab) -> None:
    """The exec path: as an unprivileged user, with the lab's directory hidden, in the pod."""
    klab.switch(PolicyEngine(make_scenario(ALLOW_443_CIDR)))
    name = klab.lab.name
    for host in ("www.example.com", "web.example.com"):
        out = l7lab("exec", "--lab", name, "--user", "nobody", "client", "--", "python3", "-c", VERIFY.format(name=host))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[1] == "www.example.com", out.stdout  # the host's certificate
    # The bundle is the system's plus the lab's CA; the CA's key is not reachable from the pod.
    ca = ca_cert_file(lab_dir(name)).read_text()
    bundle = l7lab("exec", "--lab", name, "--user", "nobody", "client", "--", "cat", "/etc/ssl/certs/ca-certificates.crt")
    assert bundle.returncode == 0 and bundle.stdout.endswith(ca), bundle.stderr
    hidden = l7lab("exec", "--lab", name, "--user", "nobody", "client", "--", "cat", str(ca_key_file(lab_dir(name))))
    assert hidden.returncode != 0
    if shutil.which("curl"):
        out = l7lab("exec", "--lab", name, "--user", "nobody", "client", "--", "curl", "-sS", "-m", "10",
                    "https://www.example.com/tls")
        assert out.returncode == 0, out.stderr
        assert '"endpoint": "www"' in out.stdout and '"path": "/tls"' in out.stdout


def test_down_and_clean_remove_the_ca_and_the_bundles() -> None:
    """A lab's CA files and its pods' bundles go with the lab: by `down` from the record, and by
    `clean` when the record is gone (a crash)."""
    require_kernel()
    for verb in ("down", "clean"):
        name = unique_lab("wtls")
        lab = Lab(make_scenario().with_name(name), name)
        try:
            lab.up()
            tls = tls_dir(lab_dir(name))
            assert stat.S_IMODE(ca_key_file(lab_dir(name)).stat().st_mode) == 0o600
            assert stat.S_IMODE(leaf_files(lab_dir(name), "www").key.stat().st_mode) == 0o600
            bundle = labmod.NETNS_ETC / labmod.pod_netns(name, "shop/client") / "ssl" / "certs" / "ca-certificates.crt"
            assert bundle.is_file()
            if verb == "clean":
                labmod.record_path(name).unlink()  # what a crash may leave: no record to go by
            out = l7lab(verb, name)
            assert out.returncode == 0, out.stderr
            assert not tls.exists() and not bundle.exists()
            assert nothing_left(name), leftovers(name)
        finally:
            labmod.clean(name)
