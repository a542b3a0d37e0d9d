#!/bin/sh
# make bench: runs inside the VM. fio on ABUSE (file and null servers) next
# to the kernel's own loop (same backing file) and null_blk, in one run.
set -e
FIO=/usr/bin/fio
RUNTIME=${BENCH_RUNTIME:-10}

# fio_run NAME DEVICE RW: one line "bench: NAME RW iops=N bw=N KiB/s".
fio_run() {
  out=$($FIO --name=b --filename="$2" --rw="$3" --bs=4k --ioengine=libaio --direct=1 \
    --iodepth=32 --numjobs=2 --size=256M --time_based --runtime="$RUNTIME" \
    --group_reporting --output-format=terse --terse-version=3)
  # terse v3: field 8 read iops, 7 read bw KiB/s; 49 write iops, 48 write bw.
  echo "$out" | awk -F';' -v n="$1" -v rw="$3" \
    '{ printf "bench: %-14s %-10s read %8d IOPS %8d KiB/s   write %8d IOPS %8d KiB/s\n", n, rw, $8, $7, $49, $48 }'
}

insmod /lib/abuse/abuse.ko max_abuse=2
truncate -s 512M /tmp/bench.img
dd if=/dev/zero of=/tmp/bench.img bs=1M count=512 conv=notrunc 2>/dev/null

abusectl server /dev/abctl0 file /tmp/bench.img --threads 4 --setup qs=128 &
fs=$!
abusectl server /dev/abctl1 null 512M --threads 4 --setup qs=128 &
ns=$!
sleep 1
loop=$(/sbin/losetup -f --show --direct-io=on /tmp/bench.img)
modprobe null_blk 2>/dev/null || insmod "$(find /lib/modules -name null_blk.ko | head -1)" gb=1 bs=4096 queue_mode=2 irqmode=0 2>/dev/null || true

for rw in randread randwrite; do
  fio_run abuse-file /dev/abuse0 $rw
  fio_run loop "$loop" $rw
  fio_run abuse-null /dev/abuse1 $rw
  [ -b /dev/nullb0 ] && fio_run null_blk /dev/nullb0 $rw
done

kill -TERM $fs $ns
wait $fs $ns || true

# cow: 4 KiB blocks, so each 4k write to a fresh block is a copy-on-write
# first write. Pass 1 writes every block of 64 MiB once (first writes),
# pass 2 again (rewrites); the file server does the same, for comparison.
# fio_pass NAME DEVICE: one pass of 4k random writes covering 64 MiB once.
fio_pass() {
  out=$($FIO --name=p --filename="$2" --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
    --iodepth=32 --numjobs=1 --size=64M --group_reporting --thread --output-format=terse --terse-version=3)
  echo "$out" | awk -F';' -v n="$1" '{ printf "bench: %-22s randwrite %8d IOPS %8d KiB/s\n", n, $49, $48 }'
}
abusectl reset /dev/abctl0
dd if=/dev/zero of=/tmp/cow-base.img bs=1M count=64 2>/dev/null
abusectl cow create --base /tmp/cow-base.img --delta /tmp/bench.cow --block-size 4K
abusectl server /dev/abctl0 cow /tmp/bench.cow --threads 4 --setup qs=128 &
cs=$!
sleep 1
fio_pass "abuse-cow first writes" /dev/abuse0
fio_pass "abuse-cow rewrites" /dev/abuse0
kill -TERM $cs
wait $cs || true
abusectl reset /dev/abctl0
dd if=/dev/zero of=/tmp/file-base.img bs=1M count=64 2>/dev/null
abusectl server /dev/abctl0 file /tmp/file-base.img --threads 4 --setup qs=128 &
fs=$!
sleep 1
fio_pass "abuse-file pass 1" /dev/abuse0
fio_pass "abuse-file pass 2" /dev/abuse0
kill -TERM $fs
wait $fs || true
abusectl reset /dev/abctl0

# The same passes with the files on a virtio disk (cache=none), where
# fdatasync costs what it costs on a real disk, and an fsync (a FLUSH)
# every 32 writes, so the cow device pays for committing its mappings.
fio_sync() {
  out=$($FIO --name=p --filename="$2" --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
    --iodepth=32 --numjobs=1 --size=64M --fsync=32 --group_reporting --thread --output-format=terse --terse-version=3)
  echo "$out" | awk -F';' -v n="$1" '{ printf "bench: %-34s randwrite %8d IOPS %8d KiB/s\n", n, $49, $48 }'
}
if [ -b /dev/vda ]; then
  /sbin/mke2fs -q -t ext4 -F /dev/vda && mkdir -p /vd && mount /dev/vda /vd
  dd if=/dev/zero of=/vd/cow-base.img bs=1M count=64 2>/dev/null
  abusectl cow create --base /vd/cow-base.img --delta /vd/bench.cow --block-size 4K
  abusectl server /dev/abctl0 cow /vd/bench.cow --threads 4 --setup qs=128 &
  cs=$!
  sleep 1
  fio_sync "abuse-cow first writes (virtio,fsync)" /dev/abuse0
  fio_sync "abuse-cow rewrites (virtio,fsync)" /dev/abuse0
  kill -TERM $cs
  wait $cs || true
  abusectl reset /dev/abctl0
  dd if=/dev/zero of=/vd/file.img bs=1M count=64 2>/dev/null
  abusectl server /dev/abctl0 file /vd/file.img --threads 4 --setup qs=128 &
  fs=$!
  sleep 1
  fio_sync "abuse-file pass 1 (virtio,fsync)" /dev/abuse0
  fio_sync "abuse-file pass 2 (virtio,fsync)" /dev/abuse0
  kill -TERM $fs
  wait $fs || true
  abusectl reset /dev/abctl0
  umount /vd
fi
/sbin/losetup -d "$loop"
abusectl reset /dev/abctl1
echo "bench: done"
