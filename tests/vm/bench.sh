#!/bin/sh
# make bench: runs inside the VM (the bench kernel). The same fio jobs on
# ABUSE's servers and on the peers a user would otherwise pick, in one boot,
# in groups of devices that are compared and set up at the same time:
#   null:  ABUSE null, null_blk, ublk null (rublk)
#   file:  ABUSE file, loop (direct I/O), ublk loop, all on one file; ABUSE
#          cow (one run per job, no target)
#   nbd:   ABUSE's nbd backend, the kernel's nbd client, each in front of an
#          nbdkit memory export over a unix socket
#   qcow2: ABUSE qcow2 against rublk's qcow2 on fresh images, in every
#          condition the target must hold in (see "qcow2" below)
#   virtio: cow and file passes with real fsync costs (cache=none)
# Within a group the main jobs (4k randread and randwrite QD32x2, and the
# null group's QD1) run in a palindrome, A B C C B A: every device's mean
# position in the sequence is the same, so a drift over it cancels in each
# pair's ratios, and each device runs each job twice (rep=1, rep=2). The
# other jobs (QD1, 128k read and write) run once per device, the order
# reversed from one job to the next.
#
# Each result is fio's JSON between "==== bench DEVICE JOB [cond=C] rep=N"
# and "==== end"; results of one (JOB, cond) with the same rep on two devices
# are a pair. The host's abuse-bench turns them into the table (each pair's
# median ratio and spread), the targets (judged on the worst condition), the
# JSON and the chart.
#
# Budget (BENCH_RUNTIME=8 s per fio job, make bench's --timeout 1500 s, the
# guest is killed 60 s before): 60 jobs in the null, file and nbd groups,
# 56 in qcow2's 12 conditions (each job with a new image and server), 6
# virtio passes: 1055 s measured in one boot (null 195, file 200, nbd 120,
# qcow2 514, virtio passes 27). A qcow2 condition that would not finish
# before the guest's deadline is skipped and said so (its target then
# reads "not measured").
FIO=/usr/bin/fio
RUNTIME=${BENCH_RUNTIME:-8}
SIZE=256M
START=$(cut -d. -f1 /proc/uptime)
# When the guest is killed (init's timeout), in this script's seconds.
DEADLINE=$((${ABUSE_GUEST_TIMEOUT:-1500} - 20))

elapsed() { echo $(($(cut -d. -f1 /proc/uptime) - START)); }

# room SECONDS: true if that much work still fits before the deadline.
room() { [ $(($(elapsed) + $1)) -lt $DEADLINE ]; }

# job DEVICE JOB PATH REP [COND [FIO-SIZE]]: one fio job on PATH.
job() {
  case $2 in
    randread) args="--rw=randread --bs=4k --iodepth=32 --numjobs=2" ;;
    randwrite) args="--rw=randwrite --bs=4k --iodepth=32 --numjobs=2" ;;
    qd1) args="--rw=randread --bs=4k --iodepth=1 --numjobs=1" ;;
    seqread) args="--rw=read --bs=128k --iodepth=16 --numjobs=1" ;;
    seqwrite) args="--rw=write --bs=128k --iodepth=16 --numjobs=1" ;;
  esac
  if [ ! -b "$3" ]; then
    echo "bench: $1: $3 is not there, $2 skipped"
    return
  fi
  echo "==== bench $1 $2${5:+ cond=$5} rep=$4"
  $FIO --name=b --filename="$3" $args --ioengine=libaio --direct=1 --size="${6:-$SIZE}" \
    --time_based --runtime="$RUNTIME" --group_reporting --thread --output-format=json ||
    echo "bench: $1 $2 failed"
  echo "==== end"
}

# abba JOB NAME=PATH...: JOB on each device in turn, then again in the
# reverse order (A B C C B A): rep=1, then rep=2.
abba() {
  j=$1
  shift
  rev=""
  for d in "$@"; do
    job "${d%%=*}" "$j" "${d#*=}" 1
    rev="$d $rev"
  done
  for d in $rev; do job "${d%%=*}" "$j" "${d#*=}" 2; done
}

# once JOB NAME=PATH...: JOB once on each device, in the order given.
once() {
  j=$1
  shift
  for d in "$@"; do job "${d%%=*}" "$j" "${d#*=}" 1; done
}

