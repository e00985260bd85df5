#!/usr/bin/env bash
# Set up (idempotent) and run the benchmarks; results are reported as ratios measured side by
# side in one run. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
# The references the end-to-end benchmark compares with (not needed by the lab or its tests).
missing=()
for p in haproxy iptables; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  printf '[bench] installing %s (benchmark references)\n' "${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
cd "$here"
exec "$here/.venv/bin/python" -m pytest benchmarks -p no:cacheprovider -s "$@"
