#!/usr/bin/env bash
# Boots the test kernel under QEMU (TCG) with the module, our static
# binaries and the real clients in an initramfs, runs the guest scenarios
# and scans the guest's dmesg for kernel bug reports.
#
#   run.sh [--flavor test|bench|profile] [--scenario a,b] [--script guest.sh] [--timeout SECS] [--disk MB]
#
# Prints one line per scenario, then `N passed, N failed` (the dmesg scan
# counts as one), and exits non-zero on any failure. Parallel-safe: every
# run works in its own temporary directory.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
flavor=test scenario="" script="" timeout=${ABUSE_VM_TIMEOUT:-1800} disk_mb=
while [ $# -gt 0 ]; do
  case "$1" in
    --flavor) flavor=$2; shift 2 ;;
    --scenario) scenario=$2; shift 2 ;;
    --script) script=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --disk) disk_mb=$2; shift 2 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

kdir=$("$root/scripts/kernel.sh" dir "$flavor")
[ -f "$kdir/.abuse-built" ] || "$root/scripts/kernel.sh" build "$flavor"
ko=$("$root/tests/vm/build-module.sh" "$flavor")

echo "vm: building static guest binaries"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
  --manifest-path "$root/Cargo.toml" --target x86_64-unknown-linux-gnu \
  --target-dir "$root/target/guest" -p abusectl -p abuse-tests
# The library's example servers (servers/examples/), static the same way.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
  --manifest-path "$root/Cargo.toml" --target x86_64-unknown-linux-gnu \
  --target-dir "$root/target/guest" -p abuse-servers --example ramdisk --example xor --example logging
bins="$root/target/guest/x86_64-unknown-linux-gnu/release"

work=$(mktemp -d /tmp/abuse-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,lib/abuse,proc,sys,dev,tmp,run,mnt,etc,root}

# Dynamic tools with the libraries they need.
copy_libs() {
  local lib
  for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*'); do
    [ -e "$rootfs$lib" ] || install -D "$lib" "$rootfs$lib"
  done
}
copy_tool() {
  install -D "$1" "$rootfs$1"
  copy_libs "$1"
}
for tool in /sbin/mke2fs /sbin/e2fsck /sbin/sfdisk /sbin/blkdiscard /usr/bin/fio \
  /usr/bin/setpriv /sbin/losetup /usr/bin/qemu-img; do
  [ -x "$tool" ] && copy_tool "$tool"
done
ln -sf mke2fs "$rootfs/sbin/mkfs.ext4"
if [ "$flavor" != test ]; then
  # The peers make bench compares with (make bench-deps installs them).
  rublk=${ABUSE_CACHE:-/var/cache/abuse}/tools/rublk/bin/rublk
  if [ -x "$rublk" ]; then
    copy_tool "$rublk"
    mv "$rootfs$rublk" "$rootfs/usr/bin/rublk"
  fi
  [ -x /usr/sbin/nbd-client ] && copy_tool /usr/sbin/nbd-client
fi
# perf, for the profiling kernel (cpu-clock samples: TCG has no PMU).
[ "$flavor" = profile ] && [ -x /usr/bin/perf ] && copy_tool /usr/bin/perf
# qemu-nbd: the nbd backend is tested against it too (and it serves qcow2
# images in make bench).
copy_tool /usr/bin/qemu-nbd
# nbdkit: the NBD server the nbd backend is tested (and benchmarked)
# against, with the plugins and the fault-injection filter the scenarios use.
copy_tool /usr/bin/nbdkit
for so in plugins/nbdkit-memory-plugin.so plugins/nbdkit-file-plugin.so filters/nbdkit-error-filter.so \
  filters/nbdkit-delay-filter.so; do
  copy_tool "/usr/lib/x86_64-linux-gnu/nbdkit/$so"
done
cp /bin/busybox "$rootfs/bin/busybox"
cp "$bins/abusectl" "$bins/abuse-guest" "$rootfs/bin/"
for example in ramdisk xor logging; do
  cp "$bins/examples/$example" "$rootfs/bin/abuse-example-$example"
done
# Extra binaries for a one-off comparison in one boot (an older abusectl,
# say): ABUSE_VM_EXTRA="path:name ...", each copied to /bin/name.
for extra in ${ABUSE_VM_EXTRA:-}; do
  cp "${extra%%:*}" "$rootfs/bin/${extra##*:}"
done
# A 32-bit server, for the driver's compat_ioctl.
gcc -m32 -static -O2 -Wall -Werror -I "$root/abuse-sys/include" \
  "$root/tests/c/compat32.c" -o "$rootfs/bin/abuse-compat32"
# The servers in other languages: the C ramdisk (static, as compat32), and
# python/ with Debian's python3 and the part of its standard library that
# python/ramdisk.py imports (listed by importing it here: ~800 KiB), with
# the byte-code Debian compiled (install -p keeps the mtimes it is checked by).
gcc -static -O2 -std=gnu11 -Wall -Wextra -Werror -pthread -I "$root/abuse-sys/include" \
  "$root/examples/c/ramdisk.c" -o "$rootfs/bin/abuse-ramdisk-c"
