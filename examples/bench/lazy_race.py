#!/usr/bin/env python3
"""Bare CRIU eager vs lazy restore of a runmh NOTIFY image -> first HTTP 200,
in one private mount namespace (host / bound on a root, externals staged, a tmpfs
/run with CRIU's kdat cache: what src/bench/bare.rs does).
As root, after `. .deps/env.sh` and a NOTIFY prebake of the heavy workload:
    runmh prebake --backend notify --images /tmp/lazy/img -C examples/fastapi_app -- \
        .deps/venv-fastapi/bin/python examples/fastapi_app/app.py --port 18431
    python3 examples/bench/lazy_race.py ROUNDS [--check] [--kill-daemon-after-ms N] [--modes eager,lazy]
IMG and PORT override the image and port; LAZYV the lazy-pages daemon's -v (default -v4).
Rounds alternate the order of the modes. --check asks 618 requests and prints a digest of
the bodies (equal digests: equal answers). --kill-daemon-after-ms SIGKILLs the lazy-pages
daemon at that time (or as soon as criu restore has returned, if later)."""
import os, sys, time, socket, subprocess, signal, json, ctypes, hashlib
CRIU = os.environ["MIEHISTO_CRIU"]
IMG = os.environ.get("IMG", "/tmp/lazy/img")
PORT = int(os.environ.get("PORT", "18431"))
rounds = int(sys.argv[1])
check = "--check" in sys.argv
kill_after = None
if "--kill-daemon-after-ms" in sys.argv:
    kill_after = float(sys.argv[sys.argv.index("--kill-daemon-after-ms") + 1])
modes = ["eager", "lazy"]
if "--modes" in sys.argv:
    modes = sys.argv[sys.argv.index("--modes") + 1].split(",")
B = "/tmp/lazy/ns-race"
subprocess.run(["rm", "-rf", B])
for p in ["root", "ext/0", "ext/1", "ext/2", "ext/3"]:
    os.makedirs(f"{B}/{p}")
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x00020000) != 0:
    sys.exit("unshare failed")
ext = ["/dev", "/dev/pts", "/dev/shm", "/sys"]
keys = ["dev", "devpts", "devshm", "sys"]
def sh(c): subprocess.run(c, shell=True, check=True)
sh("mount --make-rprivate /")
sh(f"mount --bind / {B}/root")
for i, e in enumerate(ext):
    sh(f"mount --bind {e} {B}/ext/{i}")
# A tmpfs /run where the first CRIU run leaves its kdat cache for the others (what
# src/criu/kdat.rs gives runmh's restores); without it each CRIU, the lazy-pages daemon
# included, probes the kernel for ~40 ms.
sh(f"mount -t tmpfs none /run && {CRIU} check >/dev/null 2>&1 || true")

def get(path):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    buf = b""
    while True:
        b = s.recv(65536)
        if not b: break
        buf += b
    s.close()
    return buf

def one(mode, D):
    subprocess.run(["rm", "-rf", D]); os.makedirs(D)
    argv = [CRIU, "restore", "-D", IMG, "-W", D, "-o", "restore.log", "-v4", "--root", f"{B}/root"]
    for i, k in enumerate(keys):
        argv += ["--external", f"mnt[{k}]:{B}/ext/{i}"]
    argv += ["--pidfile", f"{D}/pid", "--tcp-close", "--manage-cgroups=ignore",
             "--restore-detached", "--restore-sibling"]
    if mode == "lazy":
        argv.append("--lazy-pages")
    t0 = time.monotonic()
    daemon = None
    res = {"mode": mode}
    if mode == "lazy":
        r, w = os.pipe()
        daemon = subprocess.Popen([CRIU, "lazy-pages", "-D", IMG, "-W", D, "-o", "lazy.log", os.environ.get("LAZYV", "-v4"),
                                   "--status-fd", str(w)], pass_fds=[w], stdin=subprocess.DEVNULL)
        os.close(w); os.read(r, 1); os.close(r)
        res["daemon_ms"] = (time.monotonic() - t0) * 1e3
    rc = subprocess.run(argv).returncode
    res["criu_ms"] = (time.monotonic() - t0) * 1e3
    if rc != 0:
        print("restore failed", rc); os.system(f"tail -5 {D}/restore.log"); sys.exit(1)
    pid = int(open(f"{D}/pid").read())
    os.kill(pid, signal.SIGCONT)
    killed = False
    while True:
        if kill_after is not None and daemon and not killed and (time.monotonic() - t0) * 1e3 >= kill_after:
            daemon.kill(); killed = True; res["daemon_killed_ms"] = (time.monotonic() - t0) * 1e3
        try:
            out = get("/health")
            if b" 200 " in out.split(b"\r\n")[0]:
                break
        except OSError:
            pass
        if os.waitpid(pid, os.WNOHANG) != (0, 0) or time.monotonic() - t0 > 20:
            res["died"] = True; print(json.dumps(res)); sys.stdout.flush()
            if daemon and daemon.poll() is None: daemon.kill(); daemon.wait()
            return res
        time.sleep(0.0005)
    res["first_ms"] = (time.monotonic() - t0) * 1e3
    if kill_after is not None and daemon and not killed:
        daemon.kill(); killed = True; res["daemon_killed_ms"] = (time.monotonic() - t0) * 1e3
    if daemon:
        daemon.wait(); res["daemon_done_ms"] = (time.monotonic() - t0) * 1e3; res["daemon_rc"] = daemon.returncode
    if check:
        h = hashlib.sha256()
        paths = ["/health", "/stats/cat-00", "/stats/cat-39", "/search?q=item-1999&limit=50",
                 "/search?q=item-7&limit=1000"] + [f"/items/{i}" for i in range(0, 200000, 997)]
        errs = 0; codes = {}
        for p in paths * 3:
            try:
                raw = get(p); body = raw.split(b"\r\n\r\n", 1)
                c = raw.split(b" ", 2)[1].decode() if raw else "none"; codes[c] = codes.get(c, 0) + 1
                h.update(body[1] if len(body) > 1 else b"<nobody>")
            except OSError:
                errs += 1; h.update(b"<err>")
        res["responses"] = len(paths) * 3; res["errors"] = errs; res["codes"] = codes
        res["digest"] = h.hexdigest()[:16]
        res["alive"] = os.waitpid(pid, os.WNOHANG) == (0, 0)
    if os.waitpid(pid, os.WNOHANG) == (0, 0):
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
    print(json.dumps(res)); sys.stdout.flush()
    return res

allr = []
for i in range(rounds):
    order = modes if i % 2 == 0 else modes[::-1]
    for m in order:
        allr.append(one(m, f"/tmp/lazy/r-{m}-{i}"))
import statistics
for m in modes:
    xs = [r["first_ms"] for r in allr if r["mode"] == m and "first_ms" in r]
    if xs: print(m, "first_ms median", round(statistics.median(xs), 1), "n", len(xs), [round(x) for x in xs])
