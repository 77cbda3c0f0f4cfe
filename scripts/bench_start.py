#!/usr/bin/env python3
"""`tollgate batch` when the provider's budget is not full or not ours at start.

Three scenarios against `tollgate sim` (release binaries), each with the flags equal to
the simulator's real limits and tokens binding:

  spent    the key's buckets are empty when the run starts (`sim --start-fill 0`), as
           after an earlier run or another app: 429s, lines written once, wall / ideal,
           where ideal = tokens admitted / (TPM / 60 s) (every token waits its refill);
  restart  the run is killed with SIGKILL three times while paced at the limit and rerun
           each time (the documented resume): 429s per run, lines written once;
  redis    two processes share one budget through Redis, which is restarted empty
           mid-run (`--flush`: FLUSHALL instead, with no outage to notice): 429s after
           the state was lost, lines written once.

Usage: scripts/bench_start.py [--runs N] [--only spent,restart,redis] [--flush]
(builds the release binary; the redis scenario needs redis-server on the PATH)
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_batch import WORDS  # noqa: E402  the same vocabulary as the 90 s benchmark

import random  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "tollgate")
RPM, TPM = 3_000, 30_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(path, n, seed):
    """`n` chat requests of about 60 to 300 tokens each, as the simulator counts them."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for row in range(n):
            words = rng.randint(20, 150)
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"model": "gpt-4o-mini", "max_tokens": rng.choice([32, 64, 128]),
                                "messages": [{"role": "user", "content": text}],
                                "metadata": {"row": row}}) + "\n")


def stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as r:
        return json.load(r)


def sim(port, *extra):
    p = subprocess.Popen([BIN, "sim", "--port", str(port), "--rpm", str(RPM), "--tpm", str(TPM),
                          "--latency", "100ms", *extra], stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            stats(port)
            return p
        except OSError:
            time.sleep(0.05)
    sys.exit("tollgate sim did not start")


def batch(d, name, port, *extra):
    return [BIN, "batch", os.path.join(d, f"{name}.jsonl"), "-o", os.path.join(d, f"{name}.out.jsonl"),
            "--url", f"http://127.0.0.1:{port}/v1/chat/completions", "--rpm", str(RPM),
            "--tpm", str(TPM), "--progress", "off", *extra]


def each_once(d, name, n):
    """Whether every input row is in the results or failures exactly once."""
    seen = {}
    for suffix, row_of in ((".out.jsonl", lambda r: r[2]["row"]),
                           (".out.failures.jsonl", lambda r: r["line"] - 1)):
        path = os.path.join(d, name + suffix)
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    row = row_of(json.loads(line))
                    seen[row] = seen.get(row, 0) + 1
    return sorted(seen) == list(range(n)) and all(c == 1 for c in seen.values())


def spent():
    with tempfile.TemporaryDirectory() as d:
        port, n = free_port(), 200
        workload(os.path.join(d, "in.jsonl"), n, 7)
        s = sim(port, "--start-fill", "0")
        try:
            t = time.monotonic()
            subprocess.run(batch(d, "in", port), check=True, stderr=subprocess.DEVNULL)
            wall = time.monotonic() - t
            st = stats(port)
        finally:
            s.terminate()
            s.wait()
        ideal = st["tokens_admitted"] / (TPM / 60)
        return {"scenario": "spent", "lines": n, "429s": st["rate_limited"],
                "each_once": each_once(d, "in", n), "wall_s": round(wall, 2),
                "ideal_s": round(ideal, 2), "wall_over_ideal": round(wall / ideal, 4)}


def restart():
    with tempfile.TemporaryDirectory() as d:
        port, n = free_port(), 400
        workload(os.path.join(d, "in.jsonl"), n, 8)
        s = sim(port)
        per_run = []
        try:
            for kill in range(4):
                before = stats(port)["rate_limited"]
                p = subprocess.Popen(batch(d, "in", port), stderr=subprocess.DEVNULL)
                if kill < 3:
                    time.sleep(6)
                    p.kill()
                    p.wait()
                else:
                    if p.wait() != 0:
                        sys.exit("the last rerun failed")
                per_run.append(stats(port)["rate_limited"] - before)
        finally:
            s.terminate()
            s.wait()
        return {"scenario": "restart", "lines": n, "429s_per_run": per_run,
                "each_once": each_once(d, "in", n)}


def redis(flush):
    with tempfile.TemporaryDirectory() as d:
        port, rport, n = free_port(), free_port(), 200
        rcmd = ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no",
                "--dir", d]
        r = subprocess.Popen(rcmd, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        s = sim(port)
        try:
            procs = []
            for i in range(2):
                workload(os.path.join(d, f"in{i}.jsonl"), n, 20 + i)
                procs.append(subprocess.Popen(
                    batch(d, f"in{i}", port, "--redis", f"redis://127.0.0.1:{rport}"),
                    stderr=subprocess.DEVNULL))
            time.sleep(10)
            before = stats(port)["rate_limited"]
            if flush:
                subprocess.run(["redis-cli", "-p", str(rport), "flushall"], check=True,
                               stdout=subprocess.DEVNULL)
            else:
                r.kill()
                r.wait()
                time.sleep(1)
                r = subprocess.Popen(rcmd, stdout=subprocess.DEVNULL)
            for p in procs:
                if p.wait() != 0:
                    sys.exit("a batch process failed")
            st = stats(port)
        finally:
            s.terminate()
            s.wait()
            r.kill()
            r.wait()
        return {"scenario": "redis flushed" if flush else "redis restarted",
                "429s_after": st["rate_limited"] - before, "429s_before": before,
                "each_once": all(each_once(d, f"in{i}", n) for i in range(2))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="spent,restart,redis")
    p.add_argument("--flush", action="store_true")
    a = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tollgate-cli"], cwd=ROOT, check=True)
    for _ in range(a.runs):
        for name in a.only.split(","):
            r = {"spent": spent, "restart": restart,
                 "redis": lambda: redis(a.flush)}[name]()
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())
