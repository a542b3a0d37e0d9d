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

# As a user would, from a plain shell: no RUSTC=, whatever rustc is first on
# PATH (here rustup's, not the one that built the kernel).
env -u RUSTC -u LLVM "$root/scripts/install.sh" "$dest" /usr/local "$kdir" >/dev/null
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
# A rustc other than the kernel's: one line that says which, not E0514s.
other=$(mktemp -d)/rustc
printf '#!/bin/sh\necho "rustc 1.0.0 (0000000 2015-05-15)"\n' >"$other" && chmod +x "$other"
out=$(RUSTC=$other "$root/scripts/install.sh" "$dest" /usr/local "$kdir" 2>&1 >/dev/null) &&
  fail "installed a module built by another rustc ($other)"
grep -q "RUSTC=$other is 'rustc 1.0.0.*was built by 'rustc" <<<"$out" || fail "no word about the kernel's rustc: $out"
grep -q "E0514" <<<"$out" && fail "E0514 instead of a message: $out"
rm -rf "$(dirname "$other")"
# DKMS: the package's source (module-source.sh, as make deb ships it) added
# and built for the test kernel, in a DKMS tree of its own.
command -v dkms >/dev/null || fail "dkms is missing (make deps installs it)"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
dkms_root=$(mktemp -d)
"$root/scripts/module-source.sh" "$dkms_root/src/abuse-$version"
mkdir -p "$dkms_root/tree"
dkms_args=(-m abuse -v "$version" --sourcetree "$dkms_root/src" --dkmstree "$dkms_root/tree")
dkms add "${dkms_args[@]}" >/dev/null
if ! out=$(dkms build "${dkms_args[@]}" -k "$release" --kernelsourcedir "$kdir" 2>&1); then
  cat "$dkms_root"/tree/abuse/"$version"/build/make.log >&2 || true
  fail "dkms build: $out"
fi
ko=$(find "$dkms_root/tree/abuse/$version/$release" -name 'abuse.ko*' | head -1)
[ -n "$ko" ] && modinfo "$ko" | grep -q '^name: *abuse' || fail "dkms build made no abuse.ko: $out"
rm -rf "$dkms_root"
# A kernel tree without Rust: told what is missing, not a build failure.
norust=$(mktemp -d)
touch "$norust/Makefile"
out=$("$root/scripts/install.sh" "$dest" /usr/local "$norust" 2>&1 >/dev/null) && fail "installed a module for a kernel without Rust"
grep -q "CONFIG_RUST=y" <<<"$out" || fail "no word about CONFIG_RUST: $out"
rm -rf "$norust"
echo "install-test: ok ($release)"
