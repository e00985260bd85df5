"""The lab's certificate authority: a CA of its own per lab, a server certificate per world host
that serves TLS, and the CA bundle the lab's pods trust.

A lab whose world hosts declare a TLS port (`ports: [{port: 443, tls: true}]`) gets, at `up`:

    <lab dir>/tls/ca.key                 the CA's private key (0600, root; never visible in a pod)
    <lab dir>/tls/ca.crt                 the CA's certificate (self-signed, valid CA_DAYS days)
    <lab dir>/tls/world.<host>.key       a world host's private key (0600, root)
    <lab dir>/tls/world.<host>.crt       its certificate, signed by the CA: subjectAltName = its
                                         DNS names, its aliases and its address

The lab directory is hidden from every process that runs in a pod (dataplane/confine.py): a
world host's server loads its key and certificate as root, before it confines itself. The pods
see the CA through a bundle in their /etc/netns/<netns>/ directory (`write_pod_trust`), which
`ip netns exec` mounts over /etc/ssl for everything the lab starts in the pod and for
`l7lab exec`: the system's CA bundle with the lab's CA appended, at the path OpenSSL, curl and
Python's `ssl.create_default_context()` read on Debian and Ubuntu
(/etc/ssl/certs/ca-certificates.crt).

Everything lives under directories the lab records before creating them (its lab directory, the
namespaces' /etc/netns entries), so `down` and `clean` remove it, after a crash too. Keys are
ECDSA P-256: fast to make at every `up`, and understood by every TLS client in use.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .scenario import WorldHost

CA_DAYS = 30  # a lab's CA is short-lived: a stolen lab CA is worthless a month later
# Issued a few minutes in the past, so that a clock a little behind in some namespace's process
# (or a client comparing at second granularity) does not see a certificate "not yet valid".
BACKDATE = datetime.timedelta(minutes=5)
TLS_DIR = "tls"
CA_KEY, CA_CERT = "ca.key", "ca.crt"
# Where Debian's and Ubuntu's OpenSSL (and so curl and Python's ssl) look for trusted CAs, and
# the configuration file OpenSSL reads; /etc/ssl is what a pod's bundle replaces.
SYSTEM_SSL_DIR = Path("/etc/ssl")
SYSTEM_BUNDLE = SYSTEM_SSL_DIR / "certs" / "ca-certificates.crt"
BUNDLE_IN_POD = Path("certs") / "ca-certificates.crt"  # relative to /etc/ssl
LAB_CA_IN_POD = Path("certs") / "l7lab-ca.crt"  # the lab's CA alone (curl --cacert, openssl -CAfile)


@dataclass(frozen=True)
class LeafFiles:
    """A world host's certificate and key files."""

    cert: Path
    key: Path


def tls_dir(lab_dir: Path) -> Path:
    return lab_dir / TLS_DIR


def ca_cert_file(lab_dir: Path) -> Path:
    """The lab CA's certificate: what probes verify world hosts' servers against."""
    return tls_dir(lab_dir) / CA_CERT


def ca_key_file(lab_dir: Path) -> Path:
    return tls_dir(lab_dir) / CA_KEY


def leaf_files(lab_dir: Path, host: str) -> LeafFiles:
    """The files of world host `host` (a scenario-validated DNS label: safe in a file name)."""
    base = tls_dir(lab_dir) / f"world.{host}"
    return LeafFiles(base.with_name(base.name + ".crt"), base.with_name(base.name + ".key"))


def tls_hosts(world: dict[str, WorldHost]) -> list[WorldHost]:
    """The world hosts that serve TLS on some port, in declaration order."""
    return [h for h in world.values() if any(p.tls for p in h.ports)]


def certificate_names(host: WorldHost) -> list[str]:
    """The DNS names a host's certificate carries: its DNS names, then its aliases, lower case,
    without a trailing dot, each once."""
    names: list[str] = []
    for name in (*host.dns_names, *host.aliases):
        name = name.lower().rstrip(".")
        if name not in names:
            names.append(name)
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only, refusing to follow or reuse anything there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(lab: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new CA key and self-signed certificate for lab `lab`, valid `days` days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l7lab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"l7lab {lab} CA")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            # path_length 0: it signs the world hosts' certificates and no other CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(host: WorldHost, ca_key: ec.EllipticCurvePrivateKey,
              ca_cert: x509.Certificate) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server key and certificate for world host `host`, signed by the CA, expiring with it.
    subjectAltName: the host's DNS names and aliases, and its address (a client that connects by
    address and checks it, as curl does for https://203.0.113.10/, verifies too)."""
    names = certificate_names(host)
    if not names:
        raise ValueError(f"world host {host.name!r} has no DNS name for a certificate")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names.append(x509.IPAddress(ipaddress.ip_address(host.address)))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l7lab"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + datetime.timedelta(days=CA_DAYS), _not_after(ca_cert)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    """A certificate's notAfter as an aware datetime (cryptography before 42 gives a naive UTC one)."""
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def create(lab: str, lab_dir: Path, hosts: list[WorldHost]) -> dict[str, LeafFiles]:
    """Make the lab's CA and a certificate for each of `hosts` under `lab_dir` (which the lab
    has recorded and created). Returns host name -> its files. The tls directory must not exist
    yet: a lab never reuses another's keys."""
    directory = tls_dir(lab_dir)
    directory.mkdir(mode=0o700)
    ca_key, ca_cert = make_ca(lab)
    _write_private(ca_key_file(lab_dir), _key_pem(ca_key))
    _write_public(ca_cert_file(lab_dir), ca_cert.public_bytes(serialization.Encoding.PEM))
    out: dict[str, LeafFiles] = {}
    for host in hosts:
        key, cert = make_leaf(host, ca_key, ca_cert)
        files = leaf_files(lab_dir, host.name)
        _write_private(files.key, _key_pem(key))
        _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
        out[host.name] = files
    return out


def write_pod_trust(etc: Path, ca_cert_pem: bytes, system_ssl: Path = SYSTEM_SSL_DIR) -> Path:
    """Write `etc`/ssl (an endpoint's /etc/netns/<netns>/ directory), which `ip netns exec`
    mounts over /etc/ssl: certs/ca-certificates.crt = the system's bundle + the lab's CA,
    certs/l7lab-ca.crt = the lab's CA alone, and a copy of OpenSSL's configuration (the mount
    hides the system's). Returns the bundle's path."""
    ssl_dir = etc / "ssl"
    (ssl_dir / "certs").mkdir(parents=True, exist_ok=True)
    system_bundle = system_ssl / "certs" / "ca-certificates.crt"
    try:
        system = system_bundle.read_bytes()
    except OSError:  # no ca-certificates package: the pods trust the lab's CA only
        system = b""
    if system and not system.endswith(b"\n"):
        system += b"\n"
    bundle = ssl_dir / BUNDLE_IN_POD
    bundle.write_bytes(system + ca_cert_pem)
    (ssl_dir / LAB_CA_IN_POD).write_bytes(ca_cert_pem)
    config = system_ssl / "openssl.cnf"
    if config.is_file():
        shutil.copyfile(config, ssl_dir / "openssl.cnf")
    # Readable by the pods' unprivileged users whatever the umask of whoever brought the lab up.
    for path in (ssl_dir, ssl_dir / "certs"):
        path.chmod(0o755)
    for path in (bundle, ssl_dir / LAB_CA_IN_POD, ssl_dir / "openssl.cnf"):
        if path.exists():
            path.chmod(0o644)
    return bundle
