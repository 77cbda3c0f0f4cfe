#!/usr/bin/env python3
"""Instructions redis-server spends per decision of tollgate's Redis script.

Wall-clock throughput on a shared 2-core machine moves by 30 % from run to run; the
instruction count of the server does not. This runs `redis-server` under valgrind's
callgrind, loads the script (`crates/tollgate/src/store/redis.lua`, or the file given),
and sends it batches shaped like those `try_acquire` sends under load: 24 reserve
operations over 12 identities per call, two GCRA quotas, no undo data, every call
admitted. It prints instructions per
call and per decision, after subtracting a run with no calls (start-up and script load).

    scripts/redis_script_cost.py                  # the script in the tree
    scripts/redis_script_cost.py old.lua new.lua  # several, side by side

Needs redis-server and valgrind (`apt-get install -y redis-server valgrind`). Plain
sockets, no Python packages.
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

CALLS = 300
OPS = 24  # reserve operations per script call
IDENTITIES = 12


def header():
    # Two GCRA quotas in 1 µs units (what the store writes before the script).
    q = "  {algo = 1, A = 100000, P = 1000000, cap = 100000, u = 1, fp = %d, shared = false, mw = -1},\n"
    return "local Q = {\n" + q % 1001 + q % 1002 + "}\n"


def command(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def more(self):
        data = self.s.recv(65536)
        if not data:
            raise OSError("redis-server closed the connection")
        self.buf += data

    def line(self):
        while b"\r\n" not in self.buf:
            self.more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.more()
            v, self.buf = self.buf[:n], self.buf[n + 2 :]
            return v
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError("unexpected reply %r" % line)

    def call(self, *args):
        self.s.sendall(command(*args))
        return self.reply()


def reserve(key_index):
    # R kidx sidx part max_wait_us flags, then one charge per quota (1 request each).
    return b"R" + struct.pack("<ddddddd", key_index, 0, 1, 0, 0, 1, 1)


def instructions(lua, calls, port):
    out = tempfile.NamedTemporaryFile(suffix=".callgrind", delete=False).name
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
         "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = None
    for _ in range(200):
        try:
            conn = Conn(port)
            conn.call("PING")
            break
        except (OSError, RuntimeError):  # not listening yet, or -LOADING
            conn = None
            time.sleep(0.1)
    if conn is None:
        server.kill()
        sys.exit("redis-server did not start under valgrind")
    sha = conn.call("SCRIPT", "LOAD", header() + open(lua).read()).decode()
    keys = ["tg:k%d" % (j % IDENTITIES) for j in range(OPS)]
    ops = [reserve(j + 1) for j in range(OPS)]
    for _ in range(calls):
        replies = conn.call("EVALSHA", sha, OPS, *keys, *ops)
        if not replies or replies[0][0] != b"1":
            server.kill()
            sys.exit("a decision was refused or failed: %r" % replies[:2])
    try:
        conn.call("SHUTDOWN", "NOSAVE")
    except (RuntimeError, OSError):
        pass
    server.wait()
    for line in open(out):
        if line.startswith(("summary:", "totals:")):
            os.unlink(out)
            return int(line.split()[1])
    sys.exit("no instruction count in " + out)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    files = sys.argv[1:] or [os.path.join(here, "..", "crates", "tollgate", "src", "store", "redis.lua")]
    print("| script | instructions per call | per decision |")
    print("|---|---:|---:|")
    for lua in files:
        base = instructions(lua, 0, free_port())
        total = instructions(lua, CALLS, free_port())
        per_call = (total - base) / CALLS
        print("| %s | %.0f | %.0f |" % (os.path.relpath(lua), per_call, per_call / OPS))


if __name__ == "__main__":
    main()
