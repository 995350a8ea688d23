#!/usr/bin/env python3
"""bench/events_probe.py: what a store's webhooks feel while remarket is busy.

Sends signed cart events to POST /rm/events at a steady rate, one every
INTERVAL ms whatever the answers do (open loop: webhooks keep arriving
while remarket is stuck, as a store's do), from a pool of THREADS kept-alive
connections, until STOP_FILE exists, for at most MAX_SECONDS and
MAX_REQUESTS (the loop always ends by itself). Each latency counts from
the moment the request was due, so a request that waited for a free
connection counts its wait too.

  events_probe.py URL SECRET STOP_FILE [INTERVAL_MS [MAX_SECONDS [TS]]]

TS (Unix seconds) is put in every event (default: none, the arrival time).
Prints one line: <requests> <p50_ms> <p99_ms> <max_ms> <errors> [first error]
(an error is any answer but 202, or a failed connection). Every request is
written to STOP_FILE.lat, one a line: <due, Unix seconds> <latency_ms>
<HTTP status, 0 for a failed connection>, so that the caller can take the
requests of a time window (bench/scale.sh: those that overlap a tick).
"""
import hashlib
import hmac
import http.client
import json
import os
import queue
import sys
import threading
import time
import urllib.parse

MAX_REQUESTS = 200000


def pct(sorted_ms, p):
    if not sorted_ms:
        return 0.0
    k = min(len(sorted_ms) - 1, max(0, int(round(p / 100.0 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[k]


THREADS = 64


def worker(u, secret, ts, tag, jobs, rows, errors, lock):
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
    while True:
        job = jobs.get()
        if job is None:
            break
        n, due_wall, due = job
        ev = {"type": "cart", "email": "probe-%s-%d@example.com" % (tag, n),
              "cart_id": "probe-%s-%d" % (tag, n), "currency": "EUR",
              "items": [{"sku": "P1", "name": "Product 1", "price": 6, "qty": 1}],
              "total": 6}
        if ts is not None:
            ev["ts"] = ts
        body = json.dumps(ev, separators=(",", ":")).encode()
        t = str(int(time.time()))
        sig = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json",
                   "X-Remarket-Signature": "t=%s,v1=%s" % (t, sig)}
        try:
            conn.request("POST", u.path, body, headers)
            r = conn.getresponse()
            answer = r.read()
            status = r.status
        except (OSError, http.client.HTTPException) as e:
            status, answer = 0, str(e).encode()
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
        ms = (time.monotonic() - due) * 1000
        with lock:
            rows.append((due_wall, ms, status))
            if status != 202:
                errors.append("HTTP %d %s" % (status, answer[:200].decode("utf-8", "replace")))
    conn.close()


def main():
    if len(sys.argv) < 4:
        sys.stderr.write(__doc__)
        return 2
    url, secret, stop = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
    interval = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else 0.01
    max_s = float(sys.argv[5]) if len(sys.argv) > 5 else 900.0
    ts = int(sys.argv[6]) if len(sys.argv) > 6 else None
    u = urllib.parse.urlsplit(url)
    tag = "%d-%d" % (os.getpid(), int(time.time()))
    jobs, rows, errors, lock = queue.Queue(), [], [], threading.Lock()
    pool = [threading.Thread(target=worker, args=(u, secret, ts, tag, jobs, rows, errors, lock))
            for _ in range(THREADS)]
    for th in pool:
        th.start()
    start = time.monotonic()
    start_wall = time.time()
    n = 0
    while n < MAX_REQUESTS and not os.path.exists(stop):
        due = start + n * interval
        if due - start > max_s:
            break
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        jobs.put((n, start_wall + n * interval, due))
        n += 1
    for _ in pool:
        jobs.put(None)
    for th in pool:
        th.join()
    rows.sort()
    with open(stop + ".lat", "w") as f:
        f.write("".join("%.6f %.3f %d\n" % r for r in rows))
    s = sorted(r[1] for r in rows)
    print("%d %.2f %.2f %.2f %d %s" % (len(s), pct(s, 50), pct(s, 99),
                                       s[-1] if s else 0.0, len(errors),
                                       (errors[0] if errors else "").replace("\n", " ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
