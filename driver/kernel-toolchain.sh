#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# Prints the make variables that build a module for the kernel at KDIR with
# the compilers that built that kernel: a Rust module must be compiled by
# the very rustc that compiled the kernel's `kernel` crate (any other gives
# E0514 "compiled by an incompatible version of rustc"), and a clang-built
# kernel wants its clang.
#
#   kernel-toolchain.sh KDIR [RUSTC] [LLVM]
#
# RUSTC/LLVM, if given, are checked (RUSTC) or passed on (LLVM) rather than
# searched for. On failure, says in one line what to install or pass.
set -eu
[ $# -ge 1 ] || { echo "usage: kernel-toolchain.sh KDIR [RUSTC] [LLVM]" >&2; exit 2; }
kdir=$1 rustc=${2:-} llvm=${3:-}
fail() { echo "abuse: $*" >&2; exit 1; }

config=$kdir/include/config/auto.conf
[ -f "$config" ] || config=$kdir/.config
[ -f "$config" ] || fail "no configured kernel build tree at $kdir (install its headers package, or pass KDIR=)"
value() { sed -n "s/^$1=//p" "$config" | sed 's/^"\(.*\)"$/\1/'; }
[ "$(value CONFIG_RUST)" = y ] || fail "the kernel at $kdir has no Rust support (CONFIG_RUST=y): it cannot load Rust modules"
[ -f "$kdir/rust/libkernel.rmeta" ] || fail "the kernel tree at $kdir has no Rust metadata (rust/libkernel.rmeta): its headers package does not ship it, or the tree was cleaned"
want=$(value CONFIG_RUSTC_VERSION_TEXT)
[ -n "$want" ] || fail "the kernel at $kdir does not record its rustc (CONFIG_RUSTC_VERSION_TEXT, Linux >= 6.12): pass RUSTC=<the rustc that built it>"

version() { "$1" --version 2>/dev/null || true; }
if [ -n "$rustc" ]; then
  got=$(version "$rustc")
  [ "$got" = "$want" ] || fail "RUSTC=$rustc is '${got:-not a rustc}', but the kernel at $kdir was built by '$want'"
else
  for candidate in "$(command -v rustc || true)" /usr/bin/rustc /usr/bin/rustc-* \
    /usr/lib/rust-*/bin/rustc /usr/local/bin/rustc "${HOME:-/root}"/.rustup/toolchains/*/bin/rustc; do
    [ -x "$candidate" ] && [ "$(version "$candidate")" = "$want" ] && { rustc=$candidate; break; }
  done
  [ -n "$rustc" ] || fail "the kernel at $kdir was built by '$want', and no such rustc was found (rustc on PATH: '$(version rustc)'): install it and pass RUSTC=/path/to/rustc"
fi

if [ -z "$llvm" ] && [ "$(value CONFIG_CC_IS_CLANG)" = y ]; then
  major=$(($(value CONFIG_CLANG_VERSION) / 10000))
  if [ -x "/usr/lib/llvm-$major/bin/clang" ]; then
    llvm=/usr/lib/llvm-$major/bin/
  elif command -v "clang-$major" >/dev/null; then
    llvm=-$major
  elif clang --version 2>/dev/null | grep -q "clang version $major\."; then
    llvm=1
  else
    fail "the kernel at $kdir was built by '$(value CONFIG_CC_VERSION_TEXT)': install clang-$major (and lld-$major), or pass LLVM="
  fi
fi
echo "RUSTC=$rustc${llvm:+ LLVM=$llvm}"
