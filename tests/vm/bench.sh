#!/bin/sh
# make bench: runs inside the VM (the bench kernel). The same fio jobs on
# ABUSE's servers and on the peers a user would otherwise pick, in one boot:
# null_blk, loop (direct I/O), ublk (rublk: null, loop and qcow2), nbd
# (nbdkit over a unix socket: memory and file; qemu-nbd: qcow2), ABUSE
# null, file, cow, qcow2 and nbd; then cow and file passes on a virtio disk
# (cache=none) with real fsync costs. Each result is fio's JSON between
# "==== bench DEVICE JOB" and "==== end"; the host's abuse-bench turns them
# into the table, the JSON and the chart.
FIO=/usr/bin/fio
RUNTIME=${BENCH_RUNTIME:-8}
SIZE=256M

# job DEVICE JOB PATH: one fio job on PATH.
job() {
  case $2 in
    randread) args="--rw=randread --bs=4k --iodepth=32 --numjobs=2" ;;
    randwrite) args="--rw=randwrite --bs=4k --iodepth=32 --numjobs=2" ;;
    qd1) args="--rw=randread --bs=4k --iodepth=1 --numjobs=1" ;;
    seqread) args="--rw=read --bs=128k --iodepth=16 --numjobs=1" ;;
    seqwrite) args="--rw=write --bs=128k --iodepth=16 --numjobs=1" ;;
  esac
  echo "==== bench $1 $2"
  $FIO --name=b --filename="$3" $args --ioengine=libaio --direct=1 --size=$SIZE \
    --time_based --runtime="$RUNTIME" --group_reporting --thread --output-format=json ||
    echo "bench: $1 $2 failed"
  echo "==== end"
}

# all DEVICE PATH: every job on PATH, if it is there.
all() {
  if [ ! -b "$2" ]; then
    echo "bench: $1: $2 is not there, skipped"
    return
  fi
  for j in randread randwrite qd1 seqread seqwrite; do job "$1" $j "$2"; done
}

# pass DEVICE JOB PATH [FIO-ARGS]: 4k random writes covering 64 MiB once,
# an fsync (a FLUSH) every 32 writes.
pass() {
  echo "==== bench $1 $2"
  $FIO --name=p --filename="$3" --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
    --iodepth=32 --numjobs=1 --size=64M --fsync=32 $4 --group_reporting --thread --output-format=json ||
    echo "bench: $1 $2 failed"
  echo "==== end"
}

