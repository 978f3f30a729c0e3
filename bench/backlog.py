#!/usr/bin/env python3
"""New mail behind a backlog for a dead host (issue #12).

  backlog.py --qms target/release/qms [-n 100000] [-m 3000] [-s 20] [-r 3]

Starts qms in a new directory (as `nobody` when run as root) with `dead.test` routed to a
port where nothing listens and `bench.test` to a sink, then measures relayed new mail with
../shared/bench/bench.py in three states, R times each: with an empty queue, right after N
messages for the dead host were accepted, and right after a restart with that backlog (a
restart before each of those runs). Prints each figure, the ratios of the medians to the
empty queue's, the smtp workers' memory, and how long `queue list` takes. One run of each
state swung by a fifth between sittings on this machine; medians of three do less so.
"""
import argparse, os, shutil, socket, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.realpath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "bench")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def bench(port, sink, m, sessions):
    out = subprocess.run([sys.executable, os.path.join(SHARED, "bench.py"), "relay", "--port", str(port),
                          "--sink-port", str(sink), "-n", str(m), "-s", str(sessions)],
                         capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr
    figs = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    return float(figs.get("accept_per_s", 0)), float(figs.get("e2e_per_s", 0)), line


def queued(d, queue):
    q = os.path.join(d, "spool", "queue", queue)
    return sum(1 for n in os.listdir(q) if n.endswith(".json"))


def rss_mb(pattern):
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout
    return [int(l.split()[0]) // 1024 for l in out.splitlines() if pattern in l]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--qms", required=True)
    p.add_argument("-n", type=int, default=100000)
    p.add_argument("-m", type=int, default=3000)
    p.add_argument("-s", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the directory (its qms.log) for a look")
    p.add_argument("-r", "--repeat", type=int, default=3,
                   help="runs in each state (a restart before each run after a restart); medians are compared")
    a = p.parse_args()
    qms = os.path.realpath(a.qms)
    d = tempfile.mkdtemp(prefix="qms-backlog-")
    os.chmod(d, 0o755)
    port, sink, dead = free_port(), free_port(), free_port()
    user = 'user = "nobody"\n' if os.geteuid() == 0 else ""
    cfg = os.path.join(d, "qms.toml")
    with open(cfg, "w") as f:
        f.write(f'''spool = "spool"
hostname = "mx.bench.test"
postmaster = "alice@local.test"
{user}[smtp]
listen = ["127.0.0.1:{port}"]
mynetworks = ["127.0.0.0/8"]
[domains]
local = ["local.test"]
relay = ["bench.test", "dead.test"]
[routes]
"bench.test" = "smtp:[127.0.0.1]:{sink}"
"dead.test" = "smtp:[127.0.0.1]:{dead}"
[mailboxes]
"alice@local.test" = {{ maildir = "mail/alice" }}
[limits]
connections_per_client = 200
connections_per_network = 400
[queues.smtp]
workers = 2
''')
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "nobody:nogroup", d], check=True)

    def start():
        proc = subprocess.Popen([qms, "-c", cfg, "start"], stdout=open(os.path.join(d, "qms.log"), "ab"),
                                stderr=subprocess.STDOUT)
        end = time.time() + 30
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        status = os.path.join(d, "spool", "run", "status.json")
        while time.time() < end:
            try:
                if "null" not in open(status).read():
                    break
            except OSError:
                pass
            time.sleep(0.05)
        return proc

    def stop(proc):
        subprocess.run([qms, "-c", cfg, "stop"], capture_output=True)
        proc.wait()

    proc = start()
    try:
        bench(port, sink, a.m, a.s)  # warm-up: the first run also fills the spool's reuse pools
        empties = [bench(port, sink, a.m, a.s) for _ in range(a.repeat)]
        for r in empties:
            print("empty queue:  ", r[2], flush=True)
        t0 = time.monotonic()
        subprocess.run(["smtp-source", "-s", str(a.s), "-m", str(a.n), "-l", "2048", "-f", "sender@bench.test",
                        "-t", "rcpt@dead.test", "127.0.0.1:%d" % port], check=True, capture_output=True)
        print("backlog of %d for dead.test accepted in %.1f s; in queue/smtp now: %d"
              % (a.n, time.monotonic() - t0, queued(d, "smtp")), flush=True)
        behinds = [bench(port, sink, a.m, a.s) for _ in range(a.repeat)]
        for r in behinds:
            print("behind it:    ", r[2], flush=True)
        print("smtp workers' RSS (MB):", rss_mb("deliver --queue smtp"), flush=True)
        t0 = time.monotonic()
        subprocess.run([qms, "-c", cfg, "queue", "list", "--json"], capture_output=True)
        print("queue list --json: %.1f s" % (time.monotonic() - t0), flush=True)
        restarts = []
        for _ in range(a.repeat):
            stop(proc)
            proc = start()
            restarts.append(bench(port, sink, a.m, a.s))
            print("restarted:    ", restarts[-1][2], flush=True)
        print("in queue/smtp: %d" % queued(d, "smtp"))
        med = lambda runs, i: statistics.median(r[i] for r in runs)
        for name, runs in (("behind", behinds), ("restarted", restarts)):
            print("%s/empty (medians of %d): accept %.2f, e2e %.2f"
                  % (name, a.repeat, med(runs, 0) / med(empties, 0), med(runs, 1) / med(empties, 1)))
    finally:
        stop(proc)
        if a.keep:
            print("kept", d)
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
