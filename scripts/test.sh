#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite: unit tests and, as root, kernel tests
# with real namespaces, programs and traffic. Extra arguments go to pytest.
#   scripts/test.sh [-k EXPR] ...      (as root)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh" --test
cd "$here"
# Two processes (pytest-xdist): the kernel tier on one, in order; the unit tier and the
# walkthrough checks on the other (tests/conftest.py groups them). `-n 0` runs everything in one.
exec "$here/.venv/bin/python" -m pytest tests -p no:cacheprovider -n 2 --dist loadgroup "$@"
