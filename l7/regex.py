"""RE2 regular expressions as Envoy and Cilium's DNS proxy compile them, shared by every protocol.

RE2 (linear time, no backreferences) is what Envoy's `safe_regex` uses, so a pattern the lab
accepts is one Envoy would accept, and no request can make matching slow.
"""

from __future__ import annotations

import functools

import re2

OPTIONS = re2.Options()
OPTIONS.log_errors = False  # errors are reported by the policy parser, with file and line


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str):
    """Compile an RE2 regex as Envoy does; raises ValueError with RE2's explanation."""
    try:
        return re2.compile(pattern, options=OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"invalid RE2 regex {pattern!r}: {detail}") from None
