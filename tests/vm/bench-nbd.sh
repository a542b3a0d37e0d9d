#!/bin/sh
# ABUSE's nbd backend against the kernel's own NBD client, both in front of
# the same kind of export (nbdkit memory 256M over a unix socket, 4
# threads), in an ABAB order within one boot (drift cancels): fio 4k
# randread and randwrite QD32 x 2 jobs (IOPS) and 4k randread QD1 (IOPS and
# p50 latency). Run: tests/vm/run.sh --flavor bench --script
# tests/vm/bench-nbd.sh --timeout 1500 (ABUSE_VM_EXTRA=path/to/old/abusectl:abusectl-old
# adds an older build).
FIO=/usr/bin/fio
RUNTIME=${BENCH_RUNTIME:-8}
insmod /lib/abuse/abuse.ko max_abuse=2
insmod "$(find /lib/modules -name nbd.ko | head -1)" nbds_max=2 2>/dev/null

# sized DEVICE: waits until it has a size (its server set it up).
sized() {
  i=0
  while [ "$(cat /sys/block/$1/size 2>/dev/null || echo 0)" = 0 ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
}

# fio_run DEVICE RW DEPTH JOBS: "IOPS p50-usec" (read or write side).
fio_run() {
  $FIO --name=b --filename="$1" --rw="$2" --bs=4k --iodepth="$3" --numjobs="$4" \
    --ioengine=libaio --direct=1 --time_based --runtime="$RUNTIME" --group_reporting \
    --thread --minimal | awk -F';' -v rw="$2" '
      # terse v3: read iops $8, read clat p50 $24 (field "50.000000%=N");
      # write iops $49, write clat p50 $65.
      { if (rw == "randread") { i = $8; p = $24 } else { i = $49; p = $65 }
        sub(/.*=/, "", p); print i, p }'
}

# jobs NAME DEVICE: the three jobs on DEVICE.
jobs() {
  echo "nbd $1 randread $(fio_run "$2" randread 32 2)"
  echo "nbd $1 randwrite $(fio_run "$2" randwrite 32 2)"
  echo "nbd $1 qd1 $(fio_run "$2" randread 1 1)"
}

# one NAME: a fresh export served through NAME (kernel or an abusectl).
one() {
  rm -f /tmp/nbd.sock
  nbdkit -U /tmp/nbd.sock -P /tmp/nbdkit.pid --threads 4 memory 256M
  case $1 in
    kernel)
      nbd-client -unix /tmp/nbd.sock /dev/nbd0 -b 4096 >/dev/null 2>&1
      sized nbd0
      jobs kernel /dev/nbd0
      nbd-client -d /dev/nbd0 >/dev/null 2>&1
      ;;
    *)
      $1 server /dev/abctl0 nbd unix:/tmp/nbd.sock --setup qs=128 &
      pid=$!
      sized abuse0
      jobs "$1" /dev/abuse0
      kill -TERM $pid
      wait $pid
      abusectl reset /dev/abctl0
      ;;
  esac
  kill "$(cat /tmp/nbdkit.pid)"
  sleep 1
}

servers="kernel abusectl"
[ -x /bin/abusectl-old ] && servers="kernel abusectl abusectl-old"
for round in 1 2; do
  for s in $servers; do one "$s"; done
done
echo "bench: done"
