#!/usr/bin/env python3
"""New mail behind a backlog for a dead host (issue #12).

  backlog.py --qms target/release/qms [-n 100000] [-m 3000] [-s 20] [-r 3] [--dead-queue NAME]

Starts qms in a new directory (as `nobody` when run as root) with `dead.test` routed to a
port where nothing listens and `bench.test` to a sink, then measures relayed new mail with
../shared/bench/bench.py in three states, R times each: with an empty queue, right after N
messages for the dead host were accepted, and right after a restart with that backlog (a
restart before each of those runs). Prints each figure, the ratios of the medians to the
empty queue's, the smtp workers' memory, and how long `queue list` takes.

With --dead-queue NAME, dead.test goes through a named queue of its own (`smtp@NAME`, one
worker), so its backlog is served by workers of its own as well as kept out of the
directory new mail passes through (which deferred/QUEUE/ does by itself).

The empty queue is a second instance, started alongside with the same configuration and
never given the backlog; it is measured next to every run of the first, in turn, so the
machine's drift through the sitting (a fifth between runs minutes apart on this machine)
falls on both sides of each ratio.
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
    """Jobs of `queue`: new ones in queue/QUEUE/, waiting ones in deferred/QUEUE/."""
    dirs = [os.path.join(d, "spool", area, queue) for area in ("queue", "deferred")]
    return sum(1 for q in dirs if os.path.isdir(q) for n in os.listdir(q) if n.endswith(".json"))


def rss_mb(pattern):
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout
    return [int(l.split()[0]) // 1024 for l in out.splitlines() if pattern in l]


class Instance:
    """One qms in a directory of its own, relaying bench.test to `sink`, dead.test to `dead`."""

    def __init__(self, qms, sink, dead, dead_queue=None):
        self.qms = qms
        self.dir = tempfile.mkdtemp(prefix="qms-backlog-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.cfg = os.path.join(self.dir, "qms.toml")
        user = 'user = "nobody"\n' if os.geteuid() == 0 else ""
        via = f"@{dead_queue}" if dead_queue else ""
        own = f"[queues.{dead_queue}]\nworkers = 1\n" if dead_queue else ""
        with open(self.cfg, "w") as f:
            f.write(f'''spool = "spool"
hostname = "mx.bench.test"
postmaster = "alice@local.test"
{user}[smtp]
listen = ["127.0.0.1:{self.port}"]
mynetworks = ["127.0.0.0/8"]
[domains]
local = ["local.test"]
relay = ["bench.test", "dead.test"]
[routes]
"bench.test" = "smtp:[127.0.0.1]:{sink}"
"dead.test" = "smtp:[127.0.0.1]:{dead}{via}"
[mailboxes]
"alice@local.test" = {{ maildir = "mail/alice" }}
[limits]
connections_per_client = 200
connections_per_network = 400
[queues.smtp]
workers = 2
{own}''')
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "nobody:nogroup", self.dir], check=True)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.qms, "-c", self.cfg, "start"],
                                     stdout=open(os.path.join(self.dir, "qms.log"), "ab"),
                                     stderr=subprocess.STDOUT)
        end = time.time() + 30
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        status = os.path.join(self.dir, "spool", "run", "status.json")
        while time.time() < end:
            try:
                if "null" not in open(status).read():
                    break
            except OSError:
                pass
            time.sleep(0.05)

    def stop(self):
        if self.proc:
            subprocess.run([self.qms, "-c", self.cfg, "stop"], capture_output=True)
            self.proc.wait()
            self.proc = None

    def remove(self, keep):
        self.stop()
        if keep:
            print("kept", self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--qms", required=True)
    p.add_argument("-n", type=int, default=100000)
    p.add_argument("-m", type=int, default=3000)
    p.add_argument("-s", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the directories (their qms.log) for a look")
    p.add_argument("--dead-queue", metavar="NAME",
                   help="route dead.test through the named queue NAME (its backlog in queue/NAME/)")
    p.add_argument("-r", "--repeat", type=int, default=3,
                   help="runs in each state (a restart before each run after a restart); medians are compared")
    a = p.parse_args()
    qms = os.path.realpath(a.qms)
    sink, dead = free_port(), free_port()
    ref, q = Instance(qms, sink, dead, a.dead_queue), Instance(qms, sink, dead, a.dead_queue)
    backlog_q = a.dead_queue or "smtp"
    run = lambda i: bench(i.port, sink, a.m, a.s)
    try:
        for i in (ref, q):
            i.start()
            run(i)  # warm-up: the first run also fills the spool's reuse pools
        # Before the backlog both are empty: their ratio says how alike two instances are.
        empties, sames, behinds, refs_b, restarts, refs_r = [], [], [], [], [], []
        for _ in range(a.repeat):
            empties.append(run(ref))
            print("empty queue:  ", empties[-1][2], flush=True)
            sames.append(run(q))
            print("this one, empty:", sames[-1][2], flush=True)
        t0 = time.monotonic()
        subprocess.run(["smtp-source", "-s", str(a.s), "-m", str(a.n), "-l", "2048", "-f", "sender@bench.test",
                        "-t", "rcpt@dead.test", "127.0.0.1:%d" % q.port], check=True, capture_output=True)
        print("backlog of %d for dead.test accepted in %.1f s; jobs of queue %s now: %d"
              % (a.n, time.monotonic() - t0, backlog_q, queued(q.dir, backlog_q)), flush=True)
        for _ in range(a.repeat):
            refs_b.append(run(ref))
            print("empty queue:  ", refs_b[-1][2], flush=True)
            behinds.append(run(q))
            print("behind it:    ", behinds[-1][2], flush=True)
        print("smtp workers' RSS (MB):", rss_mb(q.cfg + " deliver --queue smtp"), flush=True)
        t0 = time.monotonic()
        subprocess.run([qms, "-c", q.cfg, "queue", "list", "--json"], capture_output=True)
        print("queue list --json: %.1f s" % (time.monotonic() - t0), flush=True)
        for _ in range(a.repeat):
            refs_r.append(run(ref))
            print("empty queue:  ", refs_r[-1][2], flush=True)
            q.stop()
            q.start()
            restarts.append(run(q))
            print("restarted:    ", restarts[-1][2], flush=True)
        print("jobs of queue %s: %d" % (backlog_q, queued(q.dir, backlog_q)))
        med = lambda runs, i: statistics.median(r[i] for r in runs)
        for name, runs, refs in (("both empty", sames, empties), ("behind", behinds, refs_b),
                                 ("restarted", restarts, refs_r)):
            print("%s/empty (medians of %d, each run next to one of the empty instance): accept %.2f, e2e %.2f"
                  % (name, len(runs), med(runs, 0) / med(refs, 0), med(runs, 1) / med(refs, 1)))
    finally:
        ref.remove(a.keep)
        q.remove(a.keep)


if __name__ == "__main__":
    main()
