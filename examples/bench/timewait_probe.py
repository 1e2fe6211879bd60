#!/usr/bin/env python3
"""The "ready -> port accepts" spike after a load phase, reproduced (NOTES §6).

    python3 examples/bench/timewait_probe.py RUNMH IMG PORT N LOAD_SECS [SOURCE]

As root, after `. .deps/env.sh`, with an image of a server on 127.0.0.1:PORT
answering /health (e.g. `runmh prebake --backend trace --images IMG -- python3
examples/http_server.py --boot-imports --port PORT`). N times: `RUNMH restore
--images IMG --timings ...` in the foreground, polled from its start every
0.5 ms by connects (bound to SOURCE:0 first when given, else left to
connect(2) to bind, as a plain client does) until the first 200; then,
with LOAD_SECS > 0, `wrk -t1 -c8 -H 'Connection: close'` against the restored
service, as `mhctl bench` does; then SIGKILL to the service and a wait for
runmh. Prints, per restore, spawn -> first accepted connect and -> first 200,
runmh's "ready" stamp, ready -> accept, and the service's schedstat (on-CPU
and run-queue wait, ms) read at its first 200.

Without SOURCE and with a load, connect(2) picks the ephemeral ports wrk
used, and the server side's TIME_WAIT sockets on PORT (thousands) meet the
poller's SYNs: a SYN that hits one is answered with an ACK, not a SYN-ACK or
RST, and waits for its retransmit. With SOURCE 127.0.0.2 they never meet.
"""
import glob
import os
import re
import socket
import subprocess
import sys
import time

from runmh_ab import restored, start_restore

STATE = "/tmp/mh-timewait-probe/state"


def poll(port, source, deadline):
    accepted = None
    req = f"GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1,
                                         source_address=(source, 0) if source else None)
            accepted = accepted or time.monotonic()
            s.sendall(req)
            head = s.recv(64)
            s.close()
            if b" 200" in head.split(b"\r\n")[0]:
                return accepted, time.monotonic()
        except OSError:
            time.sleep(0.0005)
    raise SystemExit(f"port {port} never answered")


def schedstat(pid):
    out = []
    for t in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with open(t) as f:
            run, wait, _ = map(int, f.read().split())
        out.append((run / 1e6, wait / 1e6))
    return out


def main():
    runmh, img, port, n, load = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    source = sys.argv[6] if len(sys.argv) > 6 else None
    os.makedirs(STATE, exist_ok=True)
    stamps = f"{STATE}.timings"
    for i in range(n):
        p, t0, t0_ns = start_restore(runmh, STATE, img, stamps)
        accepted, ok = poll(port, source, t0 + 30)
        seen = restored(p)
        m = re.search(rb"as pid (\d+)", seen)
        if not m:
            raise SystemExit(seen.decode(errors="replace"))
        root = int(m.group(1))
        sched = schedstat(root)
        if load:
            subprocess.run(["wrk", "-t1", "-c8", f"-d{load}s", "-H", "Connection: close",
                            f"http://127.0.0.1:{port}/health"], stdout=subprocess.DEVNULL, check=True)
        os.kill(root, 9)
        p.communicate(timeout=30)
        with open(stamps) as f:
            marks = {k: (int(v) - t0_ns) / 1e6 for k, v in (line.split() for line in f)}
        ready = marks.get("ready", float("nan"))
        acc = (accepted - t0) * 1000
        print(f"{i:2} accept {acc:6.1f} 200 {(ok - t0) * 1000:6.1f} ready {ready:6.1f} "
              f"ready->accept {acc - ready:6.1f} ms  "
              + " ".join(f"[on-cpu {r:.1f} wait {w:.1f}]" for r, w in sched), flush=True)


if __name__ == "__main__":
    main()
