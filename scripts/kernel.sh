#!/usr/bin/env bash
# Builds (once per machine) and locates the guest kernels.
#
#   kernel.sh build FLAVOR        build bzImage + modules for FLAVOR (test|bench|profile), cached
#   kernel.sh dir FLAVOR          print the cached build tree of FLAVOR (the KDIR)
#   kernel.sh make FLAVOR ARGS    run make in that tree with the Rust toolchain set up
#
# The cache lives outside the checkout, keyed by the source package version,
# the config fragments, this script and the toolchain, so a second build on
# the same machine is a stamp check. The tree is not patched: the module
# builds against a stock Rust-enabled kernel.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
CACHE=${ABUSE_CACHE:-/var/cache/abuse}
TOOLS_DIR=${ABUSE_TOOLS:-$CACHE/tools}
SRC_TARBALL=/usr/src/linux-source-6.12.tar.xz
# Bump when the build procedure below changes what it produces.
BUILD_REV=1

kmake_env() {
  export PATH=/usr/lib/llvm-19/bin:$PATH
  KMAKE=(make LLVM=1 RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
    BINDGEN="$TOOLS_DIR/bin/bindgen" RUST_LIB_SRC=/usr/lib/rustlib/src/rust/library)
}

fragments() {
  local flavor=$1
  case "$flavor" in
    test | bench) echo "$root/tests/kconfig/base.config $root/tests/kconfig/$flavor.config" ;;
    # bench + perf events and symbols (tests/vm/run.sh --flavor profile).
    profile) echo "$root/tests/kconfig/base.config $root/tests/kconfig/bench.config $root/tests/kconfig/profile.config" ;;
    *) echo "kernel.sh: unknown flavor '$flavor' (test|bench|profile)" >&2; exit 2 ;;
  esac
}

key() {
  local flavor=$1
  {
    dpkg-query -W -f='${Version}\n' linux-source-6.12
    /usr/bin/rustc --version
    "$TOOLS_DIR/bin/bindgen" --version 2>/dev/null || echo no-bindgen
    echo "rev $BUILD_REV"
    cat $(fragments "$flavor")
  } | sha256sum | cut -c1-16
}

dir() { echo "$CACHE/kernel/$1-$(key "$1")"; }

# Every option named in a fragment must have the value the fragment asks for:
# merge_config silently drops options whose dependencies are missing.
verify_config() {
  local config=$1 frag line name bad=0
  for frag in "${@:2}"; do
    while IFS= read -r line; do
      case "$line" in
        CONFIG_*=*) name=${line%%=*} ;;
        "# CONFIG_"*" is not set") name=${line#\# }; name=${name%% *}; line="# $name is not set" ;;
        *) continue ;;
      esac
      if [[ "$line" == "# "* ]]; then
        grep -q "^$name=" "$config" && { echo "kernel.sh: $name is set but $frag wants it off" >&2; bad=1; }
      elif ! grep -qx "$line" "$config"; then
        echo "kernel.sh: $line from $(basename "$frag") did not stick (got: $(grep "^$name=\|# $name is" "$config" || echo unset))" >&2
        bad=1
      fi
    done <"$frag"
  done
  return $bad
}

build() {
  local flavor=$1 out
  out=$(dir "$flavor")
  if [ -f "$out/.abuse-built" ]; then
    echo "kernel: $flavor cached at $out"
    return
  fi
  mkdir -p "$CACHE/kernel"
  exec 9>"$out.lock"
  flock 9
  if [ -f "$out/.abuse-built" ]; then return; fi
  rm -rf "$out"
  mkdir -p "$out"
  echo "kernel: unpacking $SRC_TARBALL into $out"
  tar -xf "$SRC_TARBALL" -C "$out" --strip-components=1
  kmake_env
  local frags
  read -r -a frags <<<"$(fragments "$flavor")"
  (
    cd "$out"
    "${KMAKE[@]}" -s tinyconfig
    scripts/kconfig/merge_config.sh -m .config "${frags[@]}" >/dev/null
    "${KMAKE[@]}" -s olddefconfig
    verify_config .config "${frags[@]}"
    "${KMAKE[@]}" rustavailable
    "${KMAKE[@]}" -s -j"$(nproc)" bzImage modules
    "${KMAKE[@]}" -s INSTALL_MOD_PATH="$out/modroot" modules_install
  )
  touch "$out/.abuse-built"
  # Older builds of this flavor are stale: keep the disk from filling up.
  find "$CACHE/kernel" -maxdepth 1 -name "$flavor-*" ! -name "$(basename "$out")*" -exec rm -rf {} +
  echo "kernel: $flavor built at $out"
}

cmd=${1:-}
flavor=${2:-test}
case "$cmd" in
  build) build "$flavor" ;;
  dir) dir "$flavor" ;;
  make)
    kmake_env
    exec "${KMAKE[@]}" -C "$(dir "$flavor")" "${@:3}"
    ;;
  *) echo "usage: kernel.sh build|dir|make FLAVOR [ARGS]" >&2; exit 2 ;;
esac
