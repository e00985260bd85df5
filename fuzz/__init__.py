"""Coverage-guided fuzzing of the parsers that read what a pod or a user sends (not shipped).

`targets` holds one harness per parser with its oracle, `seeds` builds the seed corpora from the
test suites and scenarios, `run` drives a harness with atheris (libFuzzer). `scripts/fuzz.sh`
runs the long campaign; `tests/unit/test_fuzz_short.py` a few seconds of each target in CI.
"""
