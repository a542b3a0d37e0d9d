#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0 OR MIT
"""A ramdisk server for an ABUSE device, with abuse.py (standard library only).

    ramdisk.py CTL STORE [SIZE]    e.g. ramdisk.py /dev/abctl0 /dev/shm/ram0 64M

Sets the device up with SIZE (bytes, or K/M/G) unless it already is, and
serves it from STORE, a shared-memory file mapped MAP_SHARED: a write is in
it before it is acknowledged, so a kill -9 loses nothing and a server
restarted on the same STORE finds the data (it lasts until a reboot; FLUSH
has nothing more to do). Two threads loop on SERVE; SIGINT/SIGTERM stop
them after they complete what they hold. Exits 1 with a message on errors.
"""
import ctypes, errno, mmap, os, signal, sys, threading
import abuse

FEATURES = abuse.ABUSE_FLAG_FLUSH | abuse.ABUSE_FLAG_DISCARD | abuse.ABUSE_FLAG_WRITE_ZEROES
BIO = ctypes.sizeof(abuse.Bio)
stop, failures = threading.Event(), []


def fail(why):
    failures.append(why)
    stop.set()


def worker(ctl, queue, base, gen, max_bytes, batch=16):
    bios, data, held = (abuse.Bio * batch)(), abuse.Buffer(batch * (max_bytes + 4096)), 0
    while not stop.is_set():
        try:
            n = ctl.serve(bios, held, data, queue=queue, wait_ms=500)
        except abuse.Error as e:  # a request reset under us is dropped; the rest retried
            if e.errno not in (errno.ESTALE, errno.EINTR, errno.EAGAIN, errno.EBUSY):
                return fail(e.strerror)
            skip = e.done + (e.errno == errno.ESTALE)
            ctypes.memmove(bios, ctypes.byref(bios, skip * BIO), (held - skip) * BIO)
            held -= skip
            continue
        if n == 0 and ctl.status().generation != gen:
            return fail(f"{ctl.path}: the device was reset or reconfigured")
        for b in bios[:n]:
            at = base + (b.sector << abuse.ABUSE_SECTOR_SHIFT)
            if b.cmd == abuse.ABUSE_CMD_READ:
                b.addr = at  # the driver copies the data straight from the store
            elif b.cmd == abuse.ABUSE_CMD_WRITE:
                ctypes.memmove(at, b.addr, b.len)
            elif b.cmd in (abuse.ABUSE_CMD_DISCARD, abuse.ABUSE_CMD_WRITE_ZEROES):
                ctypes.memset(at, 0, b.len)
            b.result, b.flags = abuse.ABUSE_RESULT_OKAY, 0  # FLUSH: RAM has nothing to flush
        held = n
    try:
        ctl.put_bio(bios, held)
    except abuse.Error:
        pass  # reset meanwhile, or left to the driver to hand out again


def parse_size(s):
    unit = "KMGT".find(s[-1:].upper()) + 1
    try:
        return int(s[:-1] if unit else s) << 10 * unit
    except ValueError:
        sys.exit(f"ramdisk.py: {s}: not a size (bytes, or a number with K, M, G or T)")


def main(ctl_path, store_path, size=None):
    ctl = abuse.Control(ctl_path)
    st = ctl.status()
    if not st.flags & abuse.ABUSE_FLAG_CONFIGURED:
        if size is None:
            sys.exit(f"ramdisk.py: {ctl_path}: the device is not set up: give a SIZE")
        st = ctl.setup(parse_size(size), flags=FEATURES)
    fd = os.open(store_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    if os.fstat(fd).st_size not in (0, st.size):
        sys.exit(f"ramdisk.py: {store_path} is not {st.size} bytes: another device's store")
    os.ftruncate(fd, st.size)
    store = mmap.mmap(fd, st.size, mmap.MAP_SHARED)
    base = abuse.address(store)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=worker, args=(ctl, q % st.queues, base, st.generation, st.max_bytes))
               for q in range(2)]
    for t in threads:
        t.start()
    print(f"ramdisk.py: serving {ctl_path} ({st.size} bytes) from {store_path}", flush=True)
    while any(t.is_alive() for t in threads):
        stop.wait(0.5)
    for t in threads:
        t.join()
    sys.exit(f"ramdisk.py: {failures[0]}" if failures else 0)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: " + __doc__.split("\n\n")[1].strip())
    try:
        main(*sys.argv[1:])
    except (OSError, ValueError) as e:
        sys.exit(f"ramdisk.py: {e.strerror if isinstance(e, abuse.Error) else e}")
