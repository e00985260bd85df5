#!/usr/bin/env bash
# Run the test suite inside a stock Debian 12 virtual machine, as a new user would, and bring the
# results back. As root; no interactive step.
#
#   scripts/vm-test.sh [options] [-- PYTEST-ARGS...]
#
#   --accel auto|kvm|tcg   KVM where it really runs a guest, else TCG (software emulation); auto
#                          boots the guest's kernel under KVM once to find out (default: auto)
#   --cpus N               virtual CPUs (default: the host's, at most 4)
#   --memory MB            guest memory (default: 8192)
#   --timeout MIN          after MIN minutes interrupt the suite as Ctrl-C would (its summary and
#                          junit.xml of the tests run so far come back), kill the VM if it is
#                          still up 15 minutes later (default: 180)
#   --rebuild              build the disk image again even if a cached one matches
#   --fresh                start from the bare image, as a machine that never ran setup.sh
#                          (default: from the cached image setup.sh already ran in, see stage 3)
#   --results DIR          where the run's results go (default: .vm/runs/<date-time>)
#   --image-only           build (or find) the image and stop
#
# Stages, each timed (timings.tsv in the results):
#   1. host tools: mmdebstrap, QEMU and qemu-img, installed from the distribution if missing
#   2. image: Debian 12 (bookworm) from Debian's packages with its stock kernel (linux-image-amd64,
#      6.1), built by mmdebstrap into an ext4 image without root mounts, cached under .vm/cache
#      and reused while this recipe is unchanged
#   3. boot: a throwaway copy-on-write layer over the cached image, so every run starts from the
#      same new machine; QEMU's user-mode networking only (the guest reaches the package
#      registries through the host's own connection; nothing is attached to the host's
#      interfaces); the checkout shared read-only over 9p, results shared writable
#   4. in the guest: the checkout is copied to the guest's disk (without .venv and .vm), then
#      `scripts/setup.sh --test` and `CI=true scripts/test.sh` run there, with PYTEST-ARGS if given
#   5. results: test.log, junit.xml, console.log (the guest's serial console), timings.tsv,
#      summary.txt (pytest's summary line and the guest's kernel), rc (the suite's exit code),
#      interrupted (present when --timeout cut the suite short)
#
# The VM is stopped on every exit path (end of the run, error, timeout, Ctrl-C). Exit codes: the
# suite's own (0 passed, 1 tests failed, ...), 3 when the VM could not be built or run.
#
# Local CA certificates of the host (/usr/local/share/ca-certificates) are installed in the image
# and pip in the guest is told to use the system bundle, so a guest behind the same
# TLS-intercepting proxy as the host reaches PyPI as the host does.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '[vm-test] %s\n' "$*" >&2; }
die() { printf '[vm-test] error: %s\n' "$*" >&2; exit 3; }

accel=auto
cpus=$(nproc); [ "$cpus" -gt 4 ] && cpus=4
memory=8192
timeout_min=180
rebuild=0
fresh=0
image_only=0
results=""
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --accel) accel=${2:-}; shift 2 ;;
    --cpus) cpus=${2:-}; shift 2 ;;
    --memory) memory=${2:-}; shift 2 ;;
    --timeout) timeout_min=${2:-}; shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    --fresh) fresh=1; shift ;;
    --image-only) image_only=1; shift ;;
    --results) results=${2:-}; shift 2 ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case "$accel" in auto|kvm|tcg) ;; *) die "--accel must be auto, kvm or tcg, got '$accel'" ;; esac
[[ $cpus =~ ^[1-9][0-9]{0,2}$ ]] || die "--cpus must be a positive number, got '$cpus'"
[[ $memory =~ ^[1-9][0-9]{2,6}$ ]] || die "--memory must be a size in MB (at least 100), got '$memory'"
[[ $timeout_min =~ ^[1-9][0-9]{0,4}$ ]] || die "--timeout must be a number of minutes, got '$timeout_min'"
[ "$(id -u)" = 0 ] || die "run as root: building the image and the suite inside the guest need it"
[ "$(uname -m)" = x86_64 ] || die "the VM recipe is for x86_64 hosts (this one is $(uname -m))"

vm_dir="$here/.vm"
cache="$vm_dir/cache"
if [ -n "$results" ] && [ -e "$results" ]; then
  [ -d "$results" ] && [ -z "$(ls -A "$results")" ] ||
    die "--results $results is not an empty directory: give a new or empty one"
fi
mkdir -p "$cache" "$vm_dir/runs"
# One run at a time per cache: a run prunes images another run's VM may still be reading.
exec 9>"$cache/lock"
flock -n 9 || die "another vm-test.sh run is using $cache; wait for it to finish"
[ -n "$results" ] || results="$vm_dir/runs/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$results"
results=$(cd "$results" && pwd)
timings="$results/timings.tsv"
{ git -C "$here" rev-parse HEAD 2>/dev/null || echo "not a git checkout"
  git -C "$here" status --porcelain 2>/dev/null; } > "$results/commit"
