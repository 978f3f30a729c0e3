#!/usr/bin/env python3
"""The cost of tracked sending on the relay rate: the same qms, the same load, messages with and
without the tracked-sending fields (X-B-CrossRef, delivery and non-delivery requests, VERP
envelope), in alternating rounds; prints the median of each and the ratio tracked/untracked.

  bench/tracked.py [--qms target/release/qms] [-n 3000] [-s 20] [--rounds 3]

Needs smtp-sink (Debian package postfix) and the smtp_load example:
  cargo build --release --bin qms --example smtp_load -p qms-incoming -p qms
"""
import argparse, os, re, signal, socket, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.realpath(__file__))
TRACKED = """X-B-CrossRef: bench-{i}
BX-Delivery-Notification-Req-To: reports@example.test
BX-Non-Delivery-Notification-Req-To: bounces@example.test
X-B-Non-Delivery-Notification-Actions: notify-co-recipients
"""

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        time.sleep(0.01)
    sys.exit("timed out waiting for " + what)

def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False

def sink_count(path):
    with open(path, "rb") as f:
        f.seek(0, 2); size = f.tell(); f.seek(max(0, size - 200))
        found = re.findall(rb"mesg=(\d+)", f.read())
    return int(found[-1]) if found else 0

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--qms", default=os.path.join(HERE, "..", "target", "release", "qms"))
    p.add_argument("--load", default=os.path.join(HERE, "..", "target", "release", "examples", "smtp_load"))
    p.add_argument("-n", type=int, default=3000)
    p.add_argument("-s", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="qms-tracked-")
    os.chmod(tmp, 0o755)
    port, sink_port = free_port(), free_port()
    user = 'user = "nobody"\n' if os.geteuid() == 0 else ""
    open(os.path.join(tmp, "qms.toml"), "w").write(f"""spool = "spool"
hostname = "mx.example.test"
postmaster = "postmaster@example.test"
{user}[smtp]
listen = ["127.0.0.1:{port}"]
mynetworks = ["127.0.0.0/8"]
[submission]
listen = ["127.0.0.1:{free_port()}"]
[domains]
local = ["example.test"]
relay = ["bench.test"]
[routes]
"bench.test" = "smtp:[127.0.0.1]:{sink_port}"
[mailboxes]
"postmaster@example.test" = {{ maildir = "mail/postmaster" }}
"envelope@example.test" = {{ maildir = "mail/envelope" }}
[tracking]
envelope = "envelope@example.test"
key = "a-benchmark-key-of-enough-length"
envelope_maildir = "mail/envelope"
""")
    open(os.path.join(tmp, "tracked.hdr"), "w").write(TRACKED)
    open(os.path.join(tmp, "plain.hdr"), "w").write("")
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "nobody:nogroup", tmp], check=True)
    out = os.path.join(tmp, "sink.out")
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-c", "-u", "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody"),
                             "127.0.0.1:%d" % sink_port, "1000"], stdout=open(out, "wb"), stderr=subprocess.STDOUT)
    qms = subprocess.Popen([a.qms, "-c", os.path.join(tmp, "qms.toml"), "start"],
                           stdout=open(os.path.join(tmp, "qms.log"), "wb"), stderr=subprocess.STDOUT)
    try:
        wait(lambda: listening(port) and listening(sink_port), 20, "qms and the sink")
        results = {"plain": [], "tracked": []}
        total = 0
        for r in range(a.rounds):
            for kind in ("plain", "tracked"):
                t0 = time.monotonic()
                run = subprocess.run([a.load, "--port", str(port), "-n", str(a.n), "-s", str(a.s),
                                      "--headers", os.path.join(tmp, kind + ".hdr")], capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit("smtp_load failed: " + run.stderr[-500:])
                accept = float(re.search(r"accept_per_s=([\d.]+)", run.stdout).group(1))
                total += a.n
                done = wait(lambda: sink_count(out) >= total, 600, "the sink")
                e2e = a.n / (done - t0)
                results[kind].append((accept, e2e))
                print(f"round={r + 1} kind={kind} accept_per_s={accept:.0f} e2e_per_s={e2e:.0f}", flush=True)
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in results.items()}
        print("median plain accept_per_s=%.0f e2e_per_s=%.0f; tracked accept_per_s=%.0f e2e_per_s=%.0f; "
              "ratio tracked/plain accept=%.2f e2e=%.2f" % (*med["plain"], *med["tracked"],
              med["tracked"][0] / med["plain"][0], med["tracked"][1] / med["plain"][1]))
    finally:
        qms.send_signal(signal.SIGTERM); qms.wait(timeout=30)
        sink.send_signal(signal.SIGTERM); sink.wait()
        subprocess.run(["rm", "-rf", tmp])

if __name__ == "__main__":
    main()
