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
#                             service-map test drives the page headless), jq (the docs' recipes) and
#                             Vagrant (tests/unit/test_vagrantfile.py has it validate the Vagrantfile;
#                             no provider and no box: the VM is never started).
#                             Their services are never started: the tests run them on loopback.
#
# The kernel-headers choice is made by the functions below, which take the os-release file, the
# kernel release, the machine and the /usr/src directory as arguments and ask apt-cache whether a
# package exists: sourced (`. scripts/setup.sh`), this file defines them and does nothing else,
# which is how tests/unit/test_setup_plan.py checks the choice for each distribution and kernel.
set -euo pipefail

# The kernel headers package to install for KERNEL (a `uname -r`) on the distribution that
# OS_RELEASE describes, on MACHINE (a `uname -m`): the kernel's own headers package when the
# distribution has one (its stock kernels), else the distribution's generic headers for the
# architecture (a custom kernel): Ubuntu's linux-headers-generic, Debian's linux-headers-amd64 or
# linux-headers-arm64.
headers_package() {
  local os_release=$1 kernel=$2 machine=$3 id
  if apt-cache show "linux-headers-$kernel" >/dev/null 2>&1; then
    echo "linux-headers-$kernel"
    return
  fi
  [ -r "$os_release" ] || { echo "[setup] error: cannot read $os_release" >&2; return 1; }
  # os-release is shell assignments by its specification; read in a subshell so nothing leaks.
  id=$(. "$os_release" && echo "${ID:-}")
  case "$machine" in
    x86_64|amd64) ;;
    aarch64|arm64) ;;
    *) echo "[setup] error: no generic kernel headers known for machine $machine (x86_64 or aarch64 expected)" >&2; return 1 ;;
  esac
  case "$id:$machine" in
    ubuntu:*) echo linux-headers-generic ;;
    *:aarch64|*:arm64) echo linux-headers-arm64 ;;
    *) echo linux-headers-amd64 ;;
  esac
}

# The headers directory under USR_SRC that BCC is pointed at for KERNEL: the kernel's own when
# installed, else the newest generic arch headers the distribution installed. Prints nothing when
# there is none.
headers_build_dir() {
  local usr_src=$1 kernel=$2
  if [ -d "$usr_src/linux-headers-$kernel" ]; then
    echo "$usr_src/linux-headers-$kernel"
    return
  fi
  # ls sorts by name (6.1.0-18 before 6.1.0-9); sort -V by version. A glob that matches nothing
  # makes ls fail, hence the `|| true`.
  ls -d "$usr_src"/linux-headers-*-amd64 "$usr_src"/linux-headers-*-arm64 "$usr_src"/linux-headers-*-generic \
    2>/dev/null | sort -V | tail -n 1 || true
}

# The source tree that goes with the headers directory BUILD: Debian splits headers into
# linux-headers-V-ARCH and linux-headers-V-common, Ubuntu into linux-headers-V-generic and
# linux-headers-V. BUILD itself when the companion directory is not there.
headers_source_dir() {
  local build=$1 source
  case "$build" in
    *-amd64) source="${build%-amd64}-common" ;;
    *-arm64) source="${build%-arm64}-common" ;;
    *-generic) source="${build%-generic}" ;;
    *) source="$build" ;;
  esac
  [ -d "$source" ] || source="$build"
  echo "$source"
}

# Sourced: the functions above are all that is wanted. (`return` succeeds only in a sourced file
# or a function; comparing BASH_SOURCE with $0 would take `bash -c '. setup.sh' setup.sh` for a run.)
if (return 0 2>/dev/null); then
  return 0
fi

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
[ "$test_services" = 1 ] && packages+=(prometheus chromium chromium-driver jq vagrant)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done

# apt-get update at most once: before installing, or before settling for generic kernel headers.
apt_updated=0
apt_update() {
  [ "$apt_updated" = 1 ] && return
  apt-get update -qq >&2 || die "apt-get update failed"
  apt_updated=1
}

headers_pkg=""
if [ ! -e "/lib/modules/$kernel/build/Makefile" ]; then
  headers_pkg=$(headers_package /etc/os-release "$kernel" "$(uname -m)") || die "cannot choose a kernel headers package"
  if [ "$headers_pkg" != "linux-headers-$kernel" ] && ! installed "$headers_pkg"; then
    # The kernel's own headers package may be missing only from stale package lists (a fresh VM's
    # are often emptied): ask again with fresh ones before settling for the generic headers.
    apt_update
    headers_pkg=$(headers_package /etc/os-release "$kernel" "$(uname -m)") || die "cannot choose a kernel headers package"
  fi
  installed "$headers_pkg" || missing+=("$headers_pkg")
fi

if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_update
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
  build=$(headers_build_dir /usr/src "$kernel")
  [ -n "$build" ] && [ -d "$build" ] || die "no kernel headers found under /usr/src for BCC; install the headers for kernel $kernel"
  source_dir=$(headers_source_dir "$build")
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
