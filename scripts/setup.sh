#!/usr/bin/env bash
# Set up everything l7lab needs on Debian 12 / Ubuntu 24.04, as root. Idempotent: a second run
# checks, finds everything in place and finishes in seconds.
#
#   1. distribution packages: BCC (python3-bpfcc), kernel headers, iproute2, venv support
#   2. kernel headers for BCC: when the running kernel has no headers package, the
#      distribution's generic headers are linked at /lib/modules/$(uname -r)/{build,source}
#   3. .venv on the system Python with --system-site-packages (so it sees bcc), with l7lab
#      and its test tools installed
#   4. a self-check: BCC compiles and loads a small tc program
#
#   scripts/setup.sh --test   also installs what only the tests use: Prometheus (the metrics and
#                             dashboard tests scrape a lab with it), Chromium and its WebDriver (the
#                             service-map test drives the page headless) and jq (the docs' recipes).
#                             Their services are never started: the tests run them on loopback.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$here/.venv"
say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (from a root shell, or with sudo): BCC, network namespaces and packages need it"
command -v apt-get >/dev/null || die "apt-get not found: l7lab sets itself up on Debian 12 or Ubuntu 24.04"

kernel=$(uname -r)
system_python=/usr/bin/python3

# --- 1. distribution packages -----------------------------------------------------------------
packages=(python3-bpfcc python3-venv python3-pip iproute2 procps iputils-ping curl ca-certificates)
test_services=0
for arg in "$@"; do
  case "$arg" in
    --test) test_services=1 ;;
    *) die "unknown option $arg (expected --test or nothing)" ;;
  esac
done
[ "$test_services" = 1 ] && packages+=(prometheus chromium chromium-driver jq)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

headers_pkg=""
if [ ! -e "/lib/modules/$kernel/build/Makefile" ]; then
  if apt-cache show "linux-headers-$kernel" >/dev/null 2>&1; then
    headers_pkg="linux-headers-$kernel"
  else
    # No headers package for this kernel (a custom build): take the distribution's generic ones.
    . /etc/os-release
    case "${ID:-}" in
      ubuntu) headers_pkg=linux-headers-generic ;;
      *) headers_pkg=linux-headers-amd64 ;;
    esac
    [ "$(uname -m)" = aarch64 ] && [ "${ID:-}" != ubuntu ] && headers_pkg=linux-headers-arm64
  fi
  dpkg-query -W -f='${Status}' "$headers_pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$headers_pkg")
fi

if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed"
  # No package service is started while installing (Debian's prometheus would listen on every
  # interface): policy-rc.d refuses every start, and is removed again unless it was there before.
  policy_rc=/usr/sbin/policy-rc.d
  own_policy_rc=0
  if [ ! -e "$policy_rc" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy_rc" && chmod 755 "$policy_rc" && own_policy_rc=1
  fi
  status=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || status=$?
  [ "$own_policy_rc" = 1 ] && rm -f "$policy_rc"
  [ "$status" = 0 ] || die "apt-get install ${missing[*]} failed"
fi

# --- 2. headers where BCC looks for them --------------------------------------------------------
if [ ! -e "/lib/modules/$kernel/build/Makefile" ]; then
  if [ -d "/usr/src/linux-headers-$kernel" ]; then
    build="/usr/src/linux-headers-$kernel"
  else
    # The newest generic arch headers the distribution installed.
    build=$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 /usr/src/linux-headers-*-generic 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  [ -n "$build" ] && [ -d "$build" ] || die "no kernel headers found under /usr/src for BCC; install the headers for kernel $kernel"
  source_dir="${build%-amd64}-common"; source_dir="${source_dir%-arm64}"
  [ -d "$source_dir" ] || source_dir="$build"
  mkdir -p "/lib/modules/$kernel"
  ln -sfn "$build" "/lib/modules/$kernel/build"
  ln -sfn "$source_dir" "/lib/modules/$kernel/source"
  say "kernel $kernel has no headers package: BCC uses $(basename "$build") (linked at /lib/modules/$kernel/build and source)"
fi

# --- 3. virtualenv ----------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  say "creating $venv (system Python, --system-site-packages for bcc)"
  rm -rf "$venv"
  "$system_python" -m venv --system-site-packages "$venv"
fi
stamp="$venv/.l7lab-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  say "installing l7lab into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e "$here[test]" >&2 || die "pip install failed"
  touch "$stamp"
fi

# --- 4. self-check -------------------------------------------------------------------------------
"$venv/bin/python" -m dataplane.selfcheck || die "self-check failed (see above)"
say "ready: $venv/bin/l7lab"