printf 'stage\tseconds\n' > "$timings"
stage_start=0
stage() { stage_start=$(date +%s); stage_name=$1; say "$1"; }
stage_done() { printf '%s\t%s\n' "$stage_name" "$(( $(date +%s) - stage_start ))" >> "$timings"; }

# --- 1. host tools ------------------------------------------------------------------------------
stage host-tools
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
    die "apt-get install ${need[*]} failed"
fi
stage_done

# --- 2. image -------------------------------------------------------------------------------------
# What goes into the image: a minimal Debian 12 with its stock kernel, systemd, networking by DHCP
# on QEMU's user network, and the unit that runs the suite at boot. setup.sh installs the rest, as
# it would for a user. The recipe's hash names the cached image, so a changed recipe builds anew.
guest_packages="linux-image-amd64,systemd-sysv,udev,kmod,ca-certificates,iproute2,procps,tar,gzip"
# The image runs a fixed stub at boot: it mounts the two shares and runs the script the host put
# in the results share for this run. What a run does can so change without a new image (nor a
# new provisioned layer, stage 3).
guest_boot=$(cat <<'GUEST'
#!/bin/bash
out=/mnt/results
mkdir -p /mnt/src "$out"
modprobe -a 9pnet_virtio 9p 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro src /mnt/src &&
  mount -t 9p -o trans=virtio,version=9p2000.L,rw results "$out" &&
  [ -f "$out/run.sh" ] && bash "$out/run.sh"
sync
systemctl poweroff
GUEST
)
# The run, in the guest. The results share's file "mode" says what to do:
#   provision  copy the checkout in, run scripts/setup.sh --test, remove the copy
#   test       copy the checkout in, run setup and the suite, write the results
# A file "stop" appearing in the share (the host's --timeout) interrupts pytest as Ctrl-C
# would: it writes its summary and junit.xml for the tests run so far, and the guest powers off.
guest_run=$(cat <<'GUEST'
set -u
out=/mnt/results
mode=$(cat "$out/mode" 2>/dev/null || echo test)
log() { printf '%s %s\n' "$(date -u +%T)" "$*" >> "$out/guest.log"; }
t0=$(date +%s)
mark() { printf '%s\t%s\n' "$1" "$(( $(date +%s) - t0 ))" >> "$out/timings.tsv"; t0=$(date +%s); }
log "guest up ($mode): $(uname -r)"
printf 'guest-boot\t%s\n' "$(cut -d. -f1 /proc/uptime)" >> "$out/timings.tsv"
uname -r > "$out/kernel"
rm -rf /root/l7lab && mkdir -p /root/l7lab
tar -C /mnt/src --exclude=./.venv --exclude=./.vm --exclude=./.vagrant -cf - . | tar -C /root/l7lab -xf -
mark guest-copy
cd /root/l7lab
[ -f "$out/pip-cert" ] && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
bash scripts/setup.sh --test > "$out/setup.log" 2>&1
rc=$?
mark guest-setup
if [ "$rc" != 0 ]; then
  log "setup failed (rc $rc): see setup.log"
  rc=3
elif [ "$mode" = provision ]; then
  cd / && rm -rf /root/l7lab && apt-get clean
else
  args=()
  [ -s "$out/pytest-args" ] && mapfile -d '' -t args < "$out/pytest-args"
  # Job control on: a background job of a plain script ignores SIGINT, and Python would not
  # turn SIGINT into KeyboardInterrupt; as a job in its own process group it does.
  set -m
  CI=true bash scripts/test.sh -q -rfEs --junitxml="$out/junit.xml" "${args[@]}" > "$out/test.log" 2>&1 &
  suite=$!
  set +m
  interrupted=0
  while kill -0 "$suite" 2>/dev/null; do
    if [ "$interrupted" = 0 ] && [ -e "$out/stop" ]; then
      log "stop asked: interrupting the suite"
      kill -INT "$suite"; interrupted=1
    fi
    sleep 10
  done
  wait "$suite"; rc=$?
  [ "$interrupted" = 1 ] && echo "interrupted at the host's --timeout" > "$out/interrupted"
  mark guest-tests
fi
echo "$rc" > "$out/rc"
log "done, rc $rc"
GUEST
)
recipe_hash=$( { echo "$guest_packages"; echo "$guest_boot"; cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true; echo v1; } | sha256sum | cut -c1-16)
image="$cache/debian12-$recipe_hash.img"
kernel_file="$cache/debian12-$recipe_hash.vmlinuz"
initrd_file="$cache/debian12-$recipe_hash.initrd"

