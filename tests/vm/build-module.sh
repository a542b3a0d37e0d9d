#!/usr/bin/env bash
# Builds driver/ against the FLAVOR kernel in a build directory of its own
# (so test and bench builds, and parallel runs, don't share objects) and
# prints the path of abuse.ko.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
flavor=${1:-test}
build=$root/target/kbuild-$flavor
mkdir -p "$build/driver" "$build/abuse-sys/src"
exec 9>"$build.lock"
flock 9
# The driver includes ../../abuse-sys/src/uapi.rs: keep that layout.
rm -rf "$build/driver/src"
cp -r "$root/driver/Kbuild" "$root/driver/src" "$build/driver/"
cp "$root/abuse-sys/src/uapi.rs" "$build/abuse-sys/src/uapi.rs"
log=$build/build.log
"$root/scripts/kernel.sh" make "$flavor" M="$build/driver" modules 2>&1 | tee "$log" >&2
# A warning (rustc, objtool) is a defect like any other.
if grep -q "warning:" "$log"; then
  echo "build-module: the module build has warnings (above)" >&2
  exit 1
fi
echo "$build/driver/src/abuse.ko"
