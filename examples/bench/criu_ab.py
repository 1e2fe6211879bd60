#!/usr/bin/env python3
"""Tight A/B of two CRIU binaries' restore speed on one image.

    unshare -m --propagation private python3 examples/bench/criu_ab.py CRIU_A CRIU_B [N] [MIB]

Dumps one python process holding MIB MiB (default 64) of touched pages once
with CRIU_A, then alternates bare `criu restore -d` of that image between the
two binaries, restore by restore (order swapped every pair), N times each
(default 20) after one warm-up each. Each binary keeps its own kdat cache: its
own tmpfs is bind-mounted on /run for its runs only (CRIU keeps the cache only
on a tmpfs /run, and one binary's cache is rejected by the other). Must run as
root inside a private mount namespace (the mounts stay in it). The restored
task is killed and reaped (we are its subreaper) between runs, freeing its pid.
Prints medians of the wall time and of the restorer's page read (its log's
`Preadv` -> last `returned`) and the B/A ratios.
"""
import ctypes
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if len(sys.argv) < 3:
    sys.exit(__doc__)
CRIU = {"A": os.path.abspath(sys.argv[1]), "B": os.path.abspath(sys.argv[2])}
N = int(sys.argv[3]) if len(sys.argv) > 3 else 20
MIB = int(sys.argv[4]) if len(sys.argv) > 4 else 64
if os.geteuid() != 0:
    sys.exit("criu_ab.py: must run as root, inside `unshare -m --propagation private`")

work = tempfile.mkdtemp(prefix="criu-ab-")
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def run(*argv):
    subprocess.run(argv, check=True)


for tag in CRIU:
    os.makedirs(f"{work}/run{tag}")
    run("mount", "-t", "tmpfs", "criu-ab", f"{work}/run{tag}")
img = f"{work}/img"
os.makedirs(img)
code = f'import time; b=bytearray({MIB}<<20); b[::4096]=b"x"*len(b[::4096]); time.sleep(100000)'
target = subprocess.Popen(
    ["python3", "-c", code],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
)
time.sleep(1.5)
run(CRIU["A"], "dump", "-t", str(target.pid), "-D", img, "-o", "dump.log")
target.wait()

wall = {t: [] for t in CRIU}
pages = {t: [] for t in CRIU}


def restore(tag):
    run("mount", "--bind", f"{work}/run{tag}", "/run")
    try:
        t0 = time.monotonic()
        r = subprocess.run([CRIU[tag], "restore", "-d", "-D", img, "-v4", "-o", f"restore-{tag}.log"])
        ms = (time.monotonic() - t0) * 1000
    finally:
        run("umount", "/run")
    if r.returncode != 0:
        sys.exit(f"criu_ab.py: restore with {CRIU[tag]} failed: see {img}/restore-{tag}.log")
    os.kill(target.pid, signal.SIGKILL)
    os.waitpid(target.pid, 0)
    log = open(f"{img}/restore-{tag}.log").read()
    first = re.search(r"^\((\d+\.\d+)\) pie: \d+: Preadv", log, re.M)
    last = re.findall(r"^\((\d+\.\d+)\) pie: \d+: `- returned", log, re.M)
    if first and last:
        pages[tag].append((float(last[-1]) - float(first.group(1))) * 1000)
    return ms


for tag in CRIU:
    restore(tag)  # warm-up: page cache, kdat caches
for i in range(N):
    for tag in ("A", "B") if i % 2 == 0 else ("B", "A"):
        wall[tag].append(restore(tag))
for tag in CRIU:
    run("umount", f"{work}/run{tag}")
subprocess.run(["rm", "-rf", work])

med = statistics.median
print(f"A = {CRIU['A']}\nB = {CRIU['B']}")
print(f"{N} restores each of one {MIB} MiB image; load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
for name, d in (("criu restore -d, wall", wall), ("page read (Preadv -> returned)", pages)):
    a, b = d["A"], d["B"]
    if a and b:
        print(f"{name:32} A median {med(a):8.2f} ms (min {min(a):7.2f})   B median {med(b):8.2f} ms (min {min(b):7.2f})   B/A {med(b) / med(a):.2f}")
print(f"median of per-pair B/A (wall)    {med([b / a for a, b in zip(wall['A'], wall['B'])]):.2f}")
