#!/bin/bash
# Ceph for make rbd-test: a monitor, an OSD, the ceph and rbd tools, and
# librbd (which the rbd backend loads at run time). Idempotent.
set -euo pipefail
need=()
for pkg in ceph-mon ceph-osd ceph-common librbd1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
