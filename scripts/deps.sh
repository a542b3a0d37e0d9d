#!/usr/bin/env bash
# Installs every tool the build and the tests need. Idempotent: a second run
# only checks, and returns in seconds.
set -euo pipefail

TOOLS_DIR=${ABUSE_TOOLS:-${ABUSE_CACHE:-/var/cache/abuse}/tools}
BINDGEN_VERSION=0.69.5

APT_PACKAGES=(
  # Rust for the kernel (the rustup toolchain has no rust-src)
  rustc-web rust-web-src libstd-rust-web-dev
  # LLVM toolchain for an LLVM=1 kernel build and bindgen
  clang-19 lld-19 llvm-19 libclang-19-dev
  # kernel build
  linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils make
  # guest userspace and clients (nbdkit: the NBD server the nbd backend is
  # tested against)
  busybox-static e2fsprogs fio util-linux fdisk kmod nbdkit
  # make install-test: systemd-analyze verify of the unit
  systemd
  # make install-test: the module built by DKMS; make deb: dpkg-shlibdeps
  dkms dpkg-dev
  # C layout test (and its 32-bit variant, for compat_ioctl callers)
  gcc gcc-multilib
  # python/abuse.py's layout test and the Python ramdisk in the VM
  python3
)
# qemu-system-x86 comes from bookworm-backports so that it matches the
# preinstalled qemu-utils (installing bookworm's 7.2 would remove qemu-img).
BACKPORTS_PACKAGES=(qemu-system-x86 qemu-utils)

have_all() {
  local out
  out=$(dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null) || return 1
  [ "$(grep -c 'install ok installed' <<<"$out")" -eq "$#" ]
}

if ! have_all "${APT_PACKAGES[@]}" "${BACKPORTS_PACKAGES[@]}"; then
  src=/etc/apt/sources.list.d/bookworm-backports.sources
  if [ ! -f "$src" ]; then
    cat >"$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
  apt-get install -y -q --no-install-recommends -t bookworm-backports "${BACKPORTS_PACKAGES[@]}"
fi
qemu-img --version >/dev/null || { echo "deps: qemu-img is missing" >&2; exit 1; }
qemu-system-x86_64 --version >/dev/null

if ! "$TOOLS_DIR/bin/bindgen" --version 2>/dev/null | grep -q "$BINDGEN_VERSION"; then
  cargo install bindgen-cli --version "$BINDGEN_VERSION" --locked --root "$TOOLS_DIR"
fi

echo "deps: ok"
