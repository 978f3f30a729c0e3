#!/usr/bin/env python3
"""CPU per message per role: qms's processes' CPU time around one bench.py run.

  cpu_per_role.py [--settle] CONFIG -- bench.py relay --port 2525 --sink-port 13026 -n 5000 -s 20

Reads utime+stime of every process whose command line names CONFIG (and their threads'
totals, which /proc/PID/stat includes) before and after the run, and prints milliseconds
of CPU per message for each role, user and system time apart.

With --settle the second reading waits until the processes have been idle for half a
second (at most 30 s): what a run leaves to do in the background (retired files emptied,
events ingested) is counted with it instead of slowing the next run.
"""
import os, subprocess, sys, time

settle = "--settle" in sys.argv[1:sys.argv.index("--")]
cfg = [a for a in sys.argv[1:sys.argv.index("--")] if a != "--settle"][0]
cmd = sys.argv[sys.argv.index("--") + 1:]
tick = os.sysconf("SC_CLK_TCK")


def snapshot():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            argv = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
            stat = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if cfg not in args:
            continue
        i = args.index(cfg)
        role = " ".join(args[i + 1:i + 4]) if args[i + 1:i + 2] == ["deliver"] else " ".join(args[i + 1:i + 2])
        out[pid] = (role, int(stat[11]), int(stat[12]))
    return out


def busy(snap):
    return sum(u + s for _, u, s in snap.values())


def settled():
    """A snapshot once the processes used no CPU for 0.5 s (five readings alike)."""
    end = time.monotonic() + 30
    snap = snapshot()
    same = 0
    while same < 5 and time.monotonic() < end:
        time.sleep(0.1)
        nxt = snapshot()
        same = same + 1 if busy(nxt) == busy(snap) else 0
        snap = nxt
    return snap


before = settled() if settle else snapshot()
r = subprocess.run(cmd, capture_output=True, text=True)
after = settled() if settle else snapshot()
print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr)
n = next(int(kv.split("=")[1]) for kv in r.stdout.split() if kv.startswith("n="))
roles = {}
for pid, (role, u, s) in after.items():
    u0, s0 = before.get(pid, (role, 0, 0))[1:]
    ru, rs = roles.get(role, (0, 0))
    roles[role] = (ru + u - u0, rs + s - s0)
tu = ts = 0
for role, (u, s) in sorted(roles.items()):
    tu, ts = tu + u, ts + s
    print("%-22s user %.3f ms/msg  system %.3f ms/msg" % (role, 1000 * u / tick / n, 1000 * s / tick / n))
print("%-22s user %.3f ms/msg  system %.3f ms/msg" % ("all", 1000 * tu / tick / n, 1000 * ts / tick / n))
