"""Seed corpora, built from what the project already tests, and the kept findings.

* http_request: every raw request of the smuggling corpus (`tests/support/attacks.py`, sent to the
  proxy by `tests/unit/proxy/test_proxy_smuggling.py` and through the kernel redirect by
  `tests/kernel/test_l7_attack_corpus.py`) and a few well-formed requests of each target form;
* chunked_body: the bodies of that corpus' chunked requests and hand-made chunk forms
  (extensions, quoted strings, trailers, long lines), each behind a read-size byte;
* dns_query: queries built with dnspython (allowed, refused, several questions, other opcodes,
  EDNS, a response) and a few non-DNS datagrams;
* policy_yaml: every scenario and policy file under `scenarios/`.

Findings kept as regression inputs live in `tests/unit/fuzz_corpus/<target>/` (replayed by the
short run in CI); `seed_inputs` includes them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import dns.message
import dns.opcode
import dns.rdatatype

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "tests" / "unit" / "fuzz_corpus"


def _http() -> list[bytes]:
    from tests.support.attacks import CORPUS  # noqa: PLC0415 - test data, loaded on demand

    seeds = [raw for raw, _status in CORPUS.values()]
    h = b"Host: backend\r\n"
    seeds += [
        b"GET /public/a/../b?x=1 HTTP/1.1\r\n" + h + b"\r\n",
        b"GET http://backend/public/%7Ex HTTP/1.1\r\n" + h + b"Accept: */*\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\n" + h + b"\r\n",
        b"CONNECT backend:443 HTTP/1.1\r\n" + h + b"\r\n",
        b"POST /upload HTTP/1.1\r\n" + h + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
        b"PUT /upload HTTP/1.0\r\n" + h + b"Content-Length: 5\r\nConnection: keep-alive\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n" + h + b"Connection: Upgrade\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n\r\n",
        b"GET /public HTTP/1.1\r\n" + h + b"Connection: x-drop\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\n",
        b"/public/%2e%2e/./a//b/..;x/%41%2f",
    ]
    return seeds


def _chunked() -> list[bytes]:
    from tests.support.attacks import CORPUS  # noqa: PLC0415

    bodies = []
    for raw, _status in CORPUS.values():
        head, sep, body = raw.partition(b"\r\n\r\n")
        if sep and b"chunked" in head.lower():
            bodies.append(body)
    bodies += [
        b"5\r\nhello\r\n0\r\n\r\n",
        b"3;name=value\r\nabc\r\n0;x\r\nTrailer-A: 1\r\nTrailer-B: two\r\n\r\nGET / HTTP/1.1\r\n",
        b'4;ext="q\\"uoted\\\\"\r\nwxyz\r\n0\r\n\r\n',
        b"4 ;ext=1\r\nwxyz\r\n0\r\n\r\n",
        b"4\t;ext=1\r\nwxyz\r\n0\r\n\r\n",
        b"0000000000000a\r\n0123456789\r\n0\r\n\r\n",
        b"1;" + b"x" * 4000 + b"\r\nA\r\n0\r\n\r\n",
        b"2\r\nab\r\n0\r\n" + b"T: " + b"v" * 4000 + b"\r\n\r\n",
        b"ffffffffffffffff\r\n",
        b"3\r\nabcX\r\n0\r\n\r\n",
        b"3\nabc\n0\n\n",
    ]
    # The first byte picks the read size of the split delivery (see targets.READ_SIZES).
    return [bytes([i % 256]) + body for i, body in enumerate(bodies)]


def _dns() -> list[bytes]:
    seeds = []
    for name, rdtype in (("www.example.com", "A"), ("nothing-here.example.com", "AAAA"),
                         ("www.example.org", "A"), ("api.partner.example.com", "TXT"), (".", "NS"),
                         ("WWW.Example.COM", "MX"), ("a\\.b.example.com", "A")):
        seeds.append(dns.message.make_query(name, rdtype, id=4660).to_wire())
    seeds.append(dns.message.make_query("www.example.com", "A", use_edns=0, want_dnssec=True, id=1).to_wire())
    two = dns.message.make_query("www.example.com", "A", id=2)
    two.question.append(dns.message.make_query("www.example.org", "A").question[0])
    seeds.append(two.to_wire())
    notify = dns.message.make_query("example.com", "SOA", id=3)
    notify.set_opcode(dns.opcode.NOTIFY)
    seeds.append(notify.to_wire())
    seeds.append(dns.message.make_response(dns.message.make_query("www.example.com", "A", id=5)).to_wire())
    seeds += [b"", b"\x00", b"GET / HTTP/1.1\r\n\r\n", b"\x12\x34" + b"\x00" * 10]
    return seeds


def _yaml() -> list[bytes]:
    scenarios = ROOT / "scenarios"
    return [p.read_bytes() for p in sorted(scenarios.glob("*.yaml")) + sorted(scenarios.glob("policies/*.yaml"))]


BUILDERS = {"http_request": _http, "chunked_body": _chunked, "dns_query": _dns, "policy_yaml": _yaml}


def regression_inputs(target: str) -> list[Path]:
    """Inputs fuzzing once found for `target`, kept as regression tests."""
    folder = REGRESSIONS / target
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def seed_inputs(target: str) -> list[bytes]:
    return BUILDERS[target]() + [p.read_bytes() for p in regression_inputs(target)]


def write_corpus(target: str, folder: Path) -> int:
    """Write the seeds of `target` into `folder` (named by content, as libFuzzer does)."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = seed_inputs(target)
    for data in seeds:
        (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(seeds)