python=$(readlink -f /usr/bin/python3)
copy_tool "$python"
ln -sf "$(basename "$python")" "$rootfs/usr/bin/python3"
pyc_tag=$("$python" -c 'import sys; print(sys.implementation.cache_tag)')
install -D -m 0644 -t "$rootfs/lib/abuse/python" "$root/python/abuse.py" "$root/python/ramdisk.py"
for f in $("$python" -B -S -E -c '
import os, sys
sys.path.insert(0, sys.argv[1])
import abuse, ramdisk
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    if f.startswith(os.path.dirname(os.__file__) + "/"):
        print(f)' "$root/python" | sort -u); do
  case "$f" in
    *.so) copy_tool "$f" ;;
    *.py)
      install -D -p -m 0644 "$f" "$rootfs$f"
      pyc=$(dirname "$f")/__pycache__/$(basename "$f" .py).$pyc_tag.pyc
      if [ -f "$pyc" ]; then install -D -p -m 0644 "$pyc" "$rootfs$pyc"; fi
      ;;
  esac
done
cp "$ko" "$rootfs/lib/abuse/abuse.ko"
if [ "$flavor" = test ]; then
  # The Debian package (make deb), installed in the guest with the real
  # dpkg as on a machine: the libraries its abusectl links, and a dpkg
  # database listing the host packages whose files are in the guest (so
  # its Depends are met by what is really there; their own dependencies,
  # only partly copied, are left out).
  deb=$("$root/scripts/deb.sh")
  cp "$deb" "$rootfs/lib/abuse/abuse.deb"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" ./usr/bin/abusectl
  copy_libs "$work/usr/bin/abusectl"
  copy_tool /usr/bin/dpkg
  copy_tool /usr/bin/dpkg-deb
  copy_tool /usr/bin/dpkg-query
  copy_tool /usr/bin/dpkg-split
  copy_tool /usr/bin/dpkg-trigger
  copy_tool /usr/bin/tar
  install -D /sbin/ldconfig "$rootfs/sbin/ldconfig"
  mkdir -p "$rootfs/var/lib/dpkg/info" "$rootfs/var/lib/dpkg/updates" "$rootfs/var/lib/dpkg/triggers"
  touch "$rootfs/var/lib/dpkg/available"
  for f in $(cd "$rootfs" && find . -type f -name '*.so*' | cut -c2-); do
    owner=$(dpkg-query -S "$f" 2>/dev/null || dpkg-query -S "$(readlink -f "$f")" 2>/dev/null) || continue
    for pkg in $(sed -e 's/: .*//' -e 's/,//g' <<<"$owner"); do
      echo "$f" >>"$rootfs/var/lib/dpkg/info/$pkg.list"
    done
  done
  (cd "$rootfs/var/lib/dpkg/info" && ls | sed 's/\.list$//') | xargs -r dpkg-query -s |
    grep -v -E '^(Pre-Depends|Depends|Breaks|Conflicts):' >"$rootfs/var/lib/dpkg/status"
fi
# The kernel's own modules (null_blk, ublk, nbd) for comparisons.
[ -d "$kdir/modroot/lib/modules" ] && cp -r "$kdir/modroot/lib/modules" "$rootfs/lib/"
cp "$root/tests/vm/init" "$rootfs/init"
echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
append="console=ttyS0 panic=-1 loglevel=4"
if [ -n "$script" ]; then
  cp "$script" "$rootfs/guest.sh"
  append+=" ABUSE_CMD=/guest.sh"
fi
append+=" ABUSE_GUEST_TIMEOUT=$((timeout - 60))"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz"

passed=0 failed=0

# boot NAME APPEND [DISK [CUT]]: boots the VM (with DISK as a virtio disk,
# cache=none, so a write is on the host's disk when the guest's flush
# returns); with CUT, kills QEMU (a power cut) a moment after the guest
# prints CUT. Leaves the console log in $work/NAME.log.
boot() {
  local name=$1 extra=$2 disk=${3:-} cut=${4:-} log=$work/$1.log
  local drive=()
  [ -n "$disk" ] && drive=(-drive "file=$disk,if=virtio,format=raw,cache=none")
  echo "vm: booting $flavor kernel ($(basename "$kdir"))${disk:+ with a virtio disk}${cut:+, to be cut}"
  if [ -n "$cut" ]; then
    (
      while ! grep -q "$cut" "$log" 2>/dev/null; do
        pgrep -f -- "$work/initramfs" >/dev/null || exit 0
        sleep 0.2
      done
      sleep 1
      pkill -KILL -f -- "$work/initramfs"
    ) &
  fi
  # In a subshell whose own stderr is dropped: a cut QEMU would otherwise
  # get bash's "Killed" job report. QEMU's stderr is kept in a file.
  (
    timeout -k 10 "$timeout" qemu-system-x86_64 -accel tcg -cpu max -m 2G -smp 2 \
      -kernel "$kdir/arch/x86/boot/bzImage" -initrd "$work/initramfs.cpio.gz" "${drive[@]}" \
      -append "$append $extra" -nographic -no-reboot -monitor none </dev/null 2>"$work/$name.err" |
      stdbuf -oL tr -d '\r' | tee "$log" |
      # Show the guest's own output (not the kernel's, nor the dmesg dump).
      awk '/abuse-vm: kernel/ { up = 1; sub(/.*abuse-vm:/, "abuse-vm:") }
           /^==== abuse-vm dmesg/ { skip = 1 } /^==== abuse-vm end/ { skip = 0; next }
           up && !skip && !/^\[ *[0-9]+\.[0-9]+\]/ && !/^\s*$/ { print; fflush() }'
    echo "${PIPESTATUS[0]}" >"$work/$name.rc"
  ) 2>/dev/null || true
  qemu_rc=$(cat "$work/$name.rc" 2>/dev/null || echo "?")
  if [ -z "$cut" ] && [ -s "$work/$name.err" ]; then
    sed 's/^/qemu: /' "$work/$name.err"
  fi
  wait 2>/dev/null || true
  [ -n "${ABUSE_VM_LOG:-}" ] && cat "$log" >>"$ABUSE_VM_LOG"
  return 0
}

