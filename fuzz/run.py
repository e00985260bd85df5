"""Run one fuzz target under atheris (libFuzzer, coverage-guided).

    python -m fuzz.run TARGET CORPUS_DIR [libFuzzer flags ...]

CORPUS_DIR is filled with the target's seeds first (`fuzz.seeds`) and collects what libFuzzer
finds interesting. The modules a target's bytes go through are instrumented (`INSTRUMENTED`:
the project's own, and dnspython's wire parser for DNS, PyYAML's and jsonschema for YAML), so
coverage guides the mutations through them; the rest is left alone, which keeps start-up short.
Usual flags: `-runs=N`, `-max_total_time=S`, `-timeout=5` (a hang), `-artifact_prefix=DIR/`.

A dictionary of the target's tokens (`fuzz/dicts/TARGET.dict`) is passed when there is one.

A failure of a defect already kept as an xfail regression test (`targets.KnownDefect`) does not
stop the run: it is counted ("fuzz: known defect NAME hit N times", printed at 1, 2, 4, 8, ...
hits) so the run goes on looking for new findings. With FUZZ_STRICT=1 it stops the run like any
other failure.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import atheris

INSTRUMENTED = {
    "http_request": ["proxy.http", "fuzz.targets"],
    "chunked_body": ["proxy.http", "proxy.stream", "fuzz.targets"],
    "dns_query": ["proxy.dns", "proxy.state", "l7.dns", "l7.decide", "dns", "fuzz.targets"],
    "policy_yaml": ["dataplane", "yaml", "jsonschema", "fuzz.targets"],
}


def counting_known_defects(harness: Callable[[bytes], None], known: type[Exception]) -> Callable[[bytes], None]:
    hits: Counter[str] = Counter()

    def one_input(data: bytes) -> None:
        try:
            harness(data)
        except known as exc:
            name = exc.defect  # type: ignore[attr-defined]
            hits[name] += 1
            if hits[name] & (hits[name] - 1) == 0:
                print(f"fuzz: known defect {name} hit {hits[name]} times", file=sys.stderr, flush=True)
    return one_input


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(__doc__)
    target, corpus = argv[1], Path(argv[2])
    if target not in INSTRUMENTED:
        sys.exit(f"unknown target {target!r}: one of {', '.join(INSTRUMENTED)}")
    with atheris.instrument_imports(include=INSTRUMENTED[target]):
        from fuzz import seeds, targets  # noqa: PLC0415 - must be imported under instrumentation
    count = seeds.write_corpus(target, corpus)
    print(f"fuzz: {target}: {count} seeds in {corpus}", file=sys.stderr, flush=True)
    harness = targets.TARGETS[target]
    if os.environ.get("FUZZ_STRICT") != "1":
        harness = counting_known_defects(harness, targets.KnownDefect)
    flags = argv[3:]
    dictionary = Path(__file__).resolve().parent / "dicts" / f"{target}.dict"
    if dictionary.is_file() and not any(f.startswith("-dict=") for f in flags):
        flags.append(f"-dict={dictionary}")
    atheris.Setup([argv[0], *flags, str(corpus)], harness)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
