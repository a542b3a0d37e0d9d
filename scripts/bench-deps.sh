#!/usr/bin/env bash
# The peers `make bench` compares ABUSE with, installed idempotently (not
# needed by `make test`): nbdkit and nbd-client from Debian, rublk (ublk's
# Rust server) from the Rust package registry into the cache, and a font
# for the chart; perf for make profile.
set -euo pipefail

CACHE=${ABUSE_CACHE:-/var/cache/abuse}
RUBLK_VERSION=0.2.15
APT_PACKAGES=(nbdkit nbd-client fonts-dejavu-core linux-perf)

have_all() {
  local out
  out=$(dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null) || return 1
  [ "$(grep -c 'install ok installed' <<<"$out")" -eq "$#" ]
}

if ! have_all "${APT_PACKAGES[@]}"; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
fi
rublk=$CACHE/tools/rublk/bin/rublk
if ! "$rublk" --version 2>/dev/null | grep -q "$RUBLK_VERSION"; then
  cargo install --locked --root "$CACHE/tools/rublk" "rublk@$RUBLK_VERSION"
fi
echo "bench-deps: ok ($rublk, $(command -v nbdkit), $(command -v nbd-client))"