# check NAME: counts the scenarios a boot reported, and scans its dmesg
# for kernel bug reports (any fails the run).
check() {
  local name=$1 log=$work/$1.log bugs
  passed=$((passed + $(grep -c '^PASS ' "$log" || true)))
  failed=$((failed + $(grep -c '^FAIL ' "$log" || true)))
  if [ -n "$script" ]; then
    if grep -q '^abuse-vm: exit 0$' "$log"; then
      echo "PASS $(basename "$script")"
      passed=$((passed + 1))
    else
      echo "FAIL $(basename "$script"): it exited non-zero"
      failed=$((failed + 1))
    fi
  elif ! grep -qE '^[0-9]+ passed, [0-9]+ failed' "$log"; then
    echo "FAIL vm_completed ($name): the guest did not finish (qemu exit $qemu_rc; timeout ${timeout}s); last lines:"
    grep -v '^\s*$' "$log" | tail -n 30 | sed 's/^/    /'
    failed=$((failed + 1))
  fi
  bugs=$(sed -n '/^==== abuse-vm dmesg ====$/,/^==== abuse-vm end ====$/p' "$log" |
    grep -E -f "$root/tests/vm/kernel-bugs.regex" || true)
  if ! grep -q '^==== abuse-vm end ====$' "$log"; then
    echo "FAIL dmesg_clean ($name): no dmesg dump from the guest"
    failed=$((failed + 1))
  elif [ -n "$bugs" ]; then
    echo "FAIL dmesg_clean ($name): kernel reported:"
    echo "$bugs" | head -n 40 | sed 's/^/    /'
    failed=$((failed + 1))
  else
    echo "PASS dmesg_clean ($name)"
    passed=$((passed + 1))
  fi
}

# The power cut takes two boots of its own; the rest run in one.
power_cut=no
rest=$scenario
if [ -z "$script" ]; then
  case ",$scenario," in
    ,,) power_cut=yes ;;
    *,power_cut,*)
      power_cut=yes
      rest=$(echo ",$scenario," | sed 's/,power_cut,/,/; s/^,//; s/,$//')
      ;;
  esac
fi
if [ -n "$script" ] || [ -z "$scenario" ] || [ -n "$rest" ]; then
  suite_disk=""
  if [ -n "$disk_mb" ]; then
    # A fresh virtio disk (/dev/vda in the guest), for make bench. Written
    # whole (not sparse), as a disk is: a guest write to a part the host
    # file never had would also allocate it on the host, a metadata commit
    # in the host's fdatasync that no real disk pays, and that falls on
    # whatever touches fresh space first (a cow's first writes).
    suite_disk=$work/suite-disk.img
    dd if=/dev/zero of="$suite_disk" bs=1M count="$disk_mb" conv=fsync status=none
  fi
  boot suite "${rest:+ABUSE_SCENARIO=$rest}" "$suite_disk"
  check suite
fi
if [ "$power_cut" = yes ]; then
  # ext4 on a cow and a qcow2 device whose delta and image live on a
  # virtio disk: fsync'd files are recorded, the VM is killed mid-write,
  # and the next boot checks.
  disk=$work/disk.img
  truncate -s 768M "$disk"
  cut="abuse-vm: cut the power"
  boot power-cut-1 "ABUSE_SCENARIO=power_cut_write" "$disk" "$cut"
  if grep -q "$cut" "$work/power-cut-1.log"; then
    boot power-cut-2 "ABUSE_SCENARIO=power_cut_check" "$disk"
    check power-cut-2
  else
    echo "FAIL power_cut: the first boot never got to the power cut; last lines:"
    grep -v '^\s*$' "$work/power-cut-1.log" | tail -n 30 | sed 's/^/    /'
    failed=$((failed + 1))
  fi
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