wait_dev() {
  i=0
  while [ ! -b "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
}

insmod /lib/abuse/abuse.ko max_abuse=2
dd if=/dev/zero of=/tmp/bench.img bs=1M count=256 2>/dev/null

# The kernel's own drivers.
insmod "$(find /lib/modules -name null_blk.ko | head -1)" gb=1 bs=4096 queue_mode=2 irqmode=0 2>/dev/null
all null_blk /dev/nullb0
loop=$(/sbin/losetup -f --show --direct-io=on /tmp/bench.img)
all loop "$loop"
/sbin/losetup -d "$loop"

# ublk through rublk (2 queues, as many as CPUs).
if [ -x /usr/bin/rublk ]; then
  insmod "$(find /lib/modules -name ublk_drv.ko | head -1)" 2>/dev/null
  rublk add null -q 2 -d 128 --quiet >/dev/null 2>&1
  wait_dev /dev/ublkb0
  all ublk-null /dev/ublkb0
  rublk del -a >/dev/null 2>&1
  sleep 1
  rublk add loop -q 2 -d 128 -f /tmp/bench.img --quiet >/dev/null 2>&1
  wait_dev /dev/ublkb0
  all ublk-loop /dev/ublkb0
  rublk del -a >/dev/null 2>&1
  sleep 1
  # A fresh qcow2 image: the write jobs allocate clusters. rublk's qcow2
  # target takes one queue only ("qcow2 doesn't support MQ yet").
  qemu-img create -q -f qcow2 /tmp/bench-u.qcow2 256M
  rublk add qcow2 -q 1 -d 128 -f /tmp/bench-u.qcow2 --quiet >/dev/null 2>&1
  wait_dev /dev/ublkb0
  all ublk-qcow2 /dev/ublkb0
  rublk del -a >/dev/null 2>&1
  rm -f /tmp/bench-u.qcow2
else
  echo "bench: rublk is not in the image (make bench-deps), ublk skipped"
fi

# nbd through nbdkit over a unix socket.
if [ -x /usr/bin/nbdkit ]; then
  insmod "$(find /lib/modules -name nbd.ko | head -1)" nbds_max=2 2>/dev/null
  nbdkit -U /tmp/nbd-m.sock --threads 4 memory 256M
  nbd-client -unix /tmp/nbd-m.sock /dev/nbd0 -b 4096 >/dev/null 2>&1
  all nbd-memory /dev/nbd0
  nbd-client -d /dev/nbd0 >/dev/null 2>&1
  nbdkit -U /tmp/nbd-f.sock --threads 4 file /tmp/bench.img
  nbd-client -unix /tmp/nbd-f.sock /dev/nbd1 -b 4096 >/dev/null 2>&1
  all nbd-file /dev/nbd1
  nbd-client -d /dev/nbd1 >/dev/null 2>&1
  killall nbdkit
  # qemu's own server of a qcow2 image.
  if [ -x /usr/bin/qemu-nbd ]; then
    qemu-img create -q -f qcow2 /tmp/bench-n.qcow2 256M
    qemu-nbd -k /tmp/qnbd.sock -f qcow2 -e 4 --fork /tmp/bench-n.qcow2
    nbd-client -unix /tmp/qnbd.sock /dev/nbd0 -b 4096 >/dev/null 2>&1
    all nbd-qcow2 /dev/nbd0
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
    killall qemu-nbd
    rm -f /tmp/bench-n.qcow2
  fi
else
  echo "bench: nbdkit is not in the image (make bench-deps), nbd skipped"
fi

# stats DEVICE FILE: a server's counters (requests per batch: per call).
stats() {
  echo "==== stats $1"
  cat "$2"
  echo
  echo "==== end"
}

# serve NAME N SERVER-ARGS...: every job on /dev/abuseN served by
# `abusectl server /dev/abctlN SERVER-ARGS`, then its counters; the device
# is reset afterwards.
serve() {
  name=$1 n=$2
  shift 2
  abusectl server "/dev/abctl$n" "$@" --setup qs=128 --stats-file "/tmp/$name.stats" &
  pid=$!
  sleep 1
  all "$name" "/dev/abuse$n"
  kill -TERM $pid
  wait $pid
  stats "$name" "/tmp/$name.stats"
  abusectl reset "/dev/abctl$n"
}

# ABUSE: one hardware queue per CPU (2, as rublk's -q 2), one worker each.
abusectl server /dev/abctl1 null 256M --setup qs=128 --stats-file /tmp/null.stats &
ns=$!
abusectl server /dev/abctl0 file /tmp/bench.img --setup qs=128 --stats-file /tmp/file.stats &
fs=$!
sleep 1
all abuse-null /dev/abuse1
all abuse-file /dev/abuse0
kill -TERM $fs $ns
wait $fs $ns
stats abuse-null /tmp/null.stats
stats abuse-file /tmp/file.stats
abusectl reset /dev/abctl0
abusectl reset /dev/abctl1
dd if=/dev/zero of=/tmp/cow-base.img bs=1M count=256 2>/dev/null
abusectl cow create --base /tmp/cow-base.img --delta /tmp/bench.cow --block-size 64K
serve abuse-cow 0 cow /tmp/bench.cow
rm -f /tmp/bench.cow /tmp/cow-base.img
qemu-img create -q -f qcow2 /tmp/bench-a.qcow2 256M
serve abuse-qcow2 0 qcow2 /tmp/bench-a.qcow2
rm -f /tmp/bench-a.qcow2

# ABUSE's nbd backend in front of the same nbdkit memory export the
# kernel's nbd client used above.
if [ -x /usr/bin/nbdkit ]; then
  nbdkit -U /tmp/nbd-a.sock --threads 4 memory 256M
  serve abuse-nbd 1 nbd unix:/tmp/nbd-a.sock
  killall nbdkit
fi

# Durability costs on a virtio disk (cache=none): 4 KiB cow blocks, so
# every write of the first pass is a first write (a copy-on-write whose
# mapping a FLUSH commits); the second pass rewrites in the same order
# (fio's default seed: for cow, the delta blocks in the order they were
# taken, so nearly sequential on disk), the third in another order; the
# file server does the same passes over a file on the same disk.
if [ -b /dev/vda ]; then
  /sbin/mke2fs -q -t ext4 -F /dev/vda && mkdir -p /vd && mount /dev/vda /vd
  dd if=/dev/zero of=/vd/cow-base.img bs=1M count=64 2>/dev/null
  abusectl cow create --base /vd/cow-base.img --delta /vd/bench.cow --block-size 4K
  abusectl server /dev/abctl0 cow /vd/bench.cow --setup qs=128 &
  cs=$!
  sleep 1
  pass abuse-cow first-writes /dev/abuse0
  pass abuse-cow rewrites /dev/abuse0
  pass abuse-cow rewrites-other-order /dev/abuse0 --randseed=4242
  kill -TERM $cs
  wait $cs
  abusectl reset /dev/abctl0
  dd if=/dev/zero of=/vd/file.img bs=1M count=64 2>/dev/null
  abusectl server /dev/abctl0 file /vd/file.img --setup qs=128 &
  fs=$!
  sleep 1
  pass abuse-file first-writes /dev/abuse0
  pass abuse-file rewrites /dev/abuse0
  pass abuse-file rewrites-other-order /dev/abuse0 --randseed=4242
  kill -TERM $fs
  wait $fs
  abusectl reset /dev/abctl0
  umount /vd
fi
echo "bench: done"
