#!/bin/sh
# make profile: runs inside the VM (the profiling kernel). Where the time of
# the 4k random jobs goes, device by device: fio runs while `perf record`
# samples every CPU (cpu-clock: TCG has no PMU), then the report by
# command, object and symbol. Compare ABUSE's null server with null_blk and
# ublk's null target in the same boot.
FIO=/usr/bin/fio
RUNTIME=${PROFILE_RUNTIME:-6}

# profile NAME PATH RW: fio RW (4k, QD32 x 2) on PATH under perf.
profile() {
  echo "==== profile $1 $3"
  perf record -q -a -e cpu-clock -F 2000 -o /tmp/perf.data -- \
    $FIO --name=p --filename="$2" --rw="$3" --bs=4k --iodepth=32 --numjobs=2 \
    --ioengine=libaio --direct=1 --size=256M --time_based --runtime="$RUNTIME" \
    --group_reporting --thread --output-format=terse --terse-version=3 |
    awk -F';' '{ print "iops read", $8, "write", $49 }'
  perf report -i /tmp/perf.data --stdio --sort comm,dso 2>/dev/null | grep -v '^#' | grep . | head -15
  perf report -i /tmp/perf.data --stdio --sort sym 2>/dev/null | grep -v '^#' | grep . | head -45
  echo "==== end"
}

wait_dev() {
  i=0
  while [ ! -b "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
}

echo 0 >/proc/sys/kernel/kptr_restrict 2>/dev/null
echo -1 >/proc/sys/kernel/perf_event_paranoid 2>/dev/null
insmod /lib/abuse/abuse.ko max_abuse=2
insmod "$(find /lib/modules -name null_blk.ko | head -1)" gb=1 bs=4096 queue_mode=2 irqmode=0
profile null_blk /dev/nullb0 randread

if [ -x /usr/bin/rublk ]; then
  insmod "$(find /lib/modules -name ublk_drv.ko | head -1)"
  rublk add null -q 2 -d 128 --quiet >/dev/null 2>&1
  wait_dev /dev/ublkb0
  profile ublk-null /dev/ublkb0 randread
  profile ublk-null /dev/ublkb0 randwrite
  rublk del -a >/dev/null 2>&1
fi

abusectl server /dev/abctl1 null 256M --setup qs=128 --stats-file /tmp/null.stats &
wait_dev /dev/abuse1
profile abuse-null /dev/abuse1 randread
profile abuse-null /dev/abuse1 randwrite
cat /tmp/null.stats 2>/dev/null
abusectl reset /dev/abctl1
