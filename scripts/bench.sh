#!/usr/bin/env bash
# Set up (idempotent) and run the benchmarks; results are reported as ratios measured side by
# side in one run. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest benchmarks -p no:cacheprovider -s "$@"
