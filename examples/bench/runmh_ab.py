#!/usr/bin/env python3
"""A/B of two runmh binaries' `runmh restore` -> first HTTP 200, in one run.

    python3 examples/bench/runmh_ab.py RUNMH_A RUNMH_B N IMG:PORT [IMG:PORT ...]

As root, after `. .deps/env.sh`, with images prebaked by either runmh (same
format), e.g.
    runmh --state-dir /tmp/ab/state prebake --backend notify --images /tmp/ab/py-notify \\
        -- python3 examples/http_server.py --boot-imports --port 18190

For each image, restores alternate between A and B (the order swapped every
pair) N times each after one warm-up each: `RUNMH restore --images IMG` in the
foreground, from the exec to the first `200` on `http://127.0.0.1:PORT/health`,
then, once runmh has said "restored", SIGTERM to it (the supervisor: it
forwards it to the service) and a wait for it to exit. Each binary has its own state directory (its own kdat
cache and instances). Prints the medians (ms) of spawn -> first 200 and of
spawn -> CRIU's exec (runmh's own part, from `--timings`), B/A, and the load
average.
"""
import os
import socket
import statistics
import subprocess
import sys
import time


def first_200(port, deadline):
    req = f"GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(req)
                head = s.recv(64)
                if head.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]:
                    return time.monotonic()
        except OSError:
            time.sleep(0.0002)
    raise SystemExit(f"port {port} never answered")


def start_restore(runmh, state, img, stamps):
    """`runmh restore` in the foreground with --timings STAMPS: (process,
    spawn time for time.monotonic, the same in ns for the stamps)."""
    if os.path.exists(stamps):
        os.remove(stamps)
    t0_ns = time.monotonic_ns()
    t0 = time.monotonic()
    p = subprocess.Popen([runmh, "--state-dir", state, "restore", "--images", img,
                          "--timings", stamps],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, t0, t0_ns


def restored(p):
    """runmh's stderr up to its "restored" line. A NOTIFY service can answer
    while CRIU is still finishing; a signal then would end the restore."""
    seen = b""
    for line in p.stderr:
        seen += line
        if b"runmh: restored" in line:
            break
    return seen


def one(runmh, state, img, port):
    """(spawn -> first 200, spawn -> CRIU's exec) in ms."""
    stamps = f"{state}.timings"
    p, t0, t0_ns = start_restore(runmh, state, img, stamps)
    t = first_200(port, t0 + 30)
    seen = restored(p)
    p.terminate()
    _, err = p.communicate(timeout=30)
    if b"runmh: restored" not in seen:
        raise SystemExit(f"{runmh}: {(seen + err).decode(errors='replace')}")
    with open(stamps) as f:
        marks = dict(line.split() for line in f)
    return (t - t0) * 1000, (int(marks["criu_exec"]) - t0_ns) / 1e6


def main():
    a, b, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    targets = [(x.rsplit(":", 1)[0], int(x.rsplit(":", 1)[1])) for x in sys.argv[4:]]
    base = "/tmp/runmh-ab"
    states = {a: f"{base}/state-a", b: f"{base}/state-b"}
    print(f"load before: {os.getloadavg()}")
    print(f"{'image':<20} {'measure':<22} {'A ms':>8} {'B ms':>8} {'B/A':>6}")
    for img, port in targets:
        times = {a: [], b: []}
        for bin_ in (a, b):
            one(bin_, states[bin_], img, port)  # warm-up: page cache, kdat cache
        for i in range(n):
            order = (a, b) if i % 2 == 0 else (b, a)
            for bin_ in order:
                times[bin_].append(one(bin_, states[bin_], img, port))
        for k, what in enumerate(("spawn -> first 200", "spawn -> CRIU exec")):
            ma = statistics.median(t[k] for t in times[a])
            mb = statistics.median(t[k] for t in times[b])
            print(f"{os.path.basename(img):<20} {what:<22} {ma:8.2f} {mb:8.2f} {mb / ma:6.3f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
