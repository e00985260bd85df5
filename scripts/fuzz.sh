#!/usr/bin/env bash
# The long fuzzing campaign (not run in CI): each target in turn, coverage-guided by atheris,
# for RUNS inputs (default 1,000,000), a hang being an input that takes over 5 s.
#
#   scripts/fuzz.sh [TARGET ...]        targets: http_request chunked_body dns_query policy_yaml
#
# Environment: RUNS (inputs per target), MAX_SECONDS (stop a target after this long even if it
# has not reached RUNS; the inputs it did execute are reported), FUZZ_WORK (corpora, findings and logs; default
# /tmp/l7lab-fuzz), PYTHON (default .venv/bin/python). Prints one line per target (inputs
# executed, crashes, hangs, seconds, exec/s, coverage, hits of known defects) and writes them to
# $FUZZ_WORK/summary.md. Exits 1 when any target crashed or hung; the inputs are in
# $FUZZ_WORK/findings/. A known defect (one kept as a strict xfail regression test, see
# fuzz/targets.py KNOWN_DEFECTS) is counted, not a crash; FUZZ_STRICT=1 makes it one.
# Needs no root; run it alone on the machine for comparable rates.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
runs=${RUNS:-1000000}
work=${FUZZ_WORK:-/tmp/l7lab-fuzz}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(http_request chunked_body dns_query policy_yaml)

# Longest input per target: past the head, chunk-line and trailer limits that matter for each.
declare -A max_len=([http_request]=65536 [chunked_body]=16384 [dns_query]=1024 [policy_yaml]=16384)

mkdir -p "$work/findings" "$work/logs"
summary="$work/summary.md"
commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "fuzzing campaign, $(date -u +%Y-%m-%dT%H:%MZ), commit $commit, $runs inputs per target${MAX_SECONDS:+ or $MAX_SECONDS s}"
  echo
  echo "| target | inputs | crashes | hangs | seconds | exec/s | coverage (cov / ft) | known defects hit |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
} > "$summary"
status=0
cd "$here"
for t in "${targets[@]}"; do
  [ -n "${max_len[$t]:-}" ] || { echo "unknown target $t" >&2; exit 2; }
  log="$work/logs/$t.log"
  rm -f "$work/findings/$t-"*
  start=$(date +%s)
  set +e
  PYTHONPATH="$here" "$python" -m fuzz.run "$t" "$work/corpus/$t" -runs="$runs" -timeout=5 \
    -rss_limit_mb=2048 -max_len="${max_len[$t]}" -print_final_stats=1 ${MAX_SECONDS:+-max_total_time=$MAX_SECONDS} \
    -artifact_prefix="$work/findings/$t-" </dev/null >"$log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - start ))
  inputs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | sed -E 's/cov: ([0-9]+) ft: ([0-9]+)/\1 \/ \2/')
  crashes=$(find "$work/findings" -name "$t-crash-*" | wc -l)
  hangs=$(find "$work/findings" -name "$t-timeout-*" | wc -l)
  known=$(sed -n 's/^fuzz: known defect \([^ ]*\) hit \([0-9]*\) times$/\1 \2/p' "$log" |
    awk '{n[$1]=$2} END {for (k in n) printf "%s%s at least %s", sep, k, n[k]; sep="; "}')
  ooms=$(find "$work/findings" -name "$t-oom-*" | wc -l)
  crashes=$((crashes + ooms))
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ] && [ "$hangs" -eq 0 ]; then
    crashes=1  # the run stopped on something libFuzzer did not write out: count it, see the log
  fi
  [ "$crashes" -eq 0 ] && [ "$hangs" -eq 0 ] || status=1
  line="| $t | ${inputs:-?} | $crashes | $hangs | $secs | ${rate:-?} | ${cov:-?} | ${known:-none} |"
  echo "$line" >> "$summary"
  echo "fuzz: $line (log $log)"
done
echo "fuzz: summary in $summary"
exit $status
