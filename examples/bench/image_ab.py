#!/usr/bin/env python3
"""Tight A/B of two images of one service: `runmh restore` -> first response.

    python3 examples/bench/image_ab.py RUNMH STATE_DIR IMAGE_A IMAGE_B PORT [N]

Restores IMAGE_A and IMAGE_B (e.g. the same service prebaked with and without
MIEHISTO_PRELOAD_TRIM=0; both must listen on PORT) alternately with
`RUNMH --state-dir STATE_DIR restore`, order swapped every pair, N pairs
(default 10). Each sample is spawn -> first HTTP response on 127.0.0.1:PORT;
the restored service is then stopped (SIGTERM to the front, which forwards it)
and the next restore starts once the front has exited and the port is closed.
Prints every sample, the medians and the median of the per-pair B/A ratios.
Run as root, like runmh restore.
"""
import json
import signal
import socket
import statistics
import subprocess
import sys
import time

if len(sys.argv) < 6:
    sys.exit(__doc__)
RUNMH, STATE, A, B = sys.argv[1:5]
PORT = int(sys.argv[5])
N = int(sys.argv[6]) if len(sys.argv) > 6 else 10
TIMEOUT = 60.0


def first_response(t0):
    while time.monotonic() - t0 < TIMEOUT:
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                if s.recv(16).startswith(b"HTTP/1"):
                    return time.monotonic() - t0
        except OSError:
            time.sleep(0.0005)
    sys.exit(f"no response on port {PORT} within {TIMEOUT:.0f}s")


def port_closed():
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=0.5).close()
        return False
    except OSError:
        return True


def one(image):
    t0 = time.monotonic()
    front = subprocess.Popen(
        [RUNMH, "--state-dir", STATE, "restore", "--images", image],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dt = first_response(t0)
    front.send_signal(signal.SIGTERM)
    front.wait(timeout=TIMEOUT)
    while not port_closed():
        time.sleep(0.05)
    return dt * 1000


samples = {"A": [], "B": []}
for i in range(N):
    for k in ("A", "B") if i % 2 == 0 else ("B", "A"):
        samples[k].append(one(A if k == "A" else B))
pairs = [b / a for a, b in zip(samples["A"], samples["B"])]
print(json.dumps({k: [round(x, 1) for x in v] for k, v in samples.items()}))
print(
    f"A {A}: median {statistics.median(samples['A']):.1f} ms; "
    f"B {B}: median {statistics.median(samples['B']):.1f} ms; "
    f"B/A per pair, median {statistics.median(pairs):.2f}"
)
