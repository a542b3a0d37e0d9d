#!/bin/sh
# make demo: runs inside the VM. A 1 GiB device backed by a file, served by
# abusectl's file server, formatted, mounted, used and measured.
set -e
step() { echo; echo "demo: ---- $* ----"; }
MKFS=/sbin/mke2fs FIO=/usr/bin/fio

step "insmod abuse.ko (8 devices)"
insmod /lib/abuse/abuse.ko
abusectl list

step "a 1 GiB sparse backing file; abusectl setup /dev/abctl0 size=1G,flush,fua,discard,write_zeroes"
truncate -s 1G /tmp/disk.img
abusectl setup /dev/abctl0 size=1G,flush,fua,discard,write_zeroes

step "abusectl server /dev/abctl0 file /tmp/disk.img --threads 4 &"
abusectl server /dev/abctl0 file /tmp/disk.img --threads 4 --stats-file /tmp/server.json &
server=$!
sleep 1

step "mkfs.ext4 /dev/abuse0 && mount /dev/abuse0 /mnt"
$MKFS -t ext4 -q /dev/abuse0
mount /dev/abuse0 /mnt
df -h /mnt

step "write files, read them back"
cp -r /bin /mnt/bin-copy
dd if=/dev/urandom of=/mnt/random bs=1M count=32 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt && ls -la && md5sum random)
test "$(ls /mnt/bin-copy | wc -l)" = "$(ls /bin | wc -l)"

step "abusectl info /dev/abctl0"
abusectl info /dev/abctl0

step "abusectl list"
abusectl list

step "fio: 10 s of 4k random read/write on a file in the filesystem"
$FIO --name=demo --filename=/mnt/fio.dat --size=128M --rw=randrw --bs=4k --ioengine=libaio \
  --direct=1 --iodepth=16 --numjobs=2 --time_based --runtime=10 --group_reporting | grep -E 'IOPS|err='

step "umount; stop the server (SIGTERM); abusectl reset; rmmod"
umount /mnt
kill -TERM $server
wait $server
echo "server counters: $(cat /tmp/server.json)"
abusectl reset /dev/abctl0
rmmod abuse
step "done"
