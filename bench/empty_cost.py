#!/usr/bin/env python3
"""The cost of a spool file's round through the free pool, by how the pool empties it.

  empty_cost.py [DIR] [-n N]

A ring of 200 files of a 2 KiB message's size (6,421 bytes, as a one-file job) is written over
again and again, with a syncfs after every 20 writes, as smtpd's group commit does; each file
is emptied halfway round the ring, as the emptier does a second after delivery:
  none   not emptied (the floor)
  trunc  cut to nothing (freed blocks are allocated again at the next write)
  zero   written over with zeros (qms since stop 28: the blocks stay)
Prints CPU and wall time per round, for each way. Run it on the spool's file system."""
import argparse, ctypes, os, shutil, tempfile, time

libc = ctypes.CDLL("libc.so.6", use_errno=True)
SIZE, RING = 6421, 200

def rounds(d, mode, n):
    data, zeros = os.urandom(SIZE), bytes(SIZE)
    fds = [os.open(os.path.join(d, "f%d" % i), os.O_RDWR | os.O_CREAT, 0o600) for i in range(RING)]
    for fd in fds:
        os.pwrite(fd, data, 0)
    os.sync()
    c0, w0 = time.process_time(), time.monotonic()
    for i in range(n):
        fd = fds[i % RING]
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, SIZE)
        if i % 20 == 19:
            libc.syncfs(fd)
        prev = fds[(i + RING // 2) % RING]
        if mode == "trunc":
            os.ftruncate(prev, 0)
        elif mode == "zero":
            os.pwrite(prev, zeros, 0)
    c, w = time.process_time() - c0, time.monotonic() - w0
    for fd in fds:
        os.close(fd)
    return c * 1000 / n, w * 1000 / n

p = argparse.ArgumentParser()
p.add_argument("dir", nargs="?")
p.add_argument("-n", type=int, default=3000)
a = p.parse_args()
base = a.dir or tempfile.mkdtemp(prefix="empty-cost-", dir=".")
try:
    for mode in ("none", "trunc", "zero", "trunc", "zero"):
        d = os.path.join(base, mode)
        os.makedirs(d, exist_ok=True)
        cpu, wall = rounds(d, mode, a.n)
        print("mode=%s cpu_ms_per_round=%.3f wall_ms_per_round=%.3f" % (mode, cpu, wall))
finally:
    if not a.dir:
        shutil.rmtree(base, ignore_errors=True)
