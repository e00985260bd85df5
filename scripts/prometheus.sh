#!/usr/bin/env bash
# Run Debian's Prometheus on loopback, scraping a running lab's metrics every 5 s, for a Grafana
# to draw dashboards/l7.json from (any user may run it; the lab itself is root's):
#
#   l7lab up scenarios/retail.yaml --metrics 127.0.0.1:9464
#   scripts/prometheus.sh [--listen ADDRESS] 127.0.0.1:9464 [PROMETHEUS_PORT]
#
# The configuration and the data live in a temporary directory, removed when Prometheus stops
# (Ctrl-C). Prometheus listens on 127.0.0.1:PROMETHEUS_PORT (9090 unless given); point Grafana's
# Prometheus data source at the URL printed below and import dashboards/l7.json (docs/metrics.md).
#
# --listen ADDRESS (or L7LAB_PROMETHEUS_LISTEN) makes it listen on another IPv4 address of this
# machine instead of loopback, one address, never all of them. It is for the Vagrant VM under
# VirtualBox, whose forwarded port reaches the guest's NAT address and never its loopback: the
# Vagrantfile sets L7LAB_PROMETHEUS_LISTEN there (docs/vagrant.md, "What is forwarded").
set -euo pipefail

usage() {
  echo "usage: $0 [--listen ADDRESS] LAB_METRICS_ADDRESS [PROMETHEUS_PORT]   e.g. $0 127.0.0.1:9464" >&2
  exit 2
}
listen=${L7LAB_PROMETHEUS_LISTEN:-127.0.0.1}
listen_from="L7LAB_PROMETHEUS_LISTEN"
[[ -n ${L7LAB_PROMETHEUS_LISTEN:-} ]] || listen_from="the default"
case "${1:-}" in
  --listen) [[ $# -ge 2 ]] || usage; listen=$2; listen_from="--listen"; shift 2 ;;
  --listen=*) listen=${1#--listen=}; listen_from="--listen"; shift ;;
esac
[[ $# -ge 1 && $# -le 2 ]] || usage
target=$1
port=${2:-9090}
[[ $target =~ ^(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\]):[0-9]+$ ]] ||
  { echo "$0: LAB_METRICS_ADDRESS must be a loopback HOST:PORT as given to 'l7lab up --metrics', got '$target'" >&2; exit 2; }
[[ $port =~ ^[0-9]{1,5}$ ]] && (( 10#$port >= 1 && 10#$port <= 65535 )) ||
  { echo "$0: PROMETHEUS_PORT must be a port number, got '$port'" >&2; exit 2; }
port=$((10#$port))

# The listen address: one IPv4 address. Loopback (127.0.0.0/8) is always this machine's; any other
# must be assigned to one of its interfaces, so a typo is refused here rather than by a bind error.
bad_listen() { echo "$0: $listen_from: $1, got '$listen'" >&2; exit 2; }
octet='(0|[1-9][0-9]{0,2})'
[[ $listen =~ ^$octet\.$octet\.$octet\.$octet$ ]] ||
  bad_listen "the listen address must be an IPv4 address such as 127.0.0.1"
for part in "${BASH_REMATCH[@]:1}"; do
  (( part <= 255 )) || bad_listen "the listen address must be an IPv4 address such as 127.0.0.1"
done
[[ $listen != 0.0.0.0 ]] || bad_listen "Prometheus listens on one address, never on all of them (0.0.0.0)"
if [[ ! $listen =~ ^127\. ]]; then
  addresses=$(ip -4 -o addr show 2>/dev/null | awk '{print $4}' | cut -d/ -f1 || true)
  grep -qxF "$listen" <<<"$addresses" || bad_listen "the listen address must be an address of this machine (ip -4 addr)"
fi

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
echo "Prometheus at http://$listen:$port (scraping http://$target/metrics; Ctrl-C stops it)"
"$prometheus" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
  --web.listen-address="$listen:$port" --log.level=warn &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait "$pid"
