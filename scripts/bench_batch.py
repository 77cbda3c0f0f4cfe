#!/usr/bin/env python3
"""How close `tollgate batch` runs to the ideal time its limits allow, against `tollgate sim`.

A fixed, seeded workload (chat requests of varied prompt length and max_tokens) whose
binding limit (tokens per minute) makes the ideal run last about 90 s. The ideal is the
time the limits themselves allow, burst included:

    ideal = max((tokens - TPM) / (TPM / 60 s), (requests - RPM) / (RPM / 60 s))

where tokens is what the simulator counted at admission (prompt + max_tokens, as OpenAI
counts). Reports wall time / ideal, the simulator's 429s, the most tokens it admitted in
any trailing minute / (burst + a minute of refill = 2 x TPM; never above 1 when the limit
holds) and the sustained rate after the burst / the refill rate (tokens per minute / TPM).

Usage: scripts/bench_batch.py [--runs N] [--seconds 90]   (builds the release binary)
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "tollgate")
RPM, TPM = 3_000, 90_000
WORDS = ("rate limit token budget request provider window burst refill queue "
         "latency retry account model prompt answer").split()


def workload(path, seconds, seed=42):
    """Writes requests until their tokens fill the burst plus `seconds` of refill."""
    rng = random.Random(seed)
    target = TPM + TPM * seconds / 60
    # The simulator's count of a one-message chat: 3 + 1 ("user") + prompt words + 3.
    total, n = 0, 0
    with open(path, "w") as f:
        while total < target:
            words = rng.randint(10, 400)
            max_tokens = rng.choice([16, 64, 128, 256])
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"model": "gpt-4o-mini", "max_tokens": max_tokens,
                                "messages": [{"role": "user", "content": text}],
                                "metadata": {"row": n}}) + "\n")
            total += 7 + words + max_tokens
            n += 1
    return n


def stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as r:
        return json.load(r)


def run_once(seconds, port):
    with tempfile.TemporaryDirectory() as d:
        requests = os.path.join(d, "requests.jsonl")
        n = workload(requests, seconds)
        sim = subprocess.Popen([BIN, "sim", "--port", str(port), "--rpm", str(RPM), "--tpm", str(TPM),
                                "--latency", "200ms"], stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    stats(port)
                    break
                except OSError:
                    time.sleep(0.05)
            start = time.monotonic()
            subprocess.run([BIN, "batch", requests, "-o", os.path.join(d, "out.jsonl"),
                            "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
                            "--rpm", str(RPM), "--tpm", str(TPM), "--progress", "off"],
                           check=True, stderr=subprocess.DEVNULL)
            wall = time.monotonic() - start
            s = stats(port)
        finally:
            sim.terminate()
            sim.wait()
    tokens, reqs = s["tokens_admitted"], s["admitted"]
    ideal = max((tokens - TPM) / (TPM / 60), (reqs - RPM) / (RPM / 60), 0)
    return {
        "lines": n, "admitted": reqs, "tokens": tokens, "wall_s": round(wall, 2),
        "ideal_s": round(ideal, 2), "wall_over_ideal": round(wall / ideal, 4),
        "429s": s["rate_limited"],
        # A token bucket admits at most burst + refill in any 60 s: 2 x TPM.
        "max_trailing_minute_tokens_over_bound": round(s["max_tokens_per_minute"] / (2 * TPM), 4),
        "sustained_over_refill": round((tokens - TPM) / wall / (TPM / 60), 4),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--port", type=int, default=18_089)
    a = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tollgate-cli"], cwd=ROOT, check=True)
    results = []
    for i in range(a.runs):
        r = run_once(a.seconds, a.port)
        results.append(r)
        print(json.dumps(r), flush=True)
    ratios = sorted(r["wall_over_ideal"] for r in results)
    print(f"median wall/ideal {ratios[len(ratios) // 2]:.4f} over {len(ratios)} runs; "
          f"429s {sum(r['429s'] for r in results)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
