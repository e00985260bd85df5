"""The lab's CA (dataplane/labca.py): the CA and the world hosts' certificates (names,
issuer, validity, key files), the bundle the pods trust, a TLS handshake between the world
host's server context and a probe's client context, the names probes send as SNI, and a probe's
HTTPS exchange with the world host's own server on loopback."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import stat
import time
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from dataplane import labca
from dataplane.errors import SourceLocation
from dataplane.podserver import _http_app, tls_context
from dataplane.probes import _tcp_exchange
from dataplane.scenario import Destination, Port, Probe, WorldHost
from tests.support.policy import scenario

WWW = WorldHost("www", "203.0.113.20", ("www.example.com", "WWW.Example.com."), (Port(80), Port(443, tls=True)),
                aliases=("web.example.com",))
PLAIN = WorldHost("plain", "203.0.113.21", ("plain.example.com",), (Port(80),))


def _utc(cert: x509.Certificate, which: str) -> datetime.datetime:
    aware = getattr(cert, f"{which}_utc", None)  # cryptography 42 and later
    return aware if aware is not None else getattr(cert, which).replace(tzinfo=datetime.timezone.utc)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # raises if not
    return cert.issuer == issuer.subject


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, dict[str, labca.LeafFiles]]:
    return tmp_path, labca.create("tls-lab", tmp_path, labca.tls_hosts({"www": WWW, "plain": PLAIN}))


def test_only_hosts_with_a_tls_port_get_a_certificate(made) -> None:  # noqa: ANN001
    lab_dir, files = made
    assert list(files) == ["www"]
    assert sorted(p.name for p in labca.tls_dir(lab_dir).iterdir()) == \
        ["ca.crt", "ca.key", "world.www.crt", "world.www.key"]


def test_the_ca_is_a_short_lived_self_signed_ca_of_this_lab(made) -> None:  # noqa: ANN001
    lab_dir, _ = made
    ca = x509.load_pem_x509_certificate(labca.ca_cert_file(lab_dir).read_bytes())
    assert ca.subject == ca.issuer and _signed_by(ca, ca)
    assert "l7lab tls-lab CA" in ca.subject.rfc4514_string()
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    now = datetime.datetime.now(datetime.timezone.utc)
    assert _utc(ca, "not_valid_before") <= now <= _utc(ca, "not_valid_after")
    assert _utc(ca, "not_valid_after") - now <= datetime.timedelta(days=labca.CA_DAYS)
    assert _utc(ca, "not_valid_after") - now > datetime.timedelta(days=labca.CA_DAYS - 1)


def test_a_leaf_names_the_host_and_is_signed_by_the_ca(made) -> None:  # noqa: ANN001
    lab_dir, files = made
    ca = x509.load_pem_x509_certificate(labca.ca_cert_file(lab_dir).read_bytes())
    leaf = x509.load_pem_x509_certificate(files["www"].cert.read_bytes())
    assert _signed_by(leaf, ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # DNS names and aliases, lower case, without the trailing dot, each once; and the address.
    assert san.get_values_for_type(x509.DNSName) == ["www.example.com", "web.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("203.0.113.20")]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert _utc(ca, "not_valid_before") <= _utc(leaf, "not_valid_before")
    assert _utc(leaf, "not_valid_after") <= _utc(ca, "not_valid_after")


def test_key_files_are_the_owners_alone(made) -> None:  # noqa: ANN001
    lab_dir, files = made
    assert stat.S_IMODE(labca.tls_dir(lab_dir).stat().st_mode) == 0o700
    for key in (labca.ca_key_file(lab_dir), files["www"].key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (labca.ca_cert_file(lab_dir), files["www"].cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert


def test_a_lab_never_reuses_a_tls_directory(made) -> None:  # noqa: ANN001
    lab_dir, _ = made
    with pytest.raises(FileExistsError):
        labca.create("tls-lab", lab_dir, [WWW])


def test_a_host_without_dns_names_gets_no_certificate() -> None:
    key, ca = labca.make_ca("x")
    with pytest.raises(ValueError, match="no DNS name"):
        labca.make_leaf(WorldHost("bare", "203.0.113.9"), key, ca)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> ssl.SSLObject:
    """A TLS handshake in memory; returns the client's side once it completed."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for side, obj, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return c
    raise AssertionError("the handshake did not complete")


def _client(lab_dir: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(labca.ca_cert_file(lab_dir)))
    context.set_alpn_protocols(["http/1.1"])
    return context


@pytest.mark.parametrize("name", ["www.example.com", "web.example.com"])
def test_a_client_trusting_the_lab_ca_verifies_the_server(made, name: str) -> None:  # noqa: ANN001
    lab_dir, files = made
    session = _handshake(tls_context(str(files["www"].cert), str(files["www"].key)), _client(lab_dir), name)
    assert session.version() in ("TLSv1.2", "TLSv1.3")
    assert session.selected_alpn_protocol() == "http/1.1"


def test_a_name_the_certificate_does_not_carry_fails_verification(made) -> None:  # noqa: ANN001
    lab_dir, files = made
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _handshake(tls_context(str(files["www"].cert), str(files["www"].key)), _client(lab_dir), "www.example.org")


