#!/usr/bin/env bash
# make deb: the Debian package target/deb/abuse_VERSION_ARCH.deb, with
# abusectl, its man pages and completions, the service unit, the udev rule
# and modules-load entry, and the module's DKMS source (/usr/src/abuse-VERSION,
# which the package's postinst builds with DKMS for the running kernel).
set -euo pipefail
# Modes in the package are what install(1) and this umask make them.
umask 022
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
arch=$(dpkg --print-architecture)
out=$root/target/deb
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/pkg

# Everything but the module, as `make install PREFIX=/usr` lays it out.
"$root/scripts/install.sh" "$pkg" /usr none >/dev/null
gzip -9n "$pkg"/usr/share/man/man1/*.1
# The module is loaded at boot from the package's own directory (not a
# conffile: it goes with the package, and with the module DKMS removes).
mkdir -p "$pkg/usr/lib/modules-load.d"
mv "$pkg/etc/modules-load.d/abuse.conf" "$pkg/usr/lib/modules-load.d/abuse.conf"
rmdir "$pkg/etc/modules-load.d"
"$root/scripts/module-source.sh" "$pkg/usr/src/abuse-$version"
install -D -m 0644 /dev/stdin "$pkg/usr/share/doc/abuse/copyright" <<COPYRIGHT
ABUSE, A Block device in User SpacE.
The kernel module (usr/src/abuse-$version) is GPL-2.0; see the project's README.
COPYRIGHT

# Its shared-library dependencies, as dpkg-shlibdeps finds them.
mkdir -p "$stage/shlibs/debian"
printf 'Source: abuse\n\nPackage: abuse\nArchitecture: any\n' >"$stage/shlibs/debian/control"
# (It warns that the binary is not under debian/: it need not be.)
depends=$(cd "$stage/shlibs" && dpkg-shlibdeps -O "$pkg/usr/bin/abusectl" 2> >(grep -v 'should already be installed' >&2) |
  sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || { echo "deb: dpkg-shlibdeps found no dependencies for abusectl" >&2; exit 1; }

mkdir -p "$pkg/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
for f in control postinst prerm conffiles; do
  sed -e "s/@VERSION@/$version/g" -e "s/@ARCH@/$arch/g" -e "s/@DEPENDS@/$depends/g" -e "s/@SIZE@/$size/g" \
    "$root/dist/debian/$f" >"$pkg/DEBIAN/$f"
done
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm"
# md5sums of every file but the conffiles (dpkg keeps theirs itself).
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
  grep -zv -x -F -f <(sed 's|^/||' "$pkg/DEBIAN/conffiles") | xargs -0 md5sum) >"$pkg/DEBIAN/md5sums"
mkdir -p "$out"
deb=$out/abuse_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
