#!/usr/bin/env bash
# make install-test: `make install DESTDIR=...` against the test kernel puts
# every file where a machine expects it, the unit passes systemd-analyze
# verify, and against a kernel tree without Rust it says what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kdir=$("$root/scripts/kernel.sh" dir test)
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
fail() { echo "install-test: $*" >&2; exit 1; }

RUSTC=/usr/bin/rustc BINDGEN=${ABUSE_TOOLS:-/var/cache/abuse/tools}/bin/bindgen \
  "$root/scripts/install.sh" "$dest" /usr/local "$kdir" >/dev/null
release=$(make -s --no-print-directory -C "$kdir" kernelrelease)
[[ $release =~ ^[0-9][0-9A-Za-z.+_-]*$ ]] || fail "not a kernel release: '$release'"
for f in usr/local/bin/abusectl \
  usr/local/share/man/man1/abusectl.1 usr/local/share/man/man1/abusectl-server.1 \
  usr/local/share/man/man1/abusectl-setup.1 \
  usr/local/share/bash-completion/completions/abusectl \
  usr/local/share/zsh/site-functions/_abusectl \
  usr/local/share/fish/vendor_completions.d/abusectl.fish \
  etc/modules-load.d/abuse.conf usr/lib/udev/rules.d/60-abuse.rules \
  usr/lib/systemd/system/abuse-server@.service etc/abuse/abctl.conf.example \
  "lib/modules/$release/extra/abuse.ko"; do
  [ -s "$dest/$f" ] || fail "missing or empty: $f"
done
modinfo "$dest/lib/modules/$release/extra/abuse.ko" | grep -q '^name: *abuse' || fail "abuse.ko is not the module"
grep -q "ExecStart=/usr/local/bin/abusectl server /dev/abctl%i" "$dest/usr/lib/systemd/system/abuse-server@.service" ||
  fail "the unit does not run the installed abusectl"
grep -q "complete -F _abusectl" "$dest/usr/local/share/bash-completion/completions/abusectl" ||
  fail "no bash completion function"
# The unit as systemd reads it (the instance's environment file and the
# binary must exist for verify: give it both, in the scratch root).
command -v systemd-analyze >/dev/null || fail "systemd-analyze is missing (make deps installs it)"
{
  unit=$dest/abuse-server@0.service
  sed -e "s|/etc/abuse/|$dest/etc/abuse/|g" -e "s|/usr/local/bin/|$dest/usr/local/bin/|g" \
    "$dest/usr/lib/systemd/system/abuse-server@.service" >"$dest/abuse-server@.service"
  cp "$dest/etc/abuse/abctl.conf.example" "$dest/etc/abuse/abctl0.conf"
  out=$(systemd-analyze verify --man=no "$unit" 2>&1) || fail "systemd-analyze verify: $out"
  # Only complaints about this unit count (not the host's other units).
  if grep -i "abuse-server" <<<"$out"; then fail "systemd-analyze verify: $out"; fi
}
# A kernel tree without Rust: told what is missing, not a build failure.
norust=$(mktemp -d)
touch "$norust/Makefile"
out=$("$root/scripts/install.sh" "$dest" /usr/local "$norust" 2>&1 >/dev/null) && fail "installed a module for a kernel without Rust"
grep -q "CONFIG_RUST=y" <<<"$out" || fail "no word about CONFIG_RUST: $out"
rm -rf "$norust"
echo "install-test: ok ($release)"