def test_another_labs_ca_does_not_verify(made, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: ANN001
    _, files = made
    other = tmp_path_factory.mktemp("other")
    labca.create("other-lab", other, [WWW])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_context(str(files["www"].cert), str(files["www"].key)), _client(other), "www.example.com")


def test_the_servers_context_takes_tls_1_2_and_later(made) -> None:  # noqa: ANN001
    _, files = made
    assert tls_context(str(files["www"].cert), str(files["www"].key)).minimum_version == ssl.TLSVersion.TLSv1_2


def test_the_pods_bundle_is_the_system_bundle_and_the_lab_ca(tmp_path: Path) -> None:
    system = tmp_path / "system-ssl"
    (system / "certs").mkdir(parents=True)
    (system / "certs" / "ca-certificates.crt").write_bytes(b"-----SYSTEM-----")
    (system / "openssl.cnf").write_text("# config\n")
    etc = tmp_path / "etc-netns-pod"
    etc.mkdir()
    bundle = labca.write_pod_trust(etc, b"-----LAB CA-----\n", system)
    assert bundle == etc / "ssl" / "certs" / "ca-certificates.crt"
    assert bundle.read_bytes() == b"-----SYSTEM-----\n-----LAB CA-----\n"
    assert (etc / "ssl" / "certs" / "l7lab-ca.crt").read_bytes() == b"-----LAB CA-----\n"
    assert (etc / "ssl" / "openssl.cnf").read_text() == "# config\n"
    for path in (bundle, etc / "ssl" / "certs" / "l7lab-ca.crt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_without_a_system_bundle_the_pods_trust_the_lab_ca_alone(tmp_path: Path) -> None:
    bundle = labca.write_pod_trust(tmp_path, b"-----LAB CA-----\n", tmp_path / "nothing")
    assert bundle.read_bytes() == b"-----LAB CA-----\n"


TLS_TOPOLOGY = """\
name: tls
pods:
  - {name: client, labels: {app: client}}
  - {name: coredns, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}]}
world:
  - {name: www, address: 203.0.113.20, dnsNames: [www.example.com, WWW2.example.com], aliases: [web.example.com],
     ports: [{port: 80}, {port: 443, tls: true}]}
"""


def test_probes_to_a_tls_port_carry_the_name_they_send_as_sni() -> None:
    sc = scenario(TLS_TOPOLOGY, extra="""
        steps:
          - probes:
              - {from: client, to: www.example.com:443, expect: allowed}
              - {from: client, to: WWW2.example.com:443, expect: allowed}
              - {from: client, to: www:443, expect: allowed}
              - {from: client, to: www.example.com:80, expect: allowed}
              - {from: client, to: www, expect: allowed}
        """)
    names = [p.destination.tls_name for p in sc.steps[0].probes]
    # the name the probe used, else the host's first DNS name; plain ports none
    assert names == ["www.example.com", "www2.example.com", "www.example.com", "", ""]


async def _exchange_with_lab_server(made, tls_name: str, server_tls: bool = True):  # noqa: ANN001, ANN202
    """A probe's TLS exchange (probes._tcp_exchange) with the world host's own HTTP app served
    on loopback with its certificate (or without TLS); returns the observation."""
    lab_dir, files = made
    runner = web.AppRunner(_http_app({"endpoint": "www"}, None), access_log=None)
    await runner.setup()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    context = tls_context(str(files["www"].cert), str(files["www"].key)) if server_tls else None
    await web.SockSite(runner, listener, ssl_context=context).start()
    port = listener.getsockname()[1]
    probe = Probe("shop/client", Destination("world", "www", "127.0.0.1", port, "www.example.com", tls_name=tls_name),
                  "TCP", "allowed", None, 5.0, SourceLocation("test"))
    client = socket.socket()
    client.setblocking(False)
    try:
        return await _tcp_exchange(probe, client, asyncio.get_running_loop(), time.monotonic(), _client(lab_dir))
    finally:
        client.close()
        await runner.cleanup()


def test_a_tls_probe_is_answered_by_the_world_hosts_server(made) -> None:  # noqa: ANN001
    observed = asyncio.run(_exchange_with_lab_server(made, "www.example.com"))
    assert observed.outcome == "allowed", observed
    assert observed.extra["tls"]["server_name"] == "www.example.com"
    assert observed.extra["tls"]["alpn"] == "http/1.1"
    assert observed.body["headers"]["Host"] == "www.example.com:" + str(observed.body["server_port"])


def test_a_tls_probe_that_cannot_verify_is_an_error_with_the_reason(made) -> None:  # noqa: ANN001
    observed = asyncio.run(_exchange_with_lab_server(made, "www.example.org"))
    assert observed.outcome == "error"
    assert observed.detail.startswith("TLS handshake with www.example.org failed: certificate verify failed: ")
    assert "mismatch" in observed.detail or "match" in observed.detail
    plain = asyncio.run(_exchange_with_lab_server(made, "www.example.com", server_tls=False))
    assert plain.outcome == "error" and plain.detail.startswith("TLS handshake with www.example.com failed: ")
