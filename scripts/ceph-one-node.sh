#!/bin/bash
# A throwaway one-node Ceph cluster for the rbd backend's tests: one
# monitor and one OSD (memstore: in memory, no disk), pool size 1, no
# authentication, listening on 127.0.0.1 only, everything under one
# directory. Usage:
#   scripts/ceph-one-node.sh start DIR   # prints the ceph.conf path
#   scripts/ceph-one-node.sh stop DIR    # kills the daemons, removes DIR
set -euo pipefail
cmd=${1:?start|stop} dir=${2:?directory}
conf=$dir/ceph.conf

stop() {
  for pidfile in "$dir"/*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  for pidfile in "$dir"/*.pid; do
    [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  rm -rf "$dir"
}

case $cmd in
stop)
  stop
  exit 0
  ;;
start) ;;
*)
  echo "usage: $0 start|stop DIR" >&2
  exit 2
  ;;
esac

for tool in ceph-mon ceph-osd ceph monmaptool rbd; do
  command -v $tool >/dev/null || {
    echo "ceph-one-node: $tool is missing (make rbd-deps installs Ceph)" >&2
    exit 1
  }
done
port=${CEPH_PORT:-16789}
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "ceph-one-node: 127.0.0.1:$port is in use (another cluster? set CEPH_PORT)" >&2
  exit 1
fi
rm -rf "$dir"
mkdir -p "$dir/mon" "$dir/osd" "$dir/run"
fsid=$(cat /proc/sys/kernel/random/uuid)
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
public network = 127.0.0.1/32
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
run dir = $dir/run
pid file = $dir/\$name.pid
log file = $dir/\$name.log
admin socket = $dir/run/\$name.asok
mon data = $dir/mon
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = 2147483648
ms bind ipv6 = false
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd class update on start = false
osd crush update on start = false
CONF
monmaptool --create --clobber --fsid "$fsid" --addv a "[v1:127.0.0.1:$port]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" >/dev/null
ceph-mon -c "$conf" -i a
ceph() { command ceph -c "$conf" --connect-timeout 20 "$@"; }
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
id=$(ceph osd create "$osd_uuid")
ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1
ceph osd crush add-bucket localhost host >/dev/null 2>&1
ceph osd crush move localhost root=default >/dev/null 2>&1
ceph osd crush add "osd.$id" 1.0 host=localhost >/dev/null 2>&1
ceph-osd -c "$conf" -i "$id" 2>/dev/null
ceph osd pool create rbd 8 8 >/dev/null 2>&1
ceph osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
ceph osd pool application enable rbd rbd >/dev/null 2>&1
# Up when a write goes through.
for _ in $(seq 60); do
  if timeout 10 rbd -c "$conf" create rbd/probe --size 1M 2>/dev/null; then
    rbd -c "$conf" rm rbd/probe >/dev/null 2>&1
    echo "$conf"
    exit 0
  fi
  sleep 1
done
echo "ceph-one-node: the cluster did not come up; logs in $dir" >&2
exit 1
