#!/usr/bin/env python3
"""Does `tollgate batch` stream its input? Peak memory (max RSS) for files of growing length.

Runs `tollgate batch` on N small chat requests (N = 10,000, 100,000, 1,000,000 by default)
against `tollgate sim` with limits far above the load, and prints the batch process's
peak resident memory for each N. Flat memory: the peak does not grow with N.

Usage: scripts/bench_batch_memory.py [N ...]   (builds the release binary)
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "tollgate")
PORT = 18_090


def high_water_kb(pid):
    """The process's peak resident memory so far (VmHWM), 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000, 1_000_000]
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tollgate-cli"], cwd=ROOT, check=True)
    sim = subprocess.Popen([BIN, "sim", "--port", str(PORT), "--rpm", "1000000000", "--tpm", "1000000000000",
                            "--latency", "0ms", "--output-tokens", "4"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        for n in sizes:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "in.jsonl")
                with open(path, "w") as f:
                    for i in range(n):
                        f.write(json.dumps({"model": "gpt-4o-mini", "max_tokens": 4, "metadata": {"row": i},
                                            "messages": [{"role": "user", "content": f"request number {i}"}]}) + "\n")
                start = time.monotonic()
                batch = subprocess.Popen([BIN, "batch", path, "-o", os.path.join(d, "out.jsonl"),
                                          "--url", f"http://127.0.0.1:{PORT}/v1/chat/completions",
                                          "--rpm", "1000000000", "--tpm", "1000000000000", "--progress", "off"],
                                         stderr=subprocess.DEVNULL)
                peak = 0
                while batch.poll() is None:
                    peak = max(peak, high_water_kb(batch.pid))
                    time.sleep(0.05)
                wall = time.monotonic() - start
                if batch.returncode != 0:
                    sys.exit(f"tollgate batch failed with {batch.returncode}")
                print(json.dumps({"lines": n, "input_mb": round(os.path.getsize(path) / 1e6, 1),
                                  "peak_rss_mb": round(peak / 1024, 1), "wall_s": round(wall, 1),
                                  "lines_per_s": round(n / wall)}), flush=True)
    finally:
        sim.terminate()
        sim.wait()


if __name__ == "__main__":
    main()
