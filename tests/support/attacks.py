"""Hostile inputs shared by the tests of both tiers and by the fuzzer's seeds.

* `CORPUS`: request-smuggling, framing and path-normalization attacks, each with the proxy's
  expected first answer, written against the rules of `tests.support.loopback.POLICY`
  (GET|HEAD /public(/.*)?, POST|PUT /upload, ...; /private and /admin never allowed). The
  loopback tests (tests/unit/proxy/test_proxy_smuggling.py) and the real-traffic ones
  (tests/kernel/test_l7_attack_corpus.py) send it; `SMUGGLED` follows every case and must be
  denied.
* `ALIAS_BOMB`, `DEEP_FLOW`, `DEEP_BLOCK`: YAML that an unbounded parser would take gigabytes or
  a stack overflow over (tests/unit/test_input_limits.py, tests/kernel/test_bounded_input_apply.py).
"""

from __future__ import annotations

H = "Host: backend\r\n"
SMUGGLED = "GET /private HTTP/1.1\r\nHost: backend\r\n\r\n"


def req(line: str, *headers: str, body: str = "") -> bytes:
    return (line + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n" + body).encode("latin-1")


CORPUS = {
    # --- framing: Content-Length / Transfer-Encoding ambiguity
    "cl+te": (req("POST /upload HTTP/1.1", H[:-2], "Content-Length: 6", "Transfer-Encoding: chunked",
                  body="0\r\n\r\n" + SMUGGLED), 400),
    "te+cl": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked", "Content-Length: 45",
                  body="0\r\n\r\n" + SMUGGLED), 400),
    "te chunked, identity": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked, identity",
                                 body="0\r\n\r\n" + SMUGGLED), 400),
    "te identity": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: identity", body=SMUGGLED), 400),
    "te xchunked": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: xchunked", body=SMUGGLED), 400),
    "te chunked twice": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked, chunked",
                             body="0\r\n\r\n"), 400),
    "te space before colon": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding : chunked",
                                  "Content-Length: 5", body="0\r\n\r\n" + SMUGGLED), 400),
    "te tab value + cl": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding:\tchunked", "Content-Length: 5",
                              body="0\r\n\r\n" + SMUGGLED), 400),
    "te two lines": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked", "Transfer-Encoding: identity",
                         body="0\r\n\r\n" + SMUGGLED), 400),
    "te vertical tab": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding:\x0bchunked", body="0\r\n\r\n"), 400),
    "te on http/1.0": (req("POST /upload HTTP/1.0", H[:-2], "Transfer-Encoding: chunked", body="0\r\n\r\n"), 400),
    "cl duplicate differing": (req("GET /public HTTP/1.1", H[:-2], "Content-Length: 0", "Content-Length: 41",
                                   body=SMUGGLED), 400),
    "cl list": (req("GET /public HTTP/1.1", H[:-2], "Content-Length: 41, 0", body=SMUGGLED), 400),
    "cl plus": (req("GET /public HTTP/1.1", H[:-2], "Content-Length: +41", body=SMUGGLED), 400),
    "cl negative": (req("GET /public HTTP/1.1", H[:-2], "Content-Length: -1", body=SMUGGLED), 400),
    "cl hex": (req("GET /public HTTP/1.1", H[:-2], "Content-Length: 0x29", body=SMUGGLED), 400),
    "cl space inside": (req("GET /public HTTP/1.1", H[:-2], "Content-Length: 4 1", body=SMUGGLED), 400),
    "cl huge": (req("GET /public HTTP/1.1", H[:-2], "Content-Length: 9999999999999999999999"), 400),
    # --- header syntax
    # Connection naming Host would strip the Host the rules judged from what the backend gets.
    "connection names host": (req("GET /public HTTP/1.1", H[:-2], "Connection: host"), 400),
    "connection names host, other case": (req("GET /public HTTP/1.1", H[:-2], "Connection: keep-alive, HOST"), 400),
    "obs-fold": (req("GET /public HTTP/1.1", H[:-2], "X-Foo: a", " Transfer-Encoding: chunked",
                     body="0\r\n\r\n" + SMUGGLED), 400),
    "obs-fold te value": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding:", " chunked",
                              body="0\r\n\r\n" + SMUGGLED), 400),
    "space before colon": (req("GET /public HTTP/1.1", "Host : backend"), 400),
    "bad header name": (req("GET /public HTTP/1.1", H[:-2], "X@Y: 1"), 400),
    "nul in header": (req("GET /public HTTP/1.1", H[:-2], "X-A: a\x00b"), 400),
    "ctl in header": (req("GET /public HTTP/1.1", H[:-2], "X-A: a\x01b"), 400),
    "bare lf": ("GET /private HTTP/1.1\nHost: backend\n\n".encode(), 400),
    "bare lf mixed": ("GET /public HTTP/1.1\r\nHost: backend\nX: y\r\n\r\n".encode(), 400),
    "bare lf hides te": ("POST /upload HTTP/1.1\r\nHost: backend\r\nX: y\nTransfer-Encoding: chunked\r\n"
                         "Content-Length: 3\r\n\r\n0\r\n\r\n".encode(), 400),
    "bare cr": ("GET /public HTTP/1.1\r\nHost: backend\rX: 1\r\n\r\n".encode(), 400),
    "missing host": (req("GET /public HTTP/1.1"), 400),
    "duplicate host": (req("GET /public HTTP/1.1", H[:-2], "Host: evil"), 400),
    "host with space": (req("GET /public HTTP/1.1", "Host: back end"), 400),
    "host with path": (req("GET /public HTTP/1.1", "Host: backend/private"), 400),
    # --- request line
    "http/0.9": (b"GET /private\r\n\r\n", 400),
    "http/1.2": (req("GET /public HTTP/1.2", H[:-2]), 400),
    "http/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "double space": (req("GET  /public HTTP/1.1", H[:-2]), 400),
    "tab separator": (req("GET\t/public HTTP/1.1", H[:-2]), 400),
    "extra token": (req("GET /public HTTP/1.1 x", H[:-2]), 400),
    "nul in path": (req("GET /public\x00/../private HTTP/1.1", H[:-2]), 400),
    "non-ascii path": (req("GET /public/\xff HTTP/1.1", H[:-2]), 400),
    "fragment": (req("GET /public#/../private HTTP/1.1", H[:-2]), 400),
    "lower-case method": (req("get /public HTTP/1.1", H[:-2]), 403),
    # --- path normalization
    "dotdot": (req("GET /public/../private HTTP/1.1", H[:-2]), 403),
    "encoded dotdot": (req("GET /public/%2e%2e/private HTTP/1.1", H[:-2]), 403),
    "encoded dotdot upper": (req("GET /public/%2E%2E/private HTTP/1.1", H[:-2]), 403),
    "half encoded dotdot": (req("GET /public/.%2e/private HTTP/1.1", H[:-2]), 403),
    "dot dotdot": (req("GET /public/./../private HTTP/1.1", H[:-2]), 403),
    "double slash": (req("GET //private HTTP/1.1", H[:-2]), 403),
    "double slash public": (req("GET //public HTTP/1.1", H[:-2]), 200),  # merged into an allowed path
    "dotdot above root": (req("GET /../../public/x HTTP/1.1", H[:-2]), 200),
    "case": (req("GET /PUBLIC HTTP/1.1", H[:-2]), 403),
    "encoded slash": (req("GET /public%2F..%2Fprivate HTTP/1.1", H[:-2]), 400),
    "encoded slash lower": (req("GET /public/..%2fprivate HTTP/1.1", H[:-2]), 400),
    "encoded backslash": (req("GET /public/..%5Cprivate HTTP/1.1", H[:-2]), 400),
    "backslash": (req("GET /public\\..\\private HTTP/1.1", H[:-2]), 400),
    "servlet dotdot param": (req("GET /public/..;/private HTTP/1.1", H[:-2]), 400),
    "bad percent": (req("GET /public/%zz HTTP/1.1", H[:-2]), 400),
    "truncated percent": (req("GET /public/%2 HTTP/1.1", H[:-2]), 400),
    "double encoding kept": (req("GET /public/%252e%252e/private HTTP/1.1", H[:-2]), 200),
    "encoded unreserved": (req("GET /%70ublic HTTP/1.1", H[:-2]), 200),  # %70 = "p": decoded, allowed
    "query dotdot is not a path": (req("GET /public?/../private HTTP/1.1", H[:-2]), 403),
    # --- absolute-form
    "absolute private": (req("GET http://backend/private HTTP/1.1", H[:-2]), 403),
    "absolute dotdot": (req("GET http://backend/public/../private HTTP/1.1", H[:-2]), 403),
    "absolute host mismatch": (req("GET http://evil/public HTTP/1.1", H[:-2]), 400),
    "absolute userinfo": (req("GET http://x@backend/public HTTP/1.1", H[:-2]), 400),
    "absolute https": (req("GET https://backend/public HTTP/1.1", H[:-2]), 400),
    "absolute ok": (req("GET http://backend/public HTTP/1.1", H[:-2]), 200),
    "asterisk not options": (req("GET * HTTP/1.1", H[:-2]), 400),
    "authority-form not connect": (req("GET backend:80 HTTP/1.1", H[:-2]), 400),
    # --- chunked body syntax (allowed POST /upload, then bad chunks hiding a request)
    "chunk size hex prefix": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                  body="0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk size negative": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                body="-1\r\n" + SMUGGLED), 400),
    "chunk size space": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                             body="5 \r\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk size overflow": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                body="10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk size bare lf": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                               body="5\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk data overrun": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                               body="5\r\nhelloXX\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk ext bad": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                          body="5;a b\r\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    "trailer bad": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                        body="0\r\nX : y\r\n\r\n" + SMUGGLED), 400),
    "chunk ext unterminated quote": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                         body='5;a="x\r\nhello\r\n0\r\n\r\n' + SMUGGLED), 400),
    "chunk ext escaped closing quote": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                            body='5;a="x\\"\r\nhello\r\n0\r\n\r\n' + SMUGGLED), 400),
    "chunk ext control in quote": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                       body='5;a="x\x01"\r\nhello\r\n0\r\n\r\n' + SMUGGLED), 400),
    "chunk ext bare lf in quote": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                       body='5;a="x\ny"\r\nhello\r\n0\r\n\r\n' + SMUGGLED), 400),
    "chunk ext trailing space": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                     body="5;a \r\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk ext no name": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                              body="5;=a\r\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk size inner space": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                   body="1 0\r\n" + "x" * 16 + "\r\n0\r\n\r\n" + SMUGGLED), 400),
    "chunk size leading space": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                     body=" 5\r\nhello\r\n0\r\n\r\n" + SMUGGLED), 400),
    # --- well-framed bodies that contain a request: forwarded as data, never as a request
    "request inside cl body": (req("POST /upload HTTP/1.1", H[:-2], f"Content-Length: {len(SMUGGLED)}",
                                   body=SMUGGLED), 200),
    "request inside chunked body": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                        body=f"{len(SMUGGLED):x};ext=1\r\n{SMUGGLED}\r\n0\r\nX-T: 1\r\n\r\n"), 200),
    "chunk ext quoted escapes are fine": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                              body='5;name="a \\"b\\" \\\\ c;d=e"\r\nhello\r\n0\r\n\r\n'), 200),
    "chunk ext whitespace is fine": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: chunked",
                                         body="5 ;a\t=\tb ; c = \"d\"\r\nhello\r\n0\r\n\r\n"), 200),
    "tab before chunked is fine": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding:\tchunked",
                                       body="0\r\n\r\n"), 200),
    "upper-case chunked is fine": (req("POST /upload HTTP/1.1", H[:-2], "Transfer-Encoding: CHUNKED",
                                       body="0\r\n\r\n"), 200),
    # --- sizes
    "long request line": (req("GET /public/" + "a" * 20000 + " HTTP/1.1", H[:-2]), 431),
    "large header block": (req("GET /public HTTP/1.1", H[:-2], *[f"X-{i}: {'v' * 1000}" for i in range(70)]), 431),
    "too many headers": (req("GET /public HTTP/1.1", H[:-2], *[f"X-{i}: v" for i in range(120)]), 431),
}

# Billion laughs: nine levels of nine aliases each, 9**9 strings from under 400 bytes.
ALIAS_BOMB = "".join(
    f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + ",".join([f"*{chr(ord('a') + i - 1)}" if i else '"lol"'] * 9) + "]\n"
    for i in range(9))
DEEP_FLOW = "[" * 100_000 + "]" * 100_000 + "\n"
DEEP_BLOCK = "- " * 100_000 + "x\n"
