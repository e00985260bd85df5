#!/usr/bin/env bash
# Set everything up (idempotent) and run a lab scenario end to end on this kernel.
#   scripts/demo.sh [SCENARIO] [l7lab run options...]      (as root)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
scenario=${1:-$here/scenarios/connectivity.yaml}
shift || true
exec "$here/.venv/bin/l7lab" run "$scenario" "$@"
