#!/usr/bin/env python3
"""The official `openai` Python package against `tollgate serve` (in front of `tollgate sim`).

Chat, streaming chat and embeddings go through; over the caller's limit the SDK gets a
429 that raises RateLimitError naming the limit, and with retries on it waits the
gateway's `retry-after-ms` and then gets through, because that is exactly when the
request fits. Run by scripts/test.sh:

    python3 scripts/gateway_openai.py target/debug/tollgate
"""

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import openai

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/tollgate"
KEY = "py-test-key"
RPM = 6  # a burst of 6, then one every 10 s


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc, log_path, what):
    for _ in range(200):
        with open(log_path) as f:
            if "listening on" in f.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path) as f:
        sys.exit(f"{what} did not start:\n{f.read()}")


def main():
    work = tempfile.mkdtemp()
    sim_port, gw_port = free_port(), free_port()
    procs = []
    try:
        sim_log = os.path.join(work, "sim.log")
        procs.append(subprocess.Popen(
            [BIN, "sim", "--port", str(sim_port), "--latency", "5ms"],
            stderr=open(sim_log, "w")))
        wait_listening(procs[-1], sim_log, "tollgate sim")
        config = os.path.join(work, "tollgate.toml")
        with open(config, "w") as f:
            f.write(f"""listen = "127.0.0.1:{gw_port}"
[upstreams.sim]
kind = "sim"
url = "http://127.0.0.1:{sim_port}"
models = ["gpt-4o-mini", "text-embedding-3-small"]
[tiers.py]
limits = {{ requests_per_minute = {RPM}, tokens_per_minute = 100000 }}
[callers.python]
key_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
tier = "py"
""")
        gw_log = os.path.join(work, "gw.log")
        procs.append(subprocess.Popen([BIN, "serve", "--config", config],
                                      stderr=open(gw_log, "w")))
        wait_listening(procs[-1], gw_log, "tollgate serve")

        client = openai.OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{gw_port}/v1")

        chat = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=20,
            messages=[{"role": "user", "content": "Hello, gateway"}])
        assert chat.choices[0].message.content, chat
        assert chat.usage.completion_tokens > 0, chat.usage
        print(f"chat: ok, {chat.usage.prompt_tokens} + {chat.usage.completion_tokens} tokens")

        text, usage_seen = "", False
        for chunk in client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=20, stream=True,
                messages=[{"role": "user", "content": "Stream to me"}]):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage_seen |= chunk.usage is not None
        assert text, "the stream carried text"
        assert not usage_seen, "usage the caller did not ask for is not shown"
        print(f"streaming chat: ok, {len(text)} characters")

        emb = client.embeddings.create(model="text-embedding-3-small", input="hello")
        assert len(emb.data[0].embedding) > 0
        print("embeddings: ok")

        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-ratelimit-limit-requests"] == str(RPM)
        assert raw.headers["x-ratelimit-remaining-requests"] == str(RPM - 4), raw.headers
        for _ in range(RPM - 4):
            client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])

        # Over the limit, without retries: RateLimitError naming the limit.
        try:
            client.with_options(max_retries=0).chat.completions.create(
                model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
            sys.exit("the request over the limit was admitted")
        except openai.RateLimitError as e:
            assert "tier.py.requests_per_minute" in str(e), e
            wait_ms = int(e.response.headers["retry-after-ms"])
            assert 0 < wait_ms <= 60_000 // RPM, wait_ms
            print(f"over the limit: RateLimitError, retry-after-ms {wait_ms}: {e}")

        # With the SDK's retries: it waits what the gateway said, and then fits.
        t = time.monotonic()
        client.with_options(max_retries=2).chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        waited = time.monotonic() - t
        assert waited >= wait_ms / 1000 - 1.0, f"waited {waited:.2f} s, told {wait_ms} ms"
        print(f"with retries: admitted after honouring retry-after ({waited:.1f} s)")

        print("openai Python SDK against tollgate serve: all ok")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