# once_rev JOB NAME=PATH...: the same, in the reverse order.
once_rev() {
  j=$1
  shift
  rev=""
  for d in "$@"; do rev="$d $rev"; done
  # shellcheck disable=SC2086
  once "$j" $rev
}

# pass DEVICE JOB PATH [FIO-ARGS]: 4k random writes covering 64 MiB once,
# an fsync (a FLUSH) every 32 writes.
pass() {
  echo "==== bench $1 $2 rep=1"
  $FIO --name=p --filename="$3" --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
    --iodepth=32 --numjobs=1 --size=64M --fsync=32 $4 --group_reporting --thread --output-format=json ||
    echo "bench: $1 $2 failed"
  echo "==== end"
}

# sized DEVICE: waits until /dev/DEVICE has a size (its server set it up).
sized() {
  i=0
  while [ "$(cat "/sys/block/$1/size" 2>/dev/null || echo 0)" = 0 ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
}

# stats DEVICE FILE: a server's counters (requests per batch: per call).
stats() {
  echo "==== stats $1"
  cat "$2"
  echo
  echo "==== end"
}

# serve N STATS SERVER-ARGS...: `abusectl server /dev/abctlN SERVER-ARGS`
# in the background (its pid in $pid), once /dev/abuseN has its size.
serve() {
  n=$1 st=$2
  shift 2
  abusectl server "/dev/abctl$n" "$@" --setup qs=128 --stats-file "$st" &
  pid=$!
  sized "abuse$n"
}

# unserve N PID: stops the server PID of /dev/abuseN and resets the device.
unserve() {
  kill -TERM "$2"
  wait "$2"
  abusectl reset "/dev/abctl$1"
}

# section NAME: where the time goes, in the log.
section() { echo "bench: $1 at $(elapsed) s"; }

# ABUSE: one hardware queue per CPU (2, as rublk's -q 2), one worker each.
# /dev/abuse0: file, nbd, qcow2; 1: null (and idle null); 2: cow (and
# idle file); 3: the virtio pass's file server.
insmod /lib/abuse/abuse.ko max_abuse=4
have_rublk=""
if [ -x /usr/bin/rublk ]; then
  insmod "$(find /lib/modules -name ublk_drv.ko | head -1)" 2>/dev/null
  have_rublk=1
else
  echo "bench: rublk is not in the image (make bench-deps), ublk skipped"
fi

# rublk_add TARGET ARGS...: a rublk device (/dev/ublkb0), once it is sized.
rublk_add() {
  [ -n "$have_rublk" ] || return 0
  rublk add "$@" --quiet >/dev/null 2>&1
  sized ublkb0
}

rublk_del() {
  [ -n "$have_rublk" ] || return 0
  rublk del -a >/dev/null 2>&1
  sleep 1
}

# ---- null: ABUSE null, null_blk, ublk null (2 queues, as many as CPUs).
section null
insmod "$(find /lib/modules -name null_blk.ko | head -1)" gb=1 bs=4096 queue_mode=2 irqmode=0 2>/dev/null
rublk_add null -q 2 -d 128
serve 1 /tmp/null.stats null 256M
ns=$pid
set -- abuse-null=/dev/abuse1 null_blk=/dev/nullb0 ublk-null=/dev/ublkb0
abba randread "$@"
abba randwrite "$@"
# QD1 p50 has a target against ublk null: twice each there.
abba qd1 abuse-null=/dev/abuse1 ublk-null=/dev/ublkb0
once qd1 null_blk=/dev/nullb0
once_rev seqread "$@"
once seqwrite "$@"
unserve 1 $ns
stats abuse-null /tmp/null.stats
rublk_del

# ---- file: ABUSE file, loop (direct I/O), ublk loop, on one file; then
# ABUSE cow (a 256 MiB base, 64 KiB blocks) once per random job.
section file
dd if=/dev/zero of=/tmp/bench.img bs=1M count=256 2>/dev/null
loop=$(/sbin/losetup -f --show --direct-io=on /tmp/bench.img)
rublk_add loop -q 2 -d 128 -f /tmp/bench.img
serve 0 /tmp/file.stats file /tmp/bench.img
fs=$pid
dd if=/dev/zero of=/tmp/cow-base.img bs=1M count=256 2>/dev/null
abusectl cow create --base /tmp/cow-base.img --delta /tmp/bench.cow --block-size 64K
serve 2 /tmp/cow.stats cow /tmp/bench.cow
cs=$pid
set -- abuse-file=/dev/abuse0 loop="$loop" ublk-loop=/dev/ublkb0
abba randread "$@"
abba randwrite "$@"
once randread abuse-cow=/dev/abuse2
once randwrite abuse-cow=/dev/abuse2
once qd1 "$@"
once_rev seqread "$@"
once seqwrite "$@"
unserve 0 $fs
unserve 2 $cs
stats abuse-file /tmp/file.stats
stats abuse-cow /tmp/cow.stats
/sbin/losetup -d "$loop"
rublk_del
rm -f /tmp/bench.img /tmp/bench.cow /tmp/cow-base.img

# ---- nbd: ABUSE's nbd backend and the kernel's nbd client, each in front
# of its own nbdkit memory export (256 MiB, 4 threads, unix socket).
section nbd
if [ -x /usr/bin/nbdkit ]; then
  insmod "$(find /lib/modules -name nbd.ko | head -1)" nbds_max=2 2>/dev/null
  nbdkit -U /tmp/nbd-m.sock --threads 4 memory 256M
  nbd-client -unix /tmp/nbd-m.sock /dev/nbd0 -b 4096 >/dev/null 2>&1
  nbdkit -U /tmp/nbd-a.sock --threads 4 memory 256M
  serve 0 /tmp/nbd.stats nbd unix:/tmp/nbd-a.sock
  bs=$pid
  set -- abuse-nbd=/dev/abuse0 nbd-memory=/dev/nbd0
  abba randread "$@"
  abba randwrite "$@"
  once qd1 "$@"
  once_rev seqread "$@"
  once seqwrite "$@"
  unserve 0 $bs
  stats abuse-nbd /tmp/nbd.stats
  nbd-client -d /dev/nbd0 >/dev/null 2>&1
  killall nbdkit
else
  echo "bench: nbdkit is not in the image (make bench-deps), nbd skipped"
fi

# ---- qcow2: allocating writes, ABUSE (/dev/abuse0) against rublk's qcow2
# target (one queue: "qcow2 doesn't support MQ yet"), a fresh image for
# every job (a write job allocates the whole image within seconds), one
# server alive at a time. The conditions, each with 64 KiB and 4 KiB
# clusters:
#   SIZE-CLUSTER-alone   images in /tmp (tmpfs), no other server alive;
#                        the 1 GiB images written over their first 512 MiB
#                        only (fio --size): a whole 1 GiB image in the 2 GiB
#                        guest's RAM starves it
#   SIZE-CLUSTER-others  the same, with an ABUSE null (/dev/abuse1) and
#                        file (/dev/abuse2) server alive and idle
#   SIZE-CLUSTER-virtio  images on /vd, the virtio disk (cache=none), no
#                        other server alive; 1 GiB images written whole
# Each condition: randwrite in the order A B B A (ABUSE first in one
# condition, rublk first in the next), with a randread of the fresh image
# (zeros) before the writes of the first two in the "alone" conditions.

# qcow2_one NAME SIZE CLUSTER DIR COND REP FIO-SIZE JOBS...: a fresh image
# DIR/q.qcow2 served by NAME (abuse-qcow2 or ublk-qcow2), JOBS on it.
qcow2_one() {
  name=$1 qsize=$2 cluster=$3 dir=$4 cond=$5 rep=$6 fsize=$7
  shift 7
  img=$dir/q.qcow2
  qemu-img create -q -f qcow2 -o cluster_size="$cluster" "$img" "$qsize"
  if [ $name = abuse-qcow2 ]; then
    serve 0 /tmp/qcow2.stats qcow2 "$img"
    qs=$pid
    dev=/dev/abuse0
  else
    rublk_add qcow2 -q 1 -d 128 -f "$img"
    dev=/dev/ublkb0
  fi
  for j in "$@"; do job $name "$j" $dev "$rep" "$cond" "$fsize"; done
  if [ $name = abuse-qcow2 ]; then
    unserve 0 $qs
    stats abuse-qcow2 /tmp/qcow2.stats
  else
    rublk_del
  fi
  rm -f "$img"
}

# qcow2_cond SIZE CLUSTER DIR KIND FIO-SIZE: one condition's A B B A,
# ABUSE first in every other condition; skipped if it (and the virtio
# passes after it) would not end before the deadline.
nconds=0
qcow2_cond() {
  cond=$1-$2-$4
  a=abuse-qcow2 b=ublk-qcow2
  [ $((nconds % 2)) = 1 ] && a=ublk-qcow2 b=abuse-qcow2
  nconds=$((nconds + 1))
  if ! room $((4 * (RUNTIME + 5) + 2 * RUNTIME + 90)); then
    echo "bench: qcow2 $cond skipped: no time left ($(elapsed) s of $DEADLINE)"
    return
  fi
  first="randwrite"
  [ "$4" = alone ] && first="randread randwrite"
  # shellcheck disable=SC2086
  qcow2_one $a "$1" "$2" "$3" "$cond" 1 "$5" $first
  # shellcheck disable=SC2086
  qcow2_one $b "$1" "$2" "$3" "$cond" 1 "$5" $first
  qcow2_one $b "$1" "$2" "$3" "$cond" 2 "$5" randwrite
  qcow2_one $a "$1" "$2" "$3" "$cond" 2 "$5" randwrite
}

section qcow2-alone
for c in 64K 4K; do
  qcow2_cond 256M $c /tmp alone 256M
  qcow2_cond 1G $c /tmp alone 512M
done

section qcow2-others
dd if=/dev/zero of=/tmp/idle.img bs=1M count=64 2>/dev/null
serve 1 /tmp/idle-null.stats null 256M
in=$pid
serve 2 /tmp/idle-file.stats file /tmp/idle.img
idf=$pid
for c in 64K 4K; do
  qcow2_cond 256M $c /tmp others 256M
  qcow2_cond 1G $c /tmp others 512M
done
unserve 1 $in
unserve 2 $idf
rm -f /tmp/idle.img

if [ -b /dev/vda ]; then
  # Inode tables and journal written now, not by ext4lazyinit during the runs.
  /sbin/mke2fs -q -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 -F /dev/vda && mkdir -p /vd && mount /dev/vda /vd
  section qcow2-virtio
  for c in 64K 4K; do
    qcow2_cond 256M $c /vd virtio 256M
    qcow2_cond 1G $c /vd virtio 1G
  done

  # ---- virtio: durability costs on the virtio disk (cache=none), cow and
  # file servers alive together, their passes interleaved. 4 KiB cow
  # blocks, so every write of the first pass is a first write (a
  # copy-on-write whose mapping a FLUSH commits); the second pass rewrites
  # in the same order (fio's default seed: for cow, the delta blocks in the
  # order they were taken, so nearly sequential on disk), the third in
  # another order; the file server does the same passes over a file on the
  # same disk.
  section virtio
  dd if=/dev/zero of=/vd/cow-base.img bs=1M count=64 2>/dev/null
  abusectl cow create --base /vd/cow-base.img --delta /vd/bench.cow --block-size 4K
  dd if=/dev/zero of=/vd/file.img bs=1M count=64 2>/dev/null
  serve 0 /tmp/vcow.stats cow /vd/bench.cow
  cs=$pid
  serve 3 /tmp/vfile.stats file /vd/file.img
  fs=$pid
  pass abuse-cow first-writes /dev/abuse0
  pass abuse-file first-writes /dev/abuse3
  pass abuse-file rewrites /dev/abuse3
  pass abuse-cow rewrites /dev/abuse0
  pass abuse-cow rewrites-other-order /dev/abuse0 --randseed=4242
  pass abuse-file rewrites-other-order /dev/abuse3 --randseed=4242
  unserve 0 $cs
  unserve 3 $fs
  umount /vd
else
  echo "bench: no virtio disk (run.sh --disk), qcow2 virtio and the passes skipped"
fi
echo "bench: done in $(elapsed) s (fio runtime ${RUNTIME} s)"
