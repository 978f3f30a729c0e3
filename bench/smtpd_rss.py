#!/usr/bin/env python3
"""smtpd's memory under hostile loads (issue #11): the peak and the settled resident size of
one smtpd process while clients on this machine do one of:

  auth  N parallel AUTH PLAIN attempts with a wrong password, from one address
  big   N parallel sessions, each sending one message of --mb megabytes by DATA
  idle  N idle connections, spread over 127.0.x.y addresses (40 per /24)

Needs root (to reset the peak with /proc/PID/clear_refs). Prints one line of key=value.
  ./smtpd_rss.py --port 2525 --pid $(pgrep -f 'qms.toml smtpd') auth -n 150
"""
import argparse, base64, socket, threading, time


def rss(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return 0


def session(port, src=None):
    s = socket.socket()
    if src:
        s.bind((src, 0))
    s.settimeout(120)
    s.connect(("127.0.0.1", port))
    f = s.makefile("rb")

    def reply():
        line = f.readline()
        while line[3:4] == b"-":
            line = f.readline()
        return line
    return s, reply


def auth(port):
    s, reply = session(port)
    reply()
    s.sendall(b"EHLO client.test\r\n"); reply()
    token = base64.b64encode(b"\0alice\0wrong").decode()
    s.sendall(f"AUTH PLAIN {token}\r\n".encode()); reply()
    s.close()


def big(port, mb):
    s, reply = session(port)
    reply()
    s.sendall(b"EHLO client.test\r\n"); reply()
    s.sendall(b"MAIL FROM:<bob@remote.test>\r\n"); reply()
    s.sendall(b"RCPT TO:<alice@example.test>\r\n"); reply()
    s.sendall(b"DATA\r\n"); reply()
    line = b"y" * 998 + b"\r\n"
    block = b"Subject: big\r\n\r\n" + line * 1000
    sent = 0
    while sent < mb << 20:
        s.sendall(block if sent == 0 else line * 1000)
        sent += len(line) * 1000
    s.sendall(b".\r\n")
    reply()
    s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("mode", choices=["auth", "big", "idle"])
    ap.add_argument("-n", type=int, default=150)
    ap.add_argument("--mb", type=int, default=45)
    ap.add_argument("--settle", type=float, default=3, help="seconds before the settled size")
    a = ap.parse_args()
    open(f"/proc/{a.pid}/clear_refs", "w").write("5")
    before = rss(a.pid, "VmRSS")
    held, threads = [], []
    start = time.time()
    if a.mode == "idle":
        for i in range(a.n):
            try:
                s, reply = session(a.port, "127.0.%d.%d" % (10 + i // 40 // 2, 1 + (i // 40) % 2))
                if reply().startswith(b"220"):
                    held.append(s)
            except OSError:
                pass
    else:
        work = auth if a.mode == "auth" else (lambda p: big(p, a.mb))
        threads = [threading.Thread(target=work, args=(a.port,)) for _ in range(a.n)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    during = rss(a.pid, "VmRSS")
    peak = rss(a.pid, "VmHWM")
    for s in held:
        s.close()
    time.sleep(a.settle)
    after = rss(a.pid, "VmRSS")
    print(f"mode={a.mode} n={a.n} accepted={len(held) if a.mode == 'idle' else a.n} "
          f"rss_before_mb={before} rss_during_mb={during} peak_mb={peak} rss_after_mb={after} "
          f"seconds={time.time() - start:.1f}")


main()
