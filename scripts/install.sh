#!/usr/bin/env bash
# make install: ABUSE on a real machine.
#
#   scripts/install.sh [DESTDIR] [PREFIX] [KDIR]
#
# Builds abusectl and installs it with its man pages and shell completions,
# a modules-load entry, a udev rule and the abuse-server@.service unit; and
# builds and installs the module for the kernel at KDIR (default: the
# running kernel's build tree; none: no module) when that kernel can build
# Rust modules, saying exactly what is missing when it cannot. DESTDIR stages the whole
# tree elsewhere (packaging, and the layout test).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
destdir=${1:-}
prefix=${2:-/usr/local}
kdir=${3:-/lib/modules/$(uname -r)/build}
bindir=$prefix/bin
# RUSTC= and LLVM= choose the module's compilers (those that built the
# kernel), not cargo's.
module_rustc=${RUSTC:-} module_llvm=${LLVM:-}
unset RUSTC LLVM

cargo build --release -p abusectl --manifest-path "$root/Cargo.toml"
bin=$root/target/release/abusectl
install -D -m 0755 "$bin" "$destdir$bindir/abusectl"
"$bin" manpages "$destdir$prefix/share/man/man1"
install -d "$destdir$prefix/share/bash-completion/completions" \
  "$destdir$prefix/share/zsh/site-functions" "$destdir$prefix/share/fish/vendor_completions.d"
"$bin" completions bash >"$destdir$prefix/share/bash-completion/completions/abusectl"
"$bin" completions zsh >"$destdir$prefix/share/zsh/site-functions/_abusectl"
"$bin" completions fish >"$destdir$prefix/share/fish/vendor_completions.d/abusectl.fish"
install -D -m 0644 "$root/dist/modules-load.conf" "$destdir/etc/modules-load.d/abuse.conf"
install -D -m 0644 "$root/dist/60-abuse.rules" "$destdir/usr/lib/udev/rules.d/60-abuse.rules"
install -d "$destdir/usr/lib/systemd/system" "$destdir/etc/abuse"
sed "s|@BINDIR@|$bindir|g" "$root/dist/abuse-server@.service" \
  >"$destdir/usr/lib/systemd/system/abuse-server@.service"
install -m 0644 "$root/dist/abctl.conf.example" "$destdir/etc/abuse/abctl.conf.example"

# KDIR=none: no module (the Debian package leaves it to DKMS).
if [ "$kdir" = none ]; then
  echo "install: abusectl, unit, udev rule, man pages and completions installed under ${destdir:-/}"
  exit 0
fi

# The module: only for a kernel that can build Rust modules, with the
# compilers that built it.
missing=()
[ -f "$kdir/Makefile" ] || missing+=("a kernel build tree at $kdir (install the headers package, or pass KDIR=)")
if [ ${#missing[@]} -eq 0 ]; then
  grep -qs '^CONFIG_RUST=y' "$kdir/.config" "$kdir/include/config/auto.conf" ||
    missing+=("Rust support in that kernel (CONFIG_RUST=y)")
  [ -f "$kdir/rust/libkernel.rmeta" ] || missing+=("the kernel's Rust metadata ($kdir/rust/libkernel.rmeta: build the kernel with CONFIG_RUST and keep the build tree)")
fi
if [ ${#missing[@]} -eq 0 ]; then
  toolchain=$("$root/driver/kernel-toolchain.sh" "$kdir" "$module_rustc" "$module_llvm" 2>&1) || missing+=("${toolchain#abuse: }")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: abusectl, unit, udev rule, man pages and completions installed under ${destdir:-/}" >&2
  echo "install: the module was NOT built; this kernel lacks:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
"$root/scripts/module-source.sh" "$build"
make -C "$build/driver" KDIR="$kdir" ${module_rustc:+RUSTC=$module_rustc} ${module_llvm:+LLVM=$module_llvm}
release=$(make -C "$kdir" -s --no-print-directory kernelrelease)
install -D -m 0644 "$build/driver/abuse.ko" "$destdir/lib/modules/$release/extra/abuse.ko"
[ -n "$destdir" ] || depmod "$release"
echo "install: abuse.ko for $release, abusectl, unit, udev rule, man pages and completions installed under ${destdir:-/}"
