#!/usr/bin/env bash
# Copies the module's source to DEST in the layout it builds in (driver/,
# and the uapi file the driver includes from ../abuse-sys/src/), with a
# dkms.conf at the top: what `make driver`, `make install`, DKMS and the
# Debian package build from.
#
#   module-source.sh DEST
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=$1
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
mkdir -p "$dest/driver" "$dest/abuse-sys/src"
rm -rf "$dest/driver/src"
cp -r "$root/driver/Kbuild" "$root/driver/Makefile" "$root/driver/kernel-toolchain.sh" "$root/driver/src" "$dest/driver/"
cp "$root/abuse-sys/src/uapi.rs" "$dest/abuse-sys/src/uapi.rs"
sed "s/@VERSION@/$version/" "$root/dist/dkms.conf" >"$dest/dkms.conf"
