#!/usr/bin/env python3
"""Classification rate of `qms dsn classify`: a corpus of N reports made from the bounce fixtures
(every format, with addresses and ids varied), classified in one run; prints reports per second
and how many of each kind came out (a check that the corpus was read, not just opened).

  bench/classify.py [--qms target/release/qms] [-n 10000]
"""
import argparse, collections, json, os, subprocess, tempfile, time

HERE = os.path.dirname(os.path.realpath(__file__))

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--qms", default=os.path.join(HERE, "..", "target", "release", "qms"))
    p.add_argument("-n", type=int, default=10000)
    a = p.parse_args()
    fixtures = os.path.join(HERE, "..", "tests", "fixtures", "bounces")
    sources = [open(os.path.join(fixtures, f), "rb").read() for f in sorted(os.listdir(fixtures))
               if f.endswith(".eml")]
    with tempfile.TemporaryDirectory(prefix="qms-classify-") as tmp:
        files = []
        for i in range(a.n):
            body = sources[i % len(sources)].replace(b"bob@", b"user%d@" % i).replace(b"offer-", b"offer-%d-" % i)
            path = os.path.join(tmp, "r%05d.eml" % i)
            open(path, "wb").write(body)
            files.append(path)
        t0 = time.monotonic()
        out = subprocess.run([a.qms, "dsn", "classify", *files], capture_output=True, text=True)
        secs = time.monotonic() - t0
    kinds = collections.Counter(json.loads(l).get("kind", "error") for l in out.stdout.splitlines() if l.strip())
    print("n=%d secs=%.2f reports_per_s=%.0f kinds=%s" % (a.n, secs, a.n / secs, dict(sorted(kinds.items()))))

if __name__ == "__main__":
    main()