stage image
if [ "$rebuild" = 1 ] || [ ! -f "$image" ] || [ ! -f "$kernel_file" ] || [ ! -f "$initrd_file" ]; then
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  # The staging tree lies inside .vm/cache, which this script owns: removed on every exit path.
  trap 'rm -rf --one-file-system -- "$rootfs"' EXIT
  runner_file="$cache/boot.$recipe_hash"
  printf '%s\n' "$guest_boot" > "$runner_file"
  say "building the Debian 12 image with mmdebstrap (a few minutes)"
  mmdebstrap --variant=minbase --include="$guest_packages" \
    --customize-hook='echo l7lab-vm > "$1/etc/hostname"' \
    --customize-hook='printf "nameserver 10.0.2.3\n" > "$1/etc/resolv.conf"' \
    --customize-hook='printf "/dev/vda / ext4 defaults 0 1\n" > "$1/etc/fstab"' \
    --customize-hook='mkdir -p "$1/etc/systemd/network" && printf "[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n" > "$1/etc/systemd/network/10-dhcp.network"' \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd >/dev/null 2>&1' \
    --customize-hook="install -m 755 '$runner_file' \"\$1/usr/local/sbin/l7lab-vm-boot\"" \
    --customize-hook='printf "[Unit]\nDescription=l7lab suite\nWants=network-online.target\nAfter=network-online.target\n[Service]\nType=oneshot\nExecStart=/usr/local/sbin/l7lab-vm-boot\nStandardOutput=journal+console\n[Install]\nWantedBy=multi-user.target\n" > "$1/etc/systemd/system/l7lab-vm-run.service"' \
    --customize-hook='chroot "$1" systemctl enable l7lab-vm-run.service systemd-networkd-wait-online.service >/dev/null 2>&1' \
    --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" && chroot "$1" update-ca-certificates >/dev/null 2>&1; fi' \
    bookworm "$rootfs" >"$cache/mmdebstrap.log" 2>&1 || die "mmdebstrap failed: see $cache/mmdebstrap.log"
  rm -f "$runner_file"
  cp "$rootfs"/boot/vmlinuz-* "$kernel_file.tmp" && cp "$rootfs"/boot/initrd.img-* "$initrd_file.tmp" ||
    die "the image has no kernel or initrd under /boot"
  rm -f "$image.tmp"
  mkfs.ext4 -q -F -L l7lab-vm -d "$rootfs" "$image.tmp" 24G >/dev/null || die "mkfs.ext4 -d failed"
  mv "$kernel_file.tmp" "$kernel_file"; mv "$initrd_file.tmp" "$initrd_file"; mv "$image.tmp" "$image"
  rm -rf --one-file-system -- "$rootfs"
  trap - EXIT
fi
stage_done
say "image: $image"
[ "$image_only" = 1 ] && exit 0

# --- 3. boot ------------------------------------------------------------------------------------
qemu_pid=""
overlay="$results/overlay.qcow2"
stop_vm() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    say "stopping the VM"
    kill "$qemu_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$qemu_pid" 2>/dev/null || true
  fi
  qemu_pid=""
  rm -f -- "$overlay"
  [ -n "${provision_dir:-}" ] && rm -rf --one-file-system -- "$provision_dir"
  [ -n "${provisioned_tmp:-}" ] && rm -f -- "$provisioned_tmp"
  return 0
}
trap stop_vm EXIT
trap 'exit 130' INT TERM

