#!/usr/bin/env bash
# Run Debian's Prometheus on loopback, scraping a running lab's metrics every 5 s, for a Grafana
# to draw dashboards/l7.json from (any user may run it; the lab itself is root's):
#
#   l7lab up scenarios/retail.yaml --metrics 127.0.0.1:9464
#   scripts/prometheus.sh 127.0.0.1:9464 [PROMETHEUS_PORT]
#
# The configuration and the data live in a temporary directory, removed when Prometheus stops
# (Ctrl-C). Prometheus listens on 127.0.0.1:PROMETHEUS_PORT (9090 unless given); point Grafana's
# Prometheus data source at the URL printed below and import dashboards/l7.json (docs/metrics.md).
set -euo pipefail

usage() { echo "usage: $0 LAB_METRICS_ADDRESS [PROMETHEUS_PORT]   e.g. $0 127.0.0.1:9464" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
target=$1
port=${2:-9090}
[[ $target =~ ^(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\]):[0-9]+$ ]] ||
  { echo "$0: LAB_METRICS_ADDRESS must be a loopback HOST:PORT as given to 'l7lab up --metrics', got '$target'" >&2; exit 2; }
[[ $port =~ ^[0-9]{1,5}$ ]] && (( 10#$port >= 1 && 10#$port <= 65535 )) ||
  { echo "$0: PROMETHEUS_PORT must be a port number, got '$port'" >&2; exit 2; }
port=$((10#$port))
prometheus=$(command -v prometheus || true)
[[ -n $prometheus ]] || { echo "$0: prometheus is not installed (Debian: apt-get install prometheus)" >&2; exit 1; }

dir=$(mktemp -d -t l7lab-prometheus.XXXXXX)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/prometheus.yml" <<YAML
global: {scrape_interval: 5s, evaluation_interval: 5s}
scrape_configs:
  - job_name: l7lab
    static_configs: [{targets: ['$target']}]
YAML
echo "Prometheus at http://127.0.0.1:$port (scraping http://$target/metrics; Ctrl-C stops it)"
"$prometheus" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
  --web.listen-address="127.0.0.1:$port" --log.level=warn &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait "$pid"
