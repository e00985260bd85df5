#!/usr/bin/env bash
# Set everything up (idempotent), then a first look at a lab on this kernel (as root):
#
#   scripts/demo.sh             the retail scenario end to end: every probe against its
#                               expectation, then the 403 for DELETE /api/inventory/item123 as
#                               its flow record (l7lab observe) and as its trace (l7lab trace);
#                               the lab (named "demo") is taken down at the end
#   scripts/demo.sh --keep      the same, and the lab stays up to explore ('l7lab down demo')
#   scripts/demo.sh SCENARIO [l7lab run options...]     run another scenario end to end
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
l7lab="$here/.venv/bin/l7lab"

keep=false
case "${1:-}" in
  "") ;;
  --keep) keep=true; shift ;;
  -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) exec "$l7lab" run "$@" ;;
esac
[ $# -eq 0 ] || { echo "demo.sh: --keep takes no other argument" >&2; exit 2; }

lab=demo
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }
if [ "$keep" = false ]; then
  # shellcheck disable=SC2317  # called by the trap
  take_down() { "$l7lab" down "$lab" >/dev/null || echo "demo.sh: 'l7lab down $lab' failed" >&2; }
  trap take_down EXIT
fi

cd "$here"
step "1. the retail scenario: real traffic against its expectations (frontend-app may GET the inventory; DELETE gets 403 from the L7 proxy)" \
     "l7lab run scenarios/retail.yaml --name $lab --keep"
status=0
"$l7lab" run scenarios/retail.yaml --name "$lab" --keep || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then exit "$status"; fi  # 3: a probe missed; go on and show why

request='DELETE /api/inventory/item123'
step "2. the DELETE's flow record, as Hubble prints it" \
     "l7lab observe $lab --type l7 --http-method DELETE"
"$l7lab" observe "$lab" --type l7 --http-method DELETE

step "3. the same request traced through the kernel and the proxy, step by step" \
     "l7lab trace $lab --from frontend-app --to inventory-api:8080 --http '$request'"
"$l7lab" trace "$lab" --from frontend-app --to inventory-api:8080 --http "$request"

echo
if [ "$keep" = true ]; then
  echo "lab $lab is up: 'export PATH=\"$here/.venv/bin:\$PATH\"', then 'l7lab status $lab', 'l7lab observe $lab', 'l7lab down $lab'"
else
  echo "next: docs/walkthroughs/ (lessons to type along with), docs/trace.md, docs/exercises.md; 'scripts/demo.sh --keep' leaves the lab up"
fi
exit "$status"