kvm_runs_guests() {
  # A /dev/kvm that opens is not enough (a paravirtual one may refuse ordinary guests): boot the
  # guest's kernel under KVM and wait for its first console line.
  [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
  local probe; probe=$(mktemp)
  # In a shell of its own, whose report of a QEMU that aborts goes to /dev/null with the rest.
  timeout 30 bash -c 'qemu-system-x86_64 -accel kvm -cpu host -m 256 -nographic -no-reboot \
    -kernel "$1" -append "console=ttyS0 panic=-1 rdinit=/nonexistent" \
    -serial "file:$2" -monitor none; true' probe "$kernel_file" "$probe" >/dev/null 2>&1 || true
  grep -q "Linux version" "$probe"; local found=$?
  rm -f "$probe"
  return $found
}
if [ "$accel" = auto ]; then
  if kvm_runs_guests; then accel=kvm; else accel=tcg; fi
fi
say "accelerator: $accel ($cpus CPUs, $memory MB)"
if [ "$accel" = kvm ]; then accel_args=(-accel kvm -cpu host); else accel_args=(-accel tcg,thread=multi -cpu max); fi
deadline=$(( $(date +%s) + timeout_min * 60 ))
STOP_GRACE=900  # pytest under emulation takes minutes to wind its workers down and report

boot_vm() {  # boot_vm DISK SHARE: run the guest on DISK until it powers off
  # At the deadline the guest is asked to interrupt the suite (a file "stop" in the share) and
  # given STOP_GRACE seconds to write what it has and power off; then the VM is killed.
  local disk=$1 share=$2
  printf '%s\n' "$guest_run" > "$share/run.sh"
  ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1 && : > "$share/pip-cert"
  qemu-system-x86_64 "${accel_args[@]}" -smp "$cpus" -m "$memory" -nographic -no-reboot \
    -kernel "$kernel_file" -initrd "$initrd_file" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 net.ifnames=0" \
    -drive "file=$disk,if=virtio,format=qcow2" \
    -netdev user,id=net0 -device virtio-net-pci,netdev=net0 \
    -virtfs "local,path=$here,mount_tag=src,security_model=none,readonly=on" \
    -virtfs "local,path=$share,mount_tag=results,security_model=none" \
    -serial "file:$share/console.log" -monitor none </dev/null >"$share/qemu.log" 2>&1 &
  qemu_pid=$!
  while kill -0 "$qemu_pid" 2>/dev/null; do
    now=$(date +%s)
    if [ "$now" -ge "$deadline" ] && [ ! -e "$share/stop" ]; then
      say "timeout: the VM ran $timeout_min minutes; asking the guest to stop the suite"
      : > "$share/stop"
    fi
    if [ "$now" -ge $(( deadline + STOP_GRACE )) ]; then
      say "the guest did not stop within ${STOP_GRACE}s of the timeout: killing the VM"
      stop_vm
      return 0
    fi
    sleep 5
  done
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=""
}

# The provisioned layer: the image after `scripts/setup.sh --test` has run in it once (the
# distribution's packages installed, headers in place), cached while the image and setup.sh are
# unchanged. Runs start from it unless --fresh; the suite's own setup then finds everything
# installed and only builds the checkout's .venv.
base="$image"; base_format=raw
if [ "$fresh" = 0 ]; then
  setup_hash=$( { echo "$recipe_hash"; cat "$here/scripts/setup.sh"; } | sha256sum | cut -c1-16)
  provisioned="$cache/debian12-$recipe_hash-setup-$setup_hash.qcow2"
  if [ ! -f "$provisioned" ]; then
    stage provision
    provision_dir=$(mktemp -d "$cache/provision.XXXXXX")
    provisioned_tmp="$provisioned.tmp"
    qemu-img create -q -f qcow2 -F raw -b "$image" "$provisioned_tmp" || die "qemu-img create failed"
    echo provision > "$provision_dir/mode"
    boot_vm "$provisioned_tmp" "$provision_dir"
    if [ "$(cat "$provision_dir/rc" 2>/dev/null)" != 0 ]; then
      cp "$provision_dir"/*.log "$results/" 2>/dev/null || true
      die "setup.sh failed in the guest while provisioning: see $results/setup.log"
    fi
    mv "$provisioned_tmp" "$provisioned"; provisioned_tmp=""
    rm -rf --one-file-system -- "$provision_dir"; provision_dir=""
    stage_done
  fi
  base="$provisioned"; base_format=qcow2
fi
# What an older recipe or setup.sh left in the cache goes (the names are this script's own).
for f in "$cache"/debian12-*; do
  case "$f" in
    "$image"|"$kernel_file"|"$initrd_file"|"${provisioned:-}") ;;
    *.img|*.vmlinuz|*.initrd|*-setup-*.qcow2|*.tmp) say "removing stale $(basename "$f")"; rm -f -- "$f" ;;
  esac
done

qemu-img create -q -f qcow2 -F "$base_format" -b "$base" "$overlay" || die "qemu-img create failed"
[ ${#pytest_args[@]} -gt 0 ] && printf '%s\0' "${pytest_args[@]}" > "$results/pytest-args"
echo test > "$results/mode"
printf '%s\n' "$accel" > "$results/accel"
stage vm-run
boot_vm "$overlay" "$results"
stage_done

# --- 5. results ---------------------------------------------------------------------------------
{
  echo "kernel: $(cat "$results/kernel" 2>/dev/null || echo unknown)"
  echo "accelerator: $accel, $cpus CPUs, $memory MB"
  [ -f "$results/interrupted" ] && echo "interrupted: the suite ran past --timeout $timeout_min"
  if [ -f "$results/test.log" ]; then
    grep -E '^=+ .*(passed|failed|error).* =+$|^[0-9]+ (passed|failed)' "$results/test.log" | tail -n 1
  fi
} > "$results/summary.txt"
cat "$results/summary.txt" >&2
say "timings (s):"; column -t -s $'\t' "$timings" >&2 || cat "$timings" >&2
say "results in $results"
[ -f "$results/rc" ] || die "the guest wrote no result (see $results/console.log and guest.log)"
exit "$(cat "$results/rc")"
