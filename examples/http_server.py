#!/usr/bin/env python3
"""http_server.py - Python payload for miehisto (stdlib only).

A tiny HTTP/1.0 server on 127.0.0.1 (or --bind ADDR) built on socketserver.TCPServer and
http.server.BaseHTTPRequestHandler. It stands for the "slow-booting
scripting-language app" that restoring from a CRIU image should speed up:
with --boot-imports it imports a pile of stdlib modules before binding.
CPython's socket.listen() calls libc's listen(), so the LD_PRELOAD marker
works here.

Log lines (stdout, one os.write per line, so never buffered):
  MHLOG python start pid=<pid> ppid=<ppid>
  MHLOG python boot-imports n=<modules> ms=<milliseconds>   (--boot-imports)
  MHLOG python bound port=<port> fd=<fd>
  MHLOG python listen ret=<r> errno=<e>
  MHLOG python fatal listen failed                           (then exit 3)
  MHLOG python serving
  MHLOG python request n=<count> client=<client address>
  MHLOG python exit signal=<sig>                             (SIGTERM/SIGINT)

Usage: http_server.py [--port N] [--bind ADDR] [--boot-imports]   (port: else env PORT, else 8080)
"""
import argparse
import http.server
import importlib
import os
import signal
import socket
import socketserver
import sys
import time

NAME = "python"

# Imported by --boot-imports to simulate a slow, file-heavy boot
# (mostly open/stat of .py/.pyc files, like a framework's boot).
BOOT_MODULES = [
    "json", "email.parser", "email.mime.multipart", "http.client",
    "xml.dom.minidom", "xml.etree.ElementTree", "decimal", "fractions",
    "asyncio", "sqlite3", "unittest", "urllib.request", "logging.handlers",
    "csv", "zipfile", "tarfile", "difflib", "statistics", "concurrent.futures",
    "pydoc",
]


def log(msg):
    os.write(1, f"MHLOG {NAME} {msg}\n".encode())


def boot_imports():
    t0 = time.monotonic()
    n = 0
    for mod in BOOT_MODULES:
        try:
            importlib.import_module(mod)
            n += 1
        except ImportError:
            pass  # e.g. a Python built without sqlite3
    ms = int((time.monotonic() - t0) * 1000)
    log(f"boot-imports n={n} ms={ms}")


class Server(socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, port, bind):
        self.requests_served = 0
        # An IPv6 address ("::" too) needs an AF_INET6 socket; Linux makes
        # it dual-stack (IPV6_V6ONLY off) unless net.ipv6.bindv6only says so.
        if ":" in bind:
            self.address_family = socket.AF_INET6
        super().__init__((bind, port), Handler)

    def server_bind(self):
        try:
            super().server_bind()
        except OSError as e:
            log(f"fatal bind failed errno={e.errno} ({e.strerror})")
            sys.exit(3)
        log(f"bound port={self.server_address[1]} fd={self.socket.fileno()}")

    def server_activate(self):
        try:
            self.socket.listen(self.request_queue_size)
        except OSError as e:
            log(f"listen ret=-1 errno={e.errno}")
            log("fatal listen failed")
            sys.exit(3)
        log("listen ret=0 errno=0")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.server.requests_served += 1
        n = self.server.requests_served
        log(f"request n={n} client={self.client_address[0]}")
        body = f"payload={NAME} pid={os.getpid()} requests={n}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET
    do_POST = do_GET

    def log_message(self, format, *args):
        pass  # keep stderr quiet; the MHLOG request line is enough


def on_term(sig, _frame):
    # As PID 1 of a PID namespace, signals left at SIG_DFL are ignored.
    log(f"exit signal={sig}")
    os._exit(128 + sig)


def main():
    ap = argparse.ArgumentParser(description="miehisto Python test payload")
    ap.add_argument("--port", type=int,
                    default=int(os.environ.get("PORT") or 8080))
    ap.add_argument("--boot-imports", action="store_true",
                    help="import ~20 stdlib modules before binding (slow boot)")
    # 0.0.0.0 lets a migrated copy answer on another host's address; a
    # specific address ties the socket (and a CRIU restore) to that host.
    ap.add_argument("--bind", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1)")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log(f"start pid={os.getpid()} ppid={os.getppid()}")
    if args.boot_imports:
        boot_imports()

    server = Server(args.port, args.bind)
    log("serving")
    server.serve_forever()


if __name__ == "__main__":
    main()
