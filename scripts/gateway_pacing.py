#!/usr/bin/env python3
"""`tollgate serve --upstream` as a pacing proxy, driven by the official `openai` package.

30 threads of the `openai` client make 150 chat calls through
`tollgate serve --upstream http://127.0.0.1:PORT/v1` (the base URL spelled as SDKs spell
it, with `/v1`) to `tollgate sim --rpm 120`, which accepts only the caller's key: the
gateway has no key of its own (OPENAI_API_KEY unset in its environment), so it passes the
caller's through. Twice:

1. no limits given: the gateway learns them from the sim's rate-limit headers;
2. `--rpm 120` given.

Both times every call must succeed, the upstream must refuse at most 4 (learned) or 0
(given) with 429, and the wall time must be at most 1.1 x what 120 a minute allows (the
first 120 at once from a full bucket, then one every half second). Run by scripts/test.sh:

    python3 scripts/gateway_pacing.py target/debug/tollgate
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gateway_openai import free_port  # noqa: E402  one helper for both SDK scripts

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/tollgate"
KEY = "sk-callers-own-key"
RPM = 120
CALLS = 150
THREADS = 30


def wait_listening(proc, log_path, what):
    for _ in range(400):
        with open(log_path) as f:
            text = f.read()
        if "listening on" in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path) as f:
        sys.exit(f"{what} did not start:\n{f.read()}")


def stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as r:
        return json.load(r)


def run(rpm_flag):
    work = tempfile.mkdtemp()
    sim_port, gw_port = free_port(), free_port()
    procs = []
    try:
        sim_log = os.path.join(work, "sim.log")
        procs.append(subprocess.Popen(
            [BIN, "sim", "--port", str(sim_port), "--rpm", str(RPM), "--latency", "20ms",
             "--keys", KEY],
            stderr=open(sim_log, "w")))
        wait_listening(procs[-1], sim_log, "tollgate sim")
        gw_log = os.path.join(work, "gw.log")
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        cmd = [BIN, "serve", "--upstream", f"http://127.0.0.1:{sim_port}/v1",
               "--listen", f"127.0.0.1:{gw_port}"]
        if rpm_flag:
            cmd += ["--rpm", str(RPM)]
        procs.append(subprocess.Popen(cmd, stderr=open(gw_log, "w"), env=env))
        started = wait_listening(procs[-1], gw_log, "tollgate serve")
        assert "each caller's own key is passed through" in started, started

        client = openai.OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{gw_port}/v1",
                               max_retries=2, timeout=120)

        def call(i):
            r = client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=8,
                messages=[{"role": "user", "content": f"question {i}"}])
            return r.usage.completion_tokens

        t = time.monotonic()
        failed = []
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(call, i) for i in range(CALLS)]
            for f in futures:
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    failed.append(repr(e))
        wall = time.monotonic() - t
        s = stats(sim_port)
        # From a full bucket: the first RPM at once, the rest at RPM a minute.
        allowed = (CALLS - RPM) * 60 / RPM
        mode = "--rpm 120" if rpm_flag else "limits learned"
        print(f"{mode}: {CALLS - len(failed)}/{CALLS} succeeded, "
              f"{s['rate_limited']} upstream 429s, wall {wall:.2f} s "
              f"({wall / allowed:.3f} x the {allowed:.1f} s that {RPM} a minute allows)")
        if failed:
            with open(gw_log) as f:
                sys.exit(f"{len(failed)} calls failed, first: {failed[0]}\n{f.read()[-3000:]}")
        limit = 0 if rpm_flag else 4
        assert s["rate_limited"] <= limit, s
        assert s["admitted"] == CALLS, s
        # 1.1 x is the target (measured 1.01 to 1.09 on an idle 2-core machine, debug and release builds); a loaded
        # CI machine gets one second more before this fails.
        assert wall <= 1.1 * allowed + 1.0, f"{wall:.2f} s against {allowed:.1f} s"
        return wall / allowed, s["rate_limited"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    run(rpm_flag=False)
    run(rpm_flag=True)
    print("tollgate serve --upstream paces the openai client: all ok")


if __name__ == "__main__":
    main()
