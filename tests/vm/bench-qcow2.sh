#!/bin/sh
# Allocating qcow2 writes, ABUSE against rublk's qcow2 target, fresh images
# of each size and cluster size, in an ABAB order within one boot (drift
# cancels): fio 4k randwrite QD32 x 2 jobs for BENCH_RUNTIME s on a new image
# each time (images live in the guest's RAM: 1 GiB ones starve a 2 GiB guest).
# Run: tests/vm/run.sh --flavor bench --script tests/vm/bench-qcow2.sh
# (ABUSE_VM_EXTRA=path/to/old/abusectl:abusectl-old adds an older build).
FIO=/usr/bin/fio
RUNTIME=${BENCH_RUNTIME:-8}
insmod /lib/abuse/abuse.ko max_abuse=2
insmod "$(find /lib/modules -name ublk_drv.ko | head -1)" 2>/dev/null

# sized DEVICE: waits until it has a size (its server set it up).
sized() {
  i=0
  while [ "$(cat /sys/block/$1/size 2>/dev/null || echo 0)" = 0 ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
}

# fio_iops DEVICE: write IOPS of one job.
fio_iops() {
  $FIO --name=w --filename="$1" --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 \
    --ioengine=libaio --direct=1 --time_based --runtime="$RUNTIME" --group_reporting \
    --thread --minimal | awk -F';' '{print $49}'
}

# one NAME SIZE CLUSTER: a fresh image served by NAME, its IOPS.
one() {
  qemu-img create -q -f qcow2 -o cluster_size="$3" /tmp/q.qcow2 "$2"
  case $1 in
    rublk)
      rublk add qcow2 -q 1 -d 128 -f /tmp/q.qcow2 --quiet >/dev/null 2>&1
      sized ublkb0
      echo "qcow2 $2 $3 rublk $(fio_iops /dev/ublkb0)"
      rublk del -a >/dev/null 2>&1
      sleep 1
      ;;
    *)
      $1 server /dev/abctl0 qcow2 /tmp/q.qcow2 --setup qs=128 &
      pid=$!
      sized abuse0
      echo "qcow2 $2 $3 $1 $(fio_iops /dev/abuse0)"
      kill -TERM $pid; wait $pid
      abusectl reset /dev/abctl0
      ;;
  esac
  rm -f /tmp/q.qcow2
}

servers="abusectl rublk"
[ -x /bin/abusectl-old ] && servers="abusectl rublk abusectl-old"
for size in 256M 512M; do
  for cluster in 65536 4096; do
    for round in 1 2; do
      for s in $servers; do one "$s" $size $cluster; done
    done
  done
done
echo "bench: done"
