#!/usr/bin/env bash
# Builds driver/ against the FLAVOR kernel in a build directory of its own
# (so test and bench builds, and parallel runs, don't share objects) and
# prints the path of abuse.ko.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
flavor=${1:-test}
build=$root/target/kbuild-$flavor
mkdir -p "$build"
exec 9>"$build.lock"
flock 9
"$root/scripts/module-source.sh" "$build"
log=$build/build.log
# The way a user builds it (driver/Makefile: the kernel's own compilers,
# found from its tree), against the unpatched kernel.
make -C "$build/driver" KDIR="$("$root/scripts/kernel.sh" dir "$flavor")" 2>&1 | tee "$log" >&2
# A warning (rustc, objtool) is a defect like any other.
if grep -q "warning:" "$log"; then
  echo "build-module: the module build has warnings (above)" >&2
  exit 1
fi
echo "$build/driver/abuse.ko"
