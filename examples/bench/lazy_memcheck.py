#!/usr/bin/env python3
"""(1) eager restore --leave-stopped, clear_refs, SIGCONT, first 200, then smaps_rollup Referenced:
the first response's hot set. (2) lazy restore --leave-stopped: wait for the daemon to end,
then compare /proc/PID/mem with pages-1.img entry by entry (bit-exact check), and the same
for an eager restore. Same set-up and IMG/PORT as race.py; run as root after `. .deps/env.sh`."""
import os, sys, time, socket, subprocess, signal, json, ctypes, struct
CRIU = os.environ["MIEHISTO_CRIU"]; IMG = os.environ.get("IMG", "/tmp/lazy/img"); PORT = int(os.environ.get("PORT", "18431"))
B = "/tmp/lazy/ns-memcheck"
subprocess.run(["rm", "-rf", B])
for p in ["root", "ext/0", "ext/1", "ext/2", "ext/3"]: os.makedirs(f"{B}/{p}")
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unshare(0x00020000) == 0
ext = ["/dev", "/dev/pts", "/dev/shm", "/sys"]; keys = ["dev", "devpts", "devshm", "sys"]
def sh(c): subprocess.run(c, shell=True, check=True)
sh("mount --make-rprivate /"); sh(f"mount --bind / {B}/root")
for i, e in enumerate(ext): sh(f"mount --bind {e} {B}/ext/{i}")
# A tmpfs /run where the first CRIU run leaves its kdat cache for the others (what
# src/criu/kdat.rs gives runmh's restores); without it each CRIU, the lazy-pages daemon
# included, probes the kernel for ~40 ms.
sh(f"mount -t tmpfs none /run && {CRIU} check >/dev/null 2>&1 || true")
def get(path):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode()); buf = b""
    while True:
        b = s.recv(65536)
        if not b: break
        buf += b
    return buf
def varint(b, i):
    v = 0; sh_ = 0
    while True:
        c = b[i]; i += 1; v |= (c & 0x7f) << sh_; sh_ += 7
        if not c & 0x80: return v, i
def pagemap(path):
    b = open(path, "rb").read(); i = 8; out = []; first = True
    while i < len(b):
        (n,) = struct.unpack_from("<I", b, i); i += 4; m = b[i:i+n]; i += n
        if first: first = False; continue
        f = {}; j = 0
        while j < len(m):
            k, j = varint(m, j); v, j = varint(m, j); f[k >> 3] = v
        out.append((f.get(1, 0), f.get(5) or f.get(2, 0), f.get(4, 4)))
    return out
def restore(mode, D):
    subprocess.run(["rm", "-rf", D]); os.makedirs(D)
    argv = [CRIU, "restore", "-D", IMG, "-W", D, "-o", "restore.log", "-v4", "--root", f"{B}/root"]
    for i, k in enumerate(keys): argv += ["--external", f"mnt[{k}]:{B}/ext/{i}"]
    argv += ["--pidfile", f"{D}/pid", "--tcp-close", "--manage-cgroups=ignore",
             "--restore-detached", "--restore-sibling", "--leave-stopped"]
    daemon = None
    if mode == "lazy":
        argv.append("--lazy-pages"); r, w = os.pipe()
        daemon = subprocess.Popen([CRIU, "lazy-pages", "-D", IMG, "-W", D, "-o", "lazy.log", "-v1",
                                   "--status-fd", str(w)], pass_fds=[w]); os.close(w); os.read(r, 1); os.close(r)
    assert subprocess.run(argv).returncode == 0
    return int(open(f"{D}/pid").read()), daemon
# (1) hot set of the first response
pid, _ = restore("eager", "/tmp/lazy/x-eager")
open(f"/proc/{pid}/clear_refs", "w").write("1")
os.kill(pid, signal.SIGCONT)
t0 = time.monotonic()
while True:
    try:
        if b" 200 " in get("/health").split(b"\r\n")[0]: break
    except OSError: pass
    time.sleep(0.0005)
roll = {l.split(":")[0]: l.split()[1] for l in open(f"/proc/{pid}/smaps_rollup") if ":" in l and l.split()[1].isdigit()}
print("hot set after first response (eager): Referenced", int(roll["Referenced"]) // 1024, "MiB of Rss", int(roll["Rss"]) // 1024, "MiB, Anonymous", int(roll["Anonymous"]) // 1024, "MiB")
os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
# (2) bit-exact
for mode in ['eager', 'lazy']:
    pid, daemon = restore(mode, f"/tmp/lazy/x2-{mode}")
    if daemon: daemon.wait(); print("daemon rc", daemon.returncode)
    pm = pagemap(f"{IMG}/pagemap-1.img"); pages = open(f"{IMG}/pages-1.img", "rb")
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    same = diff = 0; diffs = []
    for vaddr, nr, flags in pm:
        if not flags & 4: continue
        want = pages.read(nr * 4096); got = os.pread(mem, nr * 4096, vaddr)
        for p in range(nr):
            if want[p*4096:(p+1)*4096] == got[p*4096:(p+1)*4096]: same += 1
            else:
                diff += 1; diffs.append(hex(vaddr + p * 4096))
                w_ = want[p*4096:(p+1)*4096]; g_ = got[p*4096:(p+1)*4096]
                offs = [o for o in range(4096) if w_[o] != g_[o]]
                print(mode, hex(vaddr + p*4096), "bytes differ:", len(offs), "at", [hex(o) for o in offs[:24]], "image", w_[offs[0]:offs[0]+32].hex(), "got", g_[offs[0]:offs[0]+32].hex())
    print(mode, "pages identical", same, "differing", diff, diffs[:10])
    os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
