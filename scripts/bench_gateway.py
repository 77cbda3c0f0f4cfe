#!/usr/bin/env python3
"""Latency the gateway adds, measured with oha on loopback.

Starts `tollgate sim` (no simulated latency, limits no run reaches) and `tollgate serve`
in front of it (one caller in a tier with request and token limits, an upstream account
with its own limits, so every request takes a real two-dimension decision), then drives
each at a fixed rate with oha and reports p50 / p99 of calling the simulator directly and
through the gateway, side by side in the same run: --repeat pairs per rate (direct, then
through the gateway), with the median of each figure and of the pairs' differences, since
one p99 on a shared machine moves by milliseconds from run to run. With --bare each pair
becomes a triple: a bare proxy on the gateway's own HTTP stack (the bare_proxy example:
no authentication, estimate, limits or metrics) is run too, and the gateway is also
reported over it, which is what tollgate's own work adds. With --redis the gateway keeps its
limits in a redis-server the script starts. With --soak SECONDS it instead drives the
gateway for that long at the first rate and samples its resident memory every 30 s.

    cargo build --release -p tollgate-cli && cargo install oha
    cargo build --release -p tollgate-gateway --example bare_proxy    # for --bare
    python3 scripts/bench_gateway.py [--rates 1000,5000] [--seconds 30] [--repeat 5] [--redis] [--bare]
    python3 scripts/bench_gateway.py --rates 1000 --soak 600
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BIN = "target/release/tollgate"
BARE = "target/release/examples/bare_proxy"
KEY = "bench-key"
BODY = json.dumps({
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def oha(url, rate, seconds, auth):
    cmd = ["oha", "-z", f"{seconds}s", "-q", str(rate), "-c", "64", "--no-tui", "--latency-correction",
           "--output-format", "json", "-m", "POST", "-H", "content-type: application/json",
           "-d", BODY, url]
    if auth:
        cmd[1:1] = ["-H", f"authorization: Bearer {KEY}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    codes = r.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    total = sum(codes.values())
    if ok < total * 0.999:
        sys.exit(f"{url}: too many answers were not 200: {codes}")
    if ok != total:
        print(f"  note: {url}: {total - ok} of {total} answers were not 200: {codes}")
    lat = r["latencyPercentiles"]
    return {"rps": r["summary"]["requestsPerSec"], "p50": lat["p50"] * 1000,
            "p99": lat["p99"] * 1000, "n": total}


def cpu_seconds(pid):
    """User and system CPU time a process has used, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--redis", action="store_true")
    ap.add_argument("--soak", type=int, default=0)
    ap.add_argument("--bare", action="store_true")
    args = ap.parse_args()
    if not shutil.which("oha"):
        sys.exit("oha is missing: cargo install oha")
    if args.bare and not os.path.exists(BARE):
        sys.exit(f"{BARE} is missing: cargo build --release -p tollgate-gateway --example bare_proxy")
    work = tempfile.mkdtemp()
    procs = []
    try:
        sim_port, gw_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [BIN, "sim", "--port", str(sim_port), "--latency", "0ms", "--output-tokens", "16",
             "--rpm", "1000000000", "--tpm", "1000000000000"],
            stderr=subprocess.DEVNULL))
        wait_port(sim_port)
        redis_line = ""
        if args.redis:
            rport = free_port()
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL))
            wait_port(rport)
            redis_line = f'redis = "redis://127.0.0.1:{rport}"\n'
        config = os.path.join(work, "tollgate.toml")
        with open(config, "w") as f:
            f.write(f"""listen = "127.0.0.1:{gw_port}"
{redis_line}[upstreams.sim]
kind = "sim"
url = "http://127.0.0.1:{sim_port}"
limits = {{ requests_per_minute = 1000000000, tokens_per_minute = 1000000000 }}
[tiers.bench]
limits = {{ requests_per_minute = 1000000000, tokens_per_minute = 1000000000 }}
[callers.bench]
key_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
tier = "bench"
""")
        gw = subprocess.Popen([BIN, "serve", "--config", config], stderr=subprocess.DEVNULL)
        procs.append(gw)
        wait_port(gw_port)
        direct = f"http://127.0.0.1:{sim_port}/v1/chat/completions"
        via = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        bare = None
        if args.bare:
            bare_port = free_port()
            procs.append(subprocess.Popen(
                [BARE, f"127.0.0.1:{bare_port}", f"http://127.0.0.1:{sim_port}"],
                stderr=subprocess.DEVNULL))
            wait_port(bare_port)
            bare = f"http://127.0.0.1:{bare_port}/v1/chat/completions"
            oha(bare, 500, 2, True)
        rates = [int(r) for r in args.rates.split(",")]
        store = "redis" if args.redis else "memory"
        # Warm both paths (connections, tokenizer tables).
        oha(direct, 500, 2, True)
        oha(via, 500, 2, True)
        if args.soak:
            rate = rates[0]
            print(f"soak: {rate} requests/s through the gateway ({store}) for {args.soak} s")
            print("| elapsed s | gateway RSS MB |")
            print("|---:|---:|")
            print(f"| 0 | {rss_mb(gw.pid):.1f} |")
            load = subprocess.Popen(
                ["oha", "-z", f"{args.soak}s", "-q", str(rate), "-c", "64", "--no-tui",
                 "--output-format", "json", "-m", "POST", "-H", "content-type: application/json",
                 "-H", f"authorization: Bearer {KEY}", "-d", BODY, via],
                stdout=subprocess.PIPE, text=True)
            start = time.monotonic()
            while load.poll() is None:
                time.sleep(30)
                print(f"| {time.monotonic() - start:.0f} | {rss_mb(gw.pid):.1f} |", flush=True)
            r = json.loads(load.stdout.read())
            print(f"answers: {r['statusCodeDistribution']}, p99 {r['latencyPercentiles']['p99'] * 1000:.2f} ms")
            return
        print(f"gateway store: {store}; {args.repeat} {'triples' if bare else 'pairs'} of "
              f"{args.seconds} s per rate; oha, 64 connections; medians")
        head = "| rate | direct p50 | direct p99 | gateway p50 | gateway p99 | added p50 | added p99 | gateway CPU/request |"
        if bare:
            head += " bare p99 | bare added p99 | gateway over bare p99 |"
        print(head)
        print("|---:" * (head.count("|") - 1) + "|")
        med = statistics.median
        for rate in rates:
            runs = []
            for _ in range(args.repeat):
                d = oha(direct, rate, args.seconds, True)
                b = oha(bare, rate, args.seconds, True) if bare else None
                cpu = cpu_seconds(gw.pid)
                g = oha(via, rate, args.seconds, True)
                # The gateway's own CPU per request: steadier than a p99 on a shared machine.
                g["cpu_us"] = (cpu_seconds(gw.pid) - cpu) / g["n"] * 1e6
                runs.append((d, g, b))
                line = (f"  pair: direct {d['p50']:.3f} / {d['p99']:.3f} ms, "
                        f"gateway {g['p50']:.3f} / {g['p99']:.3f} ms, {g['cpu_us']:.1f} µs CPU/request")
                if b:
                    line += f", bare {b['p50']:.3f} / {b['p99']:.3f} ms"
                print(line, file=sys.stderr, flush=True)
                if g["rps"] < rate * 0.95 or d["rps"] < rate * 0.95:
                    print(f"  (achieved {d['rps']:.0f} direct, {g['rps']:.0f} via the gateway)")
            fig = lambda side, q: med(r[side][q] for r in runs)
            added = lambda q, over=0: med(r[1][q] - r[over][q] for r in runs)
            row = (f"| {rate} | {fig(0, 'p50'):.3f} ms | {fig(0, 'p99'):.3f} ms | "
                   f"{fig(1, 'p50'):.3f} ms | {fig(1, 'p99'):.3f} ms | {added('p50'):.3f} ms | "
                   f"{added('p99'):.3f} ms | {fig(1, 'cpu_us'):.1f} µs |")
            if bare:
                bare_added = med(r[2]["p99"] - r[0]["p99"] for r in runs)
                row += (f" {fig(2, 'p99'):.3f} ms | {bare_added:.3f} ms | "
                        f"{added('p99', 2):.3f} ms |")
            print(row, flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
